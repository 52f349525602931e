"""Fill the generated parts of the docs from the sources, or check that they match.

Two kinds of marker in a Markdown file under docs/:

    <!-- include cuda minireuse/reuse/kernels/hash.cu input_rms -->
    ```cuda
    (the definition of input_rms with the comment above it, copied from the file)
    ```
    <!-- end include -->

``include py PATH NAME`` copies a top-level Python function or class (or Class.method) the same way.
``include cuda`` also reads CUDA held in a Python string.

    <!-- ptxas hash_rows_h8 hash_rows_h16 -->
    (a table of registers, shared memory and occupancy, from docs/kernels/ptxas.json)
    <!-- end ptxas -->

A page whose copies differ from the source is stale: the docs test says so, and
`python scripts/docs_sync.py` (make docs) rewrites it. `--ptxas` first recompiles every
kernel with `nvcc -arch=sm_90 -Xptxas -v` into ptxas.json (needs nvcc, no GPU).
"""
import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PTXAS_JSON = DOCS / "kernels" / "ptxas.json"
ARCH = "sm_90"

INCLUDE = re.compile(r"(<!-- include (cuda|py) (\S+) ([\w.]+) -->\n)(.*?)(<!-- end include -->)", re.S)
PTXAS = re.compile(r"(<!-- ptxas ([\w ]+) -->\n)(.*?)(<!-- end ptxas -->)", re.S)

# Threads per block of each launch (cuda/*.py, step_kernels.THREADS); ptxas cannot know them.
BLOCK = {"input_rms": 256, "hash_rows_h8": 128, "hash_rows_h16": 128, "hash_rows_h32": 128,
         "hash_rows_h64": 128, "assign_codes": 256, "centroid_sums": 256,
         "reconstruct_rows": 256, "reconstruct_pixels": 256, "cluster_sums_rows": 256,
         "cluster_sums_pixels": 256, "dx_cluster_rows": 256, "dx_cluster_pixels": 256}
STEP_BLOCK = 256

# sm_90 per SM: registers, warps, blocks, shared memory; shared memory the system keeps per block.
SM90 = dict(registers=65536, warps=64, blocks=32, shared=233472, reserved=1024)


