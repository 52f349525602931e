# minireuse: common tasks. PYTHON picks the interpreter; DATA the CIFAR-10 directory.
PYTHON ?= python3
DATA ?= data
OUT ?= runs/cifarnet
EPOCHS ?= 30
DEVICE ?= auto
SHARED_CIFAR ?= ../shared/data/make_cifar10.py
REUSE ?= adaptive
TRAIN_FLAGS ?=
# the accuracy-parity protocol's budget (docs/adaptive.md): a CPU session's worth
PARITY_FLAGS ?= --seeds 0,1,2 --epochs 8 --limit-train 5000

.PHONY: install test cifar cifar-exact bench parity data gpu-check clean

install:
	$(PYTHON) -m pip install -q -e '.[test]'

test:
	$(PYTHON) -m pytest -q tests

# Builds the official CIFAR-10 layout from this repository's shared JPEG copy when
# the data is missing and that copy exists; elsewhere the loader downloads it.
data:
	@if [ ! -d "$(DATA)/cifar-10-batches-py" ] && [ ! -f "$(DATA)/cifar-10-python.tar.gz" ] && [ -f "$(SHARED_CIFAR)" ]; then \
		$(PYTHON) -m pip install -q pillow && $(PYTHON) $(SHARED_CIFAR) $(DATA); fi

cifar: install data
	$(PYTHON) -m minireuse train --model cifarnet --data $(DATA) --epochs $(EPOCHS) --device $(DEVICE) \
		--out $(OUT) --reuse $(REUSE) $(TRAIN_FLAGS)

# the same recipe with every layer exact
cifar-exact: install data
	$(PYTHON) -m minireuse train --model cifarnet --data $(DATA) --epochs $(EPOCHS) --device $(DEVICE) \
		--out $(OUT)-exact --reuse off $(TRAIN_FLAGS)

# exact and reuse on each seed; differences as mean +- spread (OUT-parity/parity.json)
parity: install data
	$(PYTHON) -m minireuse parity --data $(DATA) --device $(DEVICE) --out $(OUT)-parity --reuse $(REUSE) \
		$(PARITY_FLAGS) $(TRAIN_FLAGS)

bench: install
	$(PYTHON) -m minireuse bench --data $(DATA) --json bench.json

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache
