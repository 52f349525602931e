"""The package's import graph has no cycle: every module of minireuse imports (at module
level or inside a function) only modules below it, and the package's wings stand on one
another in one order: the ground (backend, checks, fileio, geometry, tables, timing, cpu/, kernels/), the
network's maths (conv_geometry, optim, losses, reuse/, layers/, models/, data/), training/,
tools/, the command line."""
import ast
import os

import minireuse

ROOT = os.path.dirname(os.path.abspath(minireuse.__file__))


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def modules():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def resolve(current, is_package, level, name):
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    if level:
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))
    return name


def import_graph():
    names = {module_name(p): p for p in modules()}
    graph = {}
    for mod, path in names.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        is_package = path.endswith("__init__.py")
        out = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, is_package, node.level, node.module)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in names and t != mod:
                    out.add(t)
        # a package's face (__init__) re-exports its submodules: "pkg -> pkg.sub" is not a cycle
        graph[mod] = {t for t in out if not (is_package and t.startswith(mod + "."))}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "minireuse.reuse.dispatch" in graph and "minireuse.conv_geometry" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# the wings from the ground up: a module imports nothing of a wing above its own
WINGS = (
    ("ground", ("backend", "checks", "fileio", "geometry", "tables", "timing", "cpu", "kernels")),
    ("maths", ("conv_geometry", "optim", "losses", "reuse", "layers", "models", "data")),
    ("training", ("training",)),
    ("tools", ("tools",)),
    ("command line", ("__main__",)),
)


def wing(module):
    """The index in WINGS of a module of the package (None for the package's face)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, (_, tops) in enumerate(WINGS):
        if parts[1] in tops:
            return i
    raise AssertionError(f"{module} belongs to no wing: add its top-level name to WINGS")


def test_every_wing_imports_only_the_wings_below_it():
    graph = import_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps
              if wing(m) is not None and wing(d) is not None and wing(d) > wing(m)]
    assert upward == [], "imports that climb to a higher wing: " + ", ".join(f"{m} -> {d}" for m, d in upward)


def test_the_deep_reuse_engine_knows_nothing_of_training():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("minireuse.reuse"):
            assert not any(d.startswith(("minireuse.training", "minireuse.tools")) for d in deps), mod


def test_the_reference_path_imports_nothing_of_the_fast_path():
    graph = import_graph()
    for ref in ("lsh", "clustering", "matmul", "conv", "config"):
        deps = graph[f"minireuse.reuse.{ref}"]
        assert not any(d.startswith("minireuse.reuse.cuda") or d == "minireuse.reuse.dispatch" for d in deps), ref


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layers_the_optimizer_and_the_trainer_know_nothing_of_graph_capture():
    """Recording and replaying a step is training/step.py's and training/graphs.py's business:
    layers, optimizers and the training loop only advance and read per-step state."""
    paths = [os.path.join(ROOT, "layers", f) for f in os.listdir(os.path.join(ROOT, "layers")) if f.endswith(".py")]
    paths += [os.path.join(ROOT, "optim.py"), os.path.join(ROOT, "training", "trainer.py")]
    for path in paths:
        with open(path) as f:
            text = f.read().lower()
        assert "captur" not in text and "replay" not in text, os.path.relpath(path, ROOT)