def c_definition(text, name):
    """The definition of the C function `name` in `text`, with the comment lines right above it."""
    for m in re.finditer(rf"\b{name}\s*\(", text):
        depth, i = 0, m.end() - 1
        while True:                                   # skip the parameter list
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        rest = text[i:].lstrip()
        if not rest.startswith("{"):
            continue                                  # a call or a declaration
        lines = text[:m.start()].split("\n")
        start = len(lines) - 1                        # the line holding the name
        while start > 0 and lines[start - 1].strip() and not lines[start - 1].rstrip().endswith(("}", ";", "*/")):
            start -= 1                                # template <...>, extern "C" __global__ ..., comments
        body, depth = text.index("{", i), 0
        for j in range(body, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        head = "\n".join(lines[start:])
        return (head + text[m.start():j + 1]).strip("\n")
    raise KeyError(f"no definition of {name}")


def py_definition(text, name):
    """The source of the top-level function or class `name` (or `Class.method`) of a module's text."""
    body = ast.parse(text).body
    for part in name.split("."):
        node = next((n for n in body if getattr(n, "name", None) == part), None)
        if node is None:
            raise KeyError(f"no definition of {name}")
        body = node.body
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = text.split("\n")[first - 1:node.end_lineno]
    indent = len(lines[0]) - len(lines[0].lstrip())
    return "\n".join(line[indent:] for line in lines)


def source_of(kind, path, name):
    text = (ROOT / path).read_text(encoding="utf-8")
    return c_definition(text, name) if kind == "cuda" else py_definition(text, name)


def occupancy(regs, shared, threads):
    """Fraction of sm_90's 64 warps a kernel keeps resident, and what limits it."""
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // 256) * 256              # registers are allocated per warp, 256 at a time
    limits = {"registers": SM90["registers"] // per_warp // warps,
              "threads": SM90["warps"] // warps, "blocks": SM90["blocks"],
              "shared memory": SM90["shared"] // (shared + SM90["reserved"])}
    blocks = min(limits.values())
    full = blocks * warps == SM90["warps"]
    return blocks * warps / SM90["warps"], "nothing" if full else min(limits, key=limits.get)


def ptxas_table(names, data):
    rows = ["| kernel | registers / thread | static shared memory | spills | threads / block | "
            "occupancy at sm_90 (limited by) |", "|---|---|---|---|---|---|"]
    for name in names:
        k = data["kernels"][name]
        occ, limit = occupancy(k["registers"], k["shared"], k["threads"])
        rows.append(f"| `{name}` | {k['registers']} | {k['shared']} B | {k['spill']} B | {k['threads']} | "
                    f"{occ:.0%} ({limit}) |")
    rows.append("")
    rows.append(f"{data['nvcc']}, `-arch={ARCH} -Xptxas -v`, made by `python scripts/docs_sync.py --ptxas` "
                f"from the sources of commit {data['commit']}. Occupancy counts registers, static shared "
                "memory and block size only (sm_90: 65536 registers, 64 warps, 32 blocks and 228 KB of "
                "shared memory per SM); dynamic shared memory, where a launch asks for it, lowers it further.")
    return "\n".join(rows) + "\n"


def fill(text, data):
    """`text` with every include and ptxas marker filled from the current sources."""
    def include(m):
        fence = "cuda" if m.group(2) == "cuda" else "py"
        code = source_of(m.group(2), m.group(3), m.group(4))
        return f"{m.group(1)}```{fence}\n{code}\n```\n{m.group(6)}"

    def table(m):
        return m.group(1) + ptxas_table(m.group(2).split(), data) + m.group(4)

    text = INCLUDE.sub(include, text)
    return PTXAS.sub(table, text) if PTXAS.search(text) else text


def load_ptxas():
    return json.loads(PTXAS_JSON.read_text()) if PTXAS_JSON.exists() else None


def stale_pages():
    """[(path, why)] of the docs pages whose generated parts differ from the sources."""
    data, found = load_ptxas(), []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        if fill(text, data) != text:
            found.append((path, "an included source or a ptxas table differs from the sources"))
    if data and data["sources"] != source_hashes():
        found.append((PTXAS_JSON, "the kernel sources changed since ptxas.json was made: make docs PTXAS=1 (needs nvcc)"))
    return found


def kernel_sources():
    """{name: CUDA text} of every translation unit compiled for the table."""
    sys.path.insert(0, str(ROOT))
    from minireuse.kernels import step_kernels
    from minireuse.reuse import cuda
    return {"reuse": cuda.module_source(), "step_kernels": step_kernels.CUDA_SOURCE}


def source_hashes():
    return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in kernel_sources().items()}


def run_ptxas():
    """Compile both modules with ptxas -v; {kernel: registers, shared, spill, threads}."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for unit, source in kernel_sources().items():
            cu = Path(tmp) / f"{unit}.cu"
            cu.write_text(source)
            extra = ["--fmad=false"] if unit == "step_kernels" else []
            proc = subprocess.run(["nvcc", "-cubin", f"-arch={ARCH}", "--std=c++17", "-Xptxas", "-v",
                                   *extra, "-o", str(cu.with_suffix(".cubin")), str(cu)],
                                  capture_output=True, text=True, check=True)
            current = None
            for line in (proc.stdout + proc.stderr).splitlines():
                m = re.search(r"Compiling entry function '(\w+)'", line)
                if m:
                    current = m.group(1)
                    found[current] = dict(threads=BLOCK.get(current, STEP_BLOCK), shared=0, spill=0)
                m = re.search(r"(\d+) bytes spill stores", line)
                if m and current:
                    found[current]["spill"] = int(m.group(1))
                m = re.search(r"Used (\d+) registers", line)
                if m and current:
                    found[current]["registers"] = int(m.group(1))
                    s = re.search(r"(\d+) bytes smem", line)
                    found[current]["shared"] = int(s.group(1)) if s else 0
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    return {"nvcc": "nvcc " + re.search(r"release ([\d.]+)", version).group(1), "commit": commit,
            "sources": source_hashes(), "kernels": found}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ptxas", action="store_true", help="recompile the kernels into ptxas.json first")
    parser.add_argument("--check", action="store_true", help="only list the stale pages")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for path, why in stale:
            print(f"{path.relative_to(ROOT)}: {why}")
        return 1 if stale else 0
    if args.ptxas:
        PTXAS_JSON.write_text(json.dumps(run_ptxas(), indent=1, sort_keys=True) + "\n")
    data = load_ptxas()
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        new = fill(text, data)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
