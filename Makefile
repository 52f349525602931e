# minireuse: common tasks. PYTHON picks the interpreter; DATA the CIFAR-10 directory.
#
# The interpreter: PYTHON=... when given; else, inside an active virtual environment
# ($VIRTUAL_ENV set), its python3, as it is (`make cifar` pip-installs into it, `make
# test` does not); else the project's own virtual environment .venv, created with
# $(VENV_PYTHON) on first use and `pip install -e '.[test]'`-ed only when that install
# is missing or setup.cfg / pyproject.toml is newer than it (the stamp .venv/.installed).
VENV ?= .venv
VENV_PYTHON ?= python3
ifeq ($(origin PYTHON),undefined)
ifdef VIRTUAL_ENV
PYTHON := python3
else
PYTHON := $(VENV)/bin/python
OWN_VENV := 1
endif
endif
ifdef OWN_VENV
INSTALLED := $(VENV)/.installed
# an install removed since the stamp (pip uninstall) counts as missing
INSTALL_GONE := $(if $(wildcard $(VENV)/lib/python*/site-packages/minireuse-*.dist-info),,reinstall-missing)
else
INSTALLED := install
endif
TESTS ?= tests
GPU_RESULTS ?= gpu_results
DATA ?= data
OUT ?= runs/cifarnet
EPOCHS ?= 30
DEVICE ?= auto
SHARED_CIFAR ?= ../shared/data/make_cifar10.py
REUSE ?= adaptive
TRAIN_FLAGS ?=
# RESUME=1: continue the interrupted run in OUT (its checkpoint keeps its settings)
RESUME ?=
RESUME_FLAG = $(if $(RESUME),--resume $(OUT)/checkpoint.npz)
# how train's messages name this target (to resume a run, or start it over): `make cifar`
# with the variables given on this command line, since a bare `python` may lack the packages
CIFAR_COMMAND = $(strip make cifar $(foreach v,PYTHON DATA OUT EPOCHS DEVICE REUSE,$(if $(filter command line,$(origin $v)),$v=$($v))))
# the accuracy-parity protocol's budget (docs/adaptive.md): a CPU session's worth
PARITY_FLAGS ?= --seeds 0,1,2 --epochs 8 --limit-train 5000

.PHONY: install test cifar cifar-exact bench parity data gpu-check docs figures clean

ifdef OWN_VENV
install: $(INSTALLED)

$(VENV)/bin/python:
	@echo "creating the virtual environment $(VENV) (PYTHON=... or an active one to use another)"
	$(VENV_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV) with $(VENV_PYTHON) -m venv"; exit 1; }
	$@ -m pip install -q --upgrade pip || { rm -rf $(VENV); echo "could not upgrade pip in $(VENV)"; exit 1; }

$(INSTALLED): setup.cfg pyproject.toml $(INSTALL_GONE) | $(VENV)/bin/python
	$(PYTHON) -m pip install -q -e '.[test]'
	@touch $@

.PHONY: reinstall-missing
reinstall-missing:
else
install:
	$(PYTHON) -m pip install -q -e '.[test]'
endif

test: $(if $(OWN_VENV),$(INSTALLED))
	$(PYTHON) -m pytest -q $(TESTS)

# Builds the official CIFAR-10 layout from this repository's shared JPEG copy when
# the data is missing and that copy exists; elsewhere the loader downloads it.
data: $(if $(OWN_VENV),| $(VENV)/bin/python)
	@if [ ! -d "$(DATA)/cifar-10-batches-py" ] && [ ! -f "$(DATA)/cifar-10-python.tar.gz" ] && [ -f "$(SHARED_CIFAR)" ]; then \
		$(PYTHON) -m pip install -q pillow && $(PYTHON) $(SHARED_CIFAR) $(DATA); fi

cifar: $(INSTALLED) data
	MINIREUSE_MAKE_COMMAND='$(CIFAR_COMMAND)' $(PYTHON) -m minireuse train --model cifarnet --data $(DATA) --epochs $(EPOCHS) --device $(DEVICE) \
		--out $(OUT) --reuse $(REUSE) $(TRAIN_FLAGS) $(RESUME_FLAG)

# the same recipe with every layer exact
cifar-exact: $(INSTALLED) data
	$(PYTHON) -m minireuse train --model cifarnet --data $(DATA) --epochs $(EPOCHS) --device $(DEVICE) \
		--out $(OUT)-exact --reuse off $(TRAIN_FLAGS)

# exact and reuse on each seed; differences as mean +- spread (OUT-parity/parity.json)
parity: $(INSTALLED) data
	$(PYTHON) -m minireuse parity --data $(DATA) --device $(DEVICE) --out $(OUT)-parity --reuse $(REUSE) \
		$(PARITY_FLAGS) $(TRAIN_FLAGS)

bench: $(INSTALLED)
	$(PYTHON) -m minireuse bench layers --data $(DATA) --json bench.json

# The GPU check (scripts/gpu_check.sh; gpu_results/README.md says what it answers). With make's
# own .venv it installs first: put CuPy there once with `.venv/bin/python -m pip install -e
# '.[gpu-cuda13]'` (gpu-cuda12 for CUDA 12). PYTHON=... (or an active virtual environment) is
# taken as it is, with no install step, the project run from this source tree (PYTHONPATH=.):
# `make gpu-check PYTHON=python3` on a GPU machine whose python3 has cupy, numpy, pytest and
# tqdm and no network. Without a usable GPU it stops within seconds, writing nothing.
gpu-check: $(if $(OWN_VENV),$(INSTALLED))
	PYTHON='$(PYTHON)' DATA='$(DATA)' OUT_DIR='$(GPU_RESULTS)' bash scripts/gpu_check.sh

# the docs' copies of kernel sources and ptxas tables (PTXAS=1: recompile with nvcc first)
docs: $(if $(OWN_VENV),$(INSTALLED))
	$(PYTHON) scripts/docs_sync.py $(if $(PTXAS),--ptxas)

# every figure of docs/ (seconds on a CPU; matplotlib from .[plot])
figures: $(if $(OWN_VENV),$(INSTALLED))
	$(PYTHON) docs/figures/make_figures.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
