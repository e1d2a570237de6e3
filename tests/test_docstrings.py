"""Every module of the package says what it owns, and every public function, class and method has
a docstring (public: no leading underscore and, where the module has ``__all__``, listed there)."""

import ast
from pathlib import Path

import compressdrop

PACKAGE = Path(compressdrop.__file__).parent
# nn.Module's own API, documented by torch
INHERITED = {"forward", "extra_repr"}


def undocumented(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    if not ast.get_docstring(tree):
        return [f"{path.name}: module"]
    listed = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            listed = {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if listed is not None and node.name not in listed:
            continue
        if not ast.get_docstring(node):
            found.append(f"{path.name}:{node.lineno} {node.name}")
        if isinstance(node, ast.ClassDef):
            found += [
                f"{path.name}:{m.lineno} {node.name}.{m.name}"
                for m in node.body
                if isinstance(m, ast.FunctionDef)
                and not m.name.startswith("_")
                and m.name not in INHERITED
                and not ast.get_docstring(m)
            ]
    return found


def test_the_checker_finds_a_missing_docstring(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        '"""Doc."""\n__all__ = ["f", "C"]\ndef f(): pass\nclass C:\n    def g(self): pass\n'
    )
    assert undocumented(src) == ["m.py:3 f", "m.py:4 C", "m.py:5 C.g"]


def test_the_public_api_is_documented():
    missing = [m for p in sorted(PACKAGE.rglob("*.py")) for m in undocumented(p)]
    assert not missing, "no docstring: " + ", ".join(missing)
