"""The package's modules import each other in one direction: no cycles, imports deferred inside
functions included (read from the source, so a cycle hidden in a function body counts)."""

import ast
from pathlib import Path

import compressdrop

PACKAGE = Path(compressdrop.__file__).parent
# cycles allowed to remain: none (the per-layer-type registry broke the one inside gating/)
KNOWN: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ["compressdrop", *p.relative_to(PACKAGE).with_suffix("").parts]
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (and their packages)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        here = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                t = ".".join([*base, *([node.module] if node.module else [])])
                names = [f"{t}.{a.name}" if f"{t}.{a.name}" in mods else t for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for t in names:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t not in mods or t == m:
                    continue
                graph[m].add(t)
                parts = t.split(".")
                for i in range(2, len(parts)):  # importing a.b.c imports the package a.b
                    parent = ".".join(parts[:i])
                    if parent != m and not m.startswith(parent + "."):
                        graph[m].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycles_in_the_package():
    found = set(cycles(import_graph()))
    assert found <= KNOWN, f"import cycles: {[sorted(c) for c in found - KNOWN]}"


# The package's layers, low to high: a module imports only from its own package or from a lower
# layer (the root package, which re-exports the public API lazily, stands outside).
LAYERS = [
    {"errors", "_version", "_families"},
    {"_io"},  # atomic writes and checked reads: files are written and read from every layer
    {"_pickled", "_safetensors", "_attrs", "_warn", "runtime", "_torchvision"},
    {"gates", "dropout", "data", "programs", "torchload", "hf_files"},
    {"models", "gating"},
    {"arch", "pruning", "recipes", "hf_folder"},
    {"payload", "hf_plan", "_reattach"},
    {"checkpoint", "export"},
    {"evaluation", "uncertainty"},
    {"training"},
    {"workflows", "integrations"},
    {"reporting", "cli_options"},
    {"cli"},
    {"__main__"},
]


def test_imports_point_down_the_layers():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    top = {m: m.split(".")[1] for m in import_graph() if m != "compressdrop"}
    assert set(top.values()) <= set(rank), f"modules in no layer: {set(top.values()) - set(rank)}"
    upward = sorted(
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m in top and t in top and top[m] != top[t] and rank[top[t]] >= rank[top[m]]
    )
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


def test_no_public_name_shadows_a_submodule():
    """``compressdrop.gates`` is the gates package, not a function of the same name: every
    package's attribute named like one of its submodules is that submodule."""
    import importlib
    import pkgutil

    shadowed = []
    for info in pkgutil.walk_packages(compressdrop.__path__, "compressdrop."):
        if info.name.endswith("integrations.lightning"):
            continue  # needs the optional Lightning extra
        parent_name, _, child = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        module = importlib.import_module(info.name)
        if getattr(parent, child) is not module:
            shadowed.append(f"{parent_name}.{child}")
    assert not shadowed, f"public names shadow submodules: {shadowed}"


def test_no_module_is_over_400_lines():
    """Long modules hide more than one job (the style guide's limit)."""
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_every_top_level_name_resolves_lazily_to_its_module():
    """The README calls ``cd.export_program`` and ``cd.export_mc_onnx`` (they were only in
    ``compressdrop.export`` and ``compressdrop.uncertainty``); every name in ``__all__`` is there."""
    import compressdrop.export
    import compressdrop.uncertainty

    assert compressdrop.export_program is compressdrop.export.export_program
    assert compressdrop.export_mc_onnx is compressdrop.uncertainty.export_mc_onnx
    missing = [n for n in compressdrop.__all__ if not hasattr(compressdrop, n)]
    assert not missing, f"__all__ names that do not resolve: {missing}"
