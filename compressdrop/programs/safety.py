"""Reading a ``torch.export`` archive (``.pt2``) so that loading it runs no code from the file.

``torch.export.load`` is not safe on an untrusted file (PyTorch 2.13, ``torch/export/pt2_archive``
and ``torch/_export/serde``): a weight, constant or custom object marked ``use_pickle`` is unpickled
with ``weights_only=False``; sample inputs that fail the weights-only unpickler are retried with
full pickle; symbolic shape expressions are parsed with ``sympy.sympify``, which evaluates Python;
``guards_code`` strings become Python that runs on every call; a node's target may name any
attribute of ``torch`` (``torch.load``, ``torch.hub.load``, ...); an AOTInductor entry is a compiled
library. :func:`check_pt2_archive` reads the archive's JSON and payload tables and refuses all of
these; :func:`load_program_safely` runs it, then loads the program with the guards dropped (they
only re-check input shapes).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import CheckpointError

__all__ = ["Source", "check_pt2_archive", "is_pt2", "load_program_safely"]

#: what the readers take: a path, or an open binary file
Source = str | Path | IO[bytes]

# node targets a program may call: ATen, prims and higher-order operators, operator/math functions,
# torch's symbolic-int helpers
_TARGET = re.compile(
    r"^(torch\.ops\.(aten|prims|higher_order)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?"
    r"|_operator\.[a-z_]+|math\.[a-z_]+|torch\.(_?sym_[a-z_]+))$"
)
# sympy's repr of shape expressions: whitelisted names called with numbers, quoted symbol names and
# keyword flags; no attribute access, no subscripts, no other strings
_EXPR_NAMES = {
    *[
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Mod",
        "PythonMod",
        "FloorDiv",
        "CleanDiv",
        "CeilDiv",
        "ModularIndexing",
        "Where",
        "Abs",
        "floor",
        "ceiling",
        "FloorToInt",
        "CeilToInt",
        "TruncToInt",
        "IntTrueDiv",
        "FloatTrueDiv",
        "ToFloat",
        "Identity",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "BooleanTrue",
        "BooleanFalse",
        "true",
        "false",
        "True",
        "False",
        "Infinity",
        "NegativeInfinity",
        "oo",
        "zoo",
        "nan",
        "sqrt",
        "exp",
        "log",
    ],
    *[
        "positive",
        "integer",
        "real",
        "nonnegative",
        "negative",
        "nonpositive",
        "finite",
        "infinite",
        "zero",
        "commutative",
        "even",
        "odd",
        "prime",
        "rational",
    ],
}
_EXPR_TOKEN = re.compile(
    r"\s+|'[a-z]+[0-9]*'|[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|[-+*/%(),=]"
)
_FORBIDDEN_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia/")


def is_pt2(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.export`` archive (a zip holding ``*/archive_format``).

    Args:
        path: the file to look at; only its zip directory is read.

    Returns:
        True for a ``.pt2`` archive; False for anything else, including an unreadable file.
    """
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read(src: Source | bytes, where: str | None) -> tuple[bytes, str]:
    """The archive's bytes and its name for messages."""
    if isinstance(src, bytes):
        return src, where or "embedded program"
    if isinstance(src, str | Path):
        try:
            return Path(src).read_bytes(), where or str(src)
        except OSError as e:
            raise CheckpointError(f"{src}: cannot read ({e.strerror})") from None
    return src.read(), where or "program"


def _safe_expr(expr: str) -> bool:
    """Whether ``expr`` is only whitelisted names, numbers, quoted symbol names and operators."""
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            return False
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _EXPR_NAMES:
            return False
        pos = m.end()
    return True


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


# what reading a damaged or crafted archive's entries raises: bad zip data, JSON that is not JSON
# (or nested past the recursion limit), JSON of another shape than torch writes
_MALFORMED = (
    *(zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RecursionError),
    *(ValueError, AttributeError, TypeError, KeyError),
)


def check_pt2_archive(src: Source | bytes, where: str | None = None) -> None:
    """Refuse a ``.pt2`` whose loading or running could execute code from the file.

    Args:
        src: a path, an open binary file or the archive's bytes.
        where: the name for messages (default: the path).

    Raises:
        CheckpointError: naming the first entry that is not plain data.
    """
    data, where = _read(src, where)
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{where}: not a readable .pt2 archive ({e})") from None

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: refused: {what}. Loading it with torch.export.load would run code from "
            "the file; compressdrop loads only programs that are plain data."
        )

    try:
        with z:
            names = z.namelist()
            for name in names:
                inner = name.split("/", 1)[1] if "/" in name else name
                if inner.startswith(_FORBIDDEN_DIRS):
                    raise refuse(f"it holds compiled code ({name})")
                if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", inner):
                    raise refuse(f"it holds a legacy pickled payload ({name})")
                if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(
                    "_config.json"
                ):
                    config = json.loads(z.read(name)).get("config", {})
                    for fqn, entry in config.items():
                        if entry.get("use_pickle"):
                            raise refuse(f"{fqn!r} is stored as a pickle ({name})")
                        if inner.startswith("data/constants/") and not str(
                            entry.get("path_name", "")
                        ).startswith("tensor_"):
                            raise refuse(f"constant {fqn!r} is a Python object ({name})")
                if inner.startswith("data/sample_inputs/"):
                    try:
                        torch.load(io.BytesIO(z.read(name)), weights_only=True)
                    except Exception:
                        raise refuse(f"its sample inputs are not plain tensors ({name})") from None
                if inner.startswith("models/") and inner.endswith(".json"):
                    for key, value in _walk(json.loads(z.read(name))):
                        if key == "target" and isinstance(value, str) and not _TARGET.match(value):
                            raise refuse(f"a node calls {value!r}")
                        if key == "expr_str" and not (isinstance(value, str) and _safe_expr(value)):
                            raise refuse(
                                f"a shape expression is not arithmetic: {str(value)[:80]!r}"
                            )
                        if key == "custom_obj_values" and value:
                            raise refuse("it holds custom Python objects")
            if not any(n.endswith("/archive_format") for n in names):
                raise CheckpointError(f"{where}: a zip file, but not a torch.export archive")

    except CheckpointError:
        raise
    except _MALFORMED as e:  # an entry that is not what its name says (a crafted archive)
        raise CheckpointError(
            f"{where}: not a readable .pt2 archive ({type(e).__name__} reading its entries)"
        ) from None


def load_program_safely(
    src: Source | bytes, where: str | None = None
) -> torch.export.ExportedProgram:
    """:func:`check_pt2_archive`, then ``torch.export.load`` with the guards dropped.

    Args:
        src: a path, an open binary file or the archive's bytes.
        where: the name for messages (default: the path).

    Returns:
        The program, with its ``guards_code`` (Python source from the file) emptied.

    Raises:
        CheckpointError: the archive cannot be read, is refused by :func:`check_pt2_archive`, or
            ``torch.export.load`` fails on it.
    """
    data, where = _read(src, where)
    check_pt2_archive(data, where)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # torch raises many types on a damaged archive
        raise CheckpointError(
            f"{where}: not a readable torch.export program: {type(e).__name__}: {e}"
        ) from None
    program._guards_code = []  # Python source from the file; it only re-checks input shapes
    return program
