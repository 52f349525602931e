"""Run the code of a Markdown file: every ```python block in order, in one namespace.

A ```output block right after a ```python block is that block's expected standard
output and is compared exactly (trailing spaces aside). ```text blocks and other
fences are not run.
"""
import contextlib
import io
import re

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(markdown):
    """[(kind, code, line number)] of the fenced blocks of a Markdown text."""
    return [(m.group(1), m.group(2), markdown.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(markdown)]


def run_markdown(path):
    """Exec the python blocks of one file; raise AssertionError naming the block that failed."""
    text = open(path, encoding="utf-8").read()
    namespace = {"__name__": f"docs:{path}"}
    found = blocks(text)
    for i, (kind, code, line) in enumerate(found):
        if kind != "python":
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{path}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path}, block at line {line}: {type(e).__name__}: {e}") from e
        if i + 1 < len(found) and found[i + 1][0] == "output":
            expected, got = _normalise(found[i + 1][1]), _normalise(out.getvalue())
            assert got == expected, (f"{path}, block at line {line} printed:\n{got}\n"
                                     f"but the docs show (line {found[i + 1][2]}):\n{expected}")
    return namespace


def _normalise(s):
    return "\n".join(line.rstrip() for line in s.strip().splitlines())
