"""Every docs/*.md file runs: its ```python blocks in order, outputs checked against ```output blocks."""
from pathlib import Path

import pytest

from docs_runner import blocks, run_markdown

DOCS = sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md"))


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_doc_runs(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)
    run_markdown(str(path))


def test_runner_checks_outputs(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nx = 2\nprint(x)\n```\n\n```output\n2\n```\n\n```text\nnot run\n```\n")
    assert [k for k, _, _ in blocks(doc.read_text())] == ["python", "output", "text"]
    assert run_markdown(str(doc))["x"] == 2
    doc.write_text("```python\nprint(3)\n```\n```output\n2\n```\n")
    with pytest.raises(AssertionError, match="printed"):
        run_markdown(str(doc))
