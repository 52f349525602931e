"""Every Markdown file under docs/ runs: its ```python blocks in order, outputs checked
against ```output blocks; its copies of the sources are current and its figures exist."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from docs_runner import blocks, run_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").rglob("*.md"))
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT / "docs")) for p in DOCS])
def test_doc_runs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run_markdown(str(path))


def test_included_sources_and_ptxas_tables_are_current():
    stale = load("scripts/docs_sync.py", "docs_sync").stale_pages()
    assert not stale, f"stale docs (run `make docs`): {stale}"


def test_every_referenced_figure_exists_and_has_a_maker():
    made = set(load("docs/figures/make_figures.py", "make_figures").FIGURES)
    for path in DOCS + [ROOT / "README.md"]:
        for ref in IMAGE.findall(path.read_text(encoding="utf-8")):
            figure = (path.parent / ref).resolve()
            assert figure.exists(), f"{path.name} shows {ref}, which does not exist"
            assert figure.stem in made, f"{path.name} shows {ref}, which docs/figures/make_figures.py does not make"


def test_stored_runs_of_the_figures_are_those_their_maker_and_page_name():
    figures = load("docs/figures/make_figures.py", "make_figures")
    page = (ROOT / "docs" / "adaptive.md").read_text(encoding="utf-8")
    page = " ".join(page.replace("\\\n", " ").split())            # commands continued with backslashes
    for name in figures.RC_RUNS:
        made_by = json.loads((figures.RUNS / f"{name}.json").read_text())["made_by"]
        command = "python -m minireuse " + " ".join(figures.rc_args(name))
        assert made_by["command"] == command, f"{name}: stored run made by {made_by['command']!r}, not {command!r}"
        assert f"{command} --out" in page, f"adaptive.md does not give the command of {name}"


def test_runner_checks_outputs(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nx = 2\nprint(x)\n```\n\n```output\n2\n```\n\n```text\nnot run\n```\n")
    assert [k for k, _, _ in blocks(doc.read_text())] == ["python", "output", "text"]
    assert run_markdown(str(doc))["x"] == 2
    doc.write_text("```python\nprint(3)\n```\n```output\n2\n```\n")
    with pytest.raises(AssertionError, match="printed"):
        run_markdown(str(doc))


def test_sync_finds_definitions(tmp_path):
    sync = load("scripts/docs_sync.py", "docs_sync")
    c = "// why\nextern \"C\" __global__ void\nk(int* x)\n{\n    if (x) { f(x); }\n}\nvoid g() { k(0); }\n"
    assert sync.c_definition(c, "k") == "// why\nextern \"C\" __global__ void\nk(int* x)\n{\n    if (x) { f(x); }\n}"
    assert sync.py_definition("import x\n\ndef f(a):\n    return a\n", "f") == "def f(a):\n    return a"
    assert sync.occupancy(166, 0, 128) == (0.1875, "registers")


def test_the_full_training_figure_draws_every_stored_run_of_a_seed_with_an_exact_run():
    figures = load("docs/figures/make_figures.py", "make_figures")
    panels = {title: (curves, targets) for title, curves, targets in figures.full_training_panels()}
    stored = {p.parent.parent.name for p in figures.FULL_RUNS.glob("seed*/*/history.json")}
    assert panels and all(title.split(",")[0].replace(" ", "") in stored for title in panels)
    for title, (curves, targets) in panels.items():
        seed = figures.FULL_RUNS / title.split(",")[0].replace(" ", "")
        kinds = sorted(p.name for p in seed.iterdir() if (p / "history.json").exists())
        assert sorted(k for k, label in figures.FULL_KINDS.items() if label in curves) == kinds
        exact = curves[figures.FULL_KINDS["exact"]]
        assert len(exact) == 30 and exact[-1][0] == 15                 # every half epoch of 15
        assert targets[0][1] == exact[-1][2] - 0.003                    # exact's final - 0.3 points
        times = [t for _, t, _ in exact]
        assert times == sorted(times) and times[-1] == pytest.approx(15 * figures.FULL_STEPS_PER_EPOCH * figures.FULL_STEP_MS["exact"] / 1e3)
