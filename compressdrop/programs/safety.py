"""Reading a ``torch.export`` archive (``.pt2``) so that loading it runs no code from the file.

``torch.export.load`` is not safe on an untrusted file (PyTorch 2.13, ``torch/export/pt2_archive``
and ``torch/_export/serde``): a weight, constant or custom object marked ``use_pickle`` is unpickled
with ``weights_only=False``; sample inputs that fail the weights-only unpickler are retried with
full pickle; symbolic shape expressions are parsed with ``sympy.sympify``, which evaluates Python;
``guards_code`` strings become Python that runs on every call; a node's target may name any
attribute of ``torch`` (``torch.load``, ``torch.hub.load``, ...); an AOTInductor entry is a compiled
library. :func:`check_pt2_archive` reads the archive's JSON and payload tables and refuses all of
these; :func:`~.load.load_program_safely` runs it, then loads the program with the guards dropped (they
only re-check input shapes). The archive must hold exactly the records ``torch.export.load`` reads
as data, read through torch's own zip reader: torch reads every ``models/`` entry and derives the
program's name (and the legacy pickles it looks for) from the entry's name, so matching entries by
pattern had let a graph named ``models/model.JSON`` and a program named ``sub/model`` through.
Inside the graph, names must be dotted identifiers (FX pastes them into the Python source it
generates and runs), an ATen or prims call must be on the allowlist of :mod:`._ops` (the
program's graph runs once at load: every review had found ATen calls outside a deny-list that
crashed or read out of bounds on arguments the file gives; ``aten.from_file``, which maps and can
write any path, stays refused by name too), and shape expressions must be small (a tower of
powers makes ``sympy`` compute without end). The graph and
payload tables are read field by field against torch's own schema (``_schema.py``): torch
ignores keys it does not know and passes values of any type on, so a check by key name alone
let a name given as a number or a target given as a list through.
"""

from __future__ import annotations

import functools
import io
import json
import re
import zipfile
import zlib
from typing import Any

import torch
from torch._export.serde import schema

from .._io import inflated
from .._pickled import archive_problem
from ..errors import CheckpointError
from ._limits import _bounded_arithmetic, _payload_problem, _small_exponent
from ._ops import ALLOWED
from ._schema import IDENT, check_schema, string_checks
from ._source import Source, is_pt2, read_source

__all__ = ["Source", "check_pt2_archive", "is_pt2"]


# node targets a program may call: ATen and prims operators, the higher-order operators that
# only run the program's own subgraphs (not print, whose format string the file writes and which
# reads any attribute of its arguments, nor inline_asm_elementwise, which compiles the file's
# code on a GPU, nor the delegates, kernels and callables of the others), the operator and math
# functions of shape arithmetic (not pow, lshift, factorial & co., whose results may have any
# number of digits: a load that never ends), torch's symbolic-int helpers
_TARGET = re.compile(
    r"^(torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?"
    r"|torch\.ops\.higher_order\.(wrap_with_set_grad_enabled|wrap_with_autocast|cond|map_impl"
    r"|scan|flex_attention)"
    r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pos|abs|eq|ne|lt|le|gt|ge"
    r"|and_|or_|not_|truth|index)|math\.(ceil|floor|trunc|sqrt)|torch\.(_?sym_[a-z_]+))$"
)
# sympy's repr of shape expressions: whitelisted names called with numbers, quoted symbol names and
# keyword flags; no attribute access, no subscripts, no other strings
_EXPR_NAMES = set(
    re.findall(
        r"\w+",
        "Symbol Integer Rational Float Add Mul Pow Max Min Mod PythonMod FloorDiv CleanDiv CeilDiv "
        "ModularIndexing Where Abs floor ceiling FloorToInt CeilToInt TruncToInt IntTrueDiv "
        "FloatTrueDiv ToFloat Identity Eq Ne Lt Le Gt Ge And Or Not Piecewise ExprCondPair "
        "BooleanTrue BooleanFalse true false True False Infinity NegativeInfinity oo zoo nan sqrt "
        "exp log positive integer real nonnegative negative nonpositive finite infinite zero "
        "commutative even odd prime rational",
    )
)
_EXPR_TOKEN = re.compile(
    r"\s+|'[a-z]+[0-9]*'|[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|[-+*/%(),=]"
)
# calls a program may not make: from_file maps any path (shared=True writes it), save writes one,
# _print and warn write the file's text; the unchecked constructors and indexing
# (_sparse_coo_tensor_unsafe wrote past a buffer when made dense; _ctc_loss with a label past its
# classes, segment_reduce with offsets past its data, the COO/CSR index converters and
# embedding_dense_backward with indices past their sizes crashed; _transform_bias_rescale_qkv, in
# _native_multi_head_attention, read past its bias); while_loop, whose condition the file sets (a
# loop that never ends)
_NO_OPS = re.compile(
    r"torch\.ops\.(aten\.(from_file|save|_print|warn|\w*sparse\w*|_unsafe_(?!view\b)\w*"
    r"|_?ctc_loss\w*|_?segment_reduce\w*|_convert_indices\w*|embedding_dense_backward\w*"
    r"|_transform_bias_rescale_qkv\w*|_native_multi_head_attention\w*)"
    r"|higher_order\.while_loop\w*)(\.|$)"
)
# an operator off the allowlist (_ops.py says how it was made): the file may well be fine, so the
# refusal says what a user who trusts it can do
_UNLISTED = "which is not among the operators compressdrop runs from a file"
_TRUSTED = (
    "If you trust the file, pass --trust-code (trust_code=True in Python) to run any of torch's "
    "operators from it (a .pt checkpoint is then also unpickled whole, code and all); "
    "compressdrop/programs/_ops.py lists those it runs from any file."
)
_FORBIDDEN_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia/")


def _safe_expr(expr: str) -> bool:
    """Whether ``expr`` is only whitelisted names, numbers, quoted symbol names and operators,
    and small enough for ``sympy.sympify`` to parse at once: at most 4,000 characters, numbers
    of at most 20 digits, at most one power, its exponent a number up to 64 or a name (a tower
    of powers, ``9**9**9``, makes sympy compute the number: a load that never ends)."""
    if len(expr) > 4000 or expr.count("**") + expr.count("Pow(") > 1:
        return False
    tokens = []
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            return False
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _EXPR_NAMES:
            return False
        if tok[0].isdigit() and len(tok) > 20:
            return False
        if not tok.isspace():
            tokens.append(tok)
        pos = m.end()
    for i, tok in enumerate(tokens[:-2]):
        if tok == "*" and tokens[i + 1] == "*":
            exponent = tokens[i + 2]
            if (exponent.isdigit() and int(exponent) > 64) or exponent[0] in "(-+.":
                return False
        if tok == "Pow" and not _small_exponent(tokens[i + 1 :]):
            return False
    return True


# the containers a program's input and output trees may be (torch rebuilds others by importing
# the module a spec names: collections.defaultdict's, an enum's) and their keys (FX writes
# them into the source it generates: keyword arguments); transformers' ModelOutput classes are
# looked up among the registered types (programs/load.py registers them)
_SPEC_TYPES = {
    *(None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"),
    *(
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    ),
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _safe_spec(text: str) -> bool:
    """Whether a serialized pytree spec is only plain containers keyed by identifiers or ints."""
    doc = json.loads(text)
    if not (isinstance(doc, list) and len(doc) == 2):
        return False
    stack = [doc[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            return False
        kind, context = node.get("type"), node.get("context")
        hf = isinstance(kind, str) and kind.startswith("transformers.") and IDENT.fullmatch(kind)
        if kind not in _SPEC_TYPES and not hf:
            return False
        keys = json.loads(context) if isinstance(context, str) else context
        if keys is not None and not (
            isinstance(keys, list)
            and all(
                (isinstance(k, str) and _KEY.fullmatch(k))
                or (isinstance(k, int) and not isinstance(k, bool))
                for k in keys
            )
        ):
            return False
        children = node.get("children_spec") or []
        if not isinstance(children, list):
            return False
        stack.extend(children)
    return True


def _target(value: str, listed: bool = True) -> str | None:
    """A node's target (or an operator argument): one of the calls a program may make, an ATen
    or prims name one of their operators (not a Python attribute of the namespace such as
    ``__class__``, which torch would also look up) and, if ``listed``, on the allowlist
    (:data:`._ops.ALLOWED`)."""
    if not _TARGET.match(value) or _NO_OPS.match(value):
        return f"a node calls {value!r}"
    namespace, _, rest = value.removeprefix("torch.ops.").partition(".")
    if namespace in ("aten", "prims"):
        name, _, overload = rest.partition(".")
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
            op = getattr(packet, overload) if overload else packet
        except (AttributeError, RuntimeError):
            op = None
        if not isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return f"a node calls {value!r}, which is not one of torch's operators"
        if listed and f"{namespace}.{rest}" not in ALLOWED:
            return f"a node calls {value!r}, {_UNLISTED}"
    return None


def _expr(value: str) -> str | None:
    """A shape expression: small arithmetic (:func:`_safe_expr`)."""
    ok = _safe_expr(value)
    return None if ok else f"a shape expression is not small arithmetic: {value[:80]!r}"


def _spec(value: str) -> str | None:
    """An input or output tree: plain containers (:func:`_safe_spec`)."""
    return (
        None
        if _safe_spec(value)
        else f"its in_spec or out_spec is not plain containers: {value[:80]!r}"
    )


# what reading a damaged or crafted archive's entries raises: bad zip data, JSON that is not JSON
# (or nested past the recursion limit), JSON of another shape than torch writes
_MALFORMED = (
    *(zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RecursionError),
    *(ValueError, AttributeError, TypeError, KeyError),
)


# the records of a torch.export archive that torch.export.load reads as data, and nothing else
# (torch/export/pt2_archive/_package.py): a program's name is what its models/<name>.json says,
# and torch reads data/weights/<name>.pt (a pickle) if it exists, so a name holds no "/" or "."
_NAME = r"[A-Za-z0-9_-]+"
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
}
_PAYLOAD = {
    "data/weights/": re.compile(r"weight_[0-9]+"),
    "data/constants/": re.compile(r"tensor_[0-9]+"),
}


def _records(
    data: bytes, where: str, refuse: Any
) -> tuple[dict[str, bytes], list[str], dict[str, int]]:
    """The archive's records as ``torch.export.load`` sees them (its own reader), after checking
    that Python's zip reader sees the same: one root folder, no name twice, the same sizes, no
    zip bomb. Returns the reader's bytes of each record read as data, the programs' names and
    every record's size."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
        names = [i.filename for i in infos]
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{where}: not a readable .pt2 archive ({e})") from None
    if not any(n.endswith("/archive_format") for n in names):
        raise CheckpointError(f"{where}: a zip file, but not a torch.export archive")
    root = names[0].split("/", 1)[0] + "/"
    stray = [n for n in names if not n.startswith(root) or n == root]
    if stray or len(set(names)) != len(names):
        raise refuse(f"its entries are not one archive ({(stray or names)[0]!r})")
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        sizes = {r: reader.get_record_size(r) for r in reader.get_all_records()}
        bomb = inflated(infos, sizes)
        if bomb:
            raise refuse(bomb)
        seen = sorted(sizes)
        if seen != sorted(n[len(root) :] for n in names):
            raise refuse("torch's zip reader and Python's list other entries")
        programs = [m[1] for r in seen if (m := re.fullmatch(f"models/({_NAME})\\.json", r))]
        for r in seen:
            if r.startswith(_FORBIDDEN_DIRS):
                raise refuse(f"it holds compiled code ({r})")
            if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", r):
                raise refuse(f"it holds a legacy pickled payload ({r})")
            if (
                r not in _FIXED
                and not _unread(r)
                and not any(r in _per_program(n) for n in programs)
            ):
                raise refuse(f"an entry torch.export.load would read is not plain data: {r!r}")
        return {r: reader.get_record(r) for r in seen if not _unread(r)}, programs, sizes
    except CheckpointError:
        raise
    except RuntimeError as e:
        raise CheckpointError(f"{where}: not a readable .pt2 archive ({e})") from None


def _unread(record: str) -> bool:
    """A raw tensor payload (torch reads its bytes as a tensor's, never unpickled) or an extra
    file (read as text): not read by the check."""
    if re.fullmatch(r"extra/[^/]+", record):
        return True
    return any(record.startswith(d) and p.fullmatch(record[len(d) :]) for d, p in _PAYLOAD.items())


def _per_program(name: str) -> tuple[str, str, str, str]:
    """The records one program's loading reads besides the raw payloads."""
    return (
        f"models/{name}.json",
        f"data/sample_inputs/{name}.pt",
        f"data/weights/{name}_weights_config.json",
        f"data/constants/{name}_constants_config.json",
    )


def check_pt2_archive(
    src: Source | bytes, where: str | None = None, *, any_operator: bool = False
) -> None:
    """Refuse a ``.pt2`` whose loading or running could execute code from the file.

    Every record must be one that ``torch.export.load`` reads as data (an exact list: the
    programs' graphs, sample inputs and payload tables, raw tensor payloads, extra text files,
    the format's markers); then the graphs' node targets and shape expressions, the payload
    tables' entries and the sample inputs are checked.

    Args:
        src: a path, an open binary file or the archive's bytes.
        where: the name for messages (default: the path).
        any_operator: take any ATen or prims operator, not only the allowlist's (the user
            trusts the file, or compressdrop wrote it from a module in this process).

    Raises:
        CheckpointError: naming the first entry that is not plain data.
    """
    data, where = read_source(src, where)

    def refuse(what: str) -> CheckpointError:
        if _UNLISTED in what:  # the file may be fine: what a user who trusts it can do
            return CheckpointError(f"{where}: refused: {what}. {_TRUSTED}")
        return CheckpointError(
            f"{where}: refused: {what}. compressdrop loads only programs that are plain data "
            "within the sizes they state (torch.export.load alone would take this file as it is)"
        )

    strings = string_checks(functools.partial(_target, listed=not any_operator), _expr, _spec)
    try:
        records, programs, sizes = _records(data, where, refuse)
        for name in programs:
            graph, inputs, weights, constants = _per_program(name)
            for config_name, kind in ((weights, "data/weights/"), (constants, "data/constants/")):
                if config_name not in records:
                    raise refuse(f"program {name!r} has no {config_name}")
                table = json.loads(records[config_name])
                if wrong := check_schema(table, schema.PayloadConfig, strings):
                    raise refuse(f"{wrong} ({config_name})")
                for fqn, entry in table["config"].items():
                    if entry.get("use_pickle"):
                        raise refuse(f"{fqn!r} is stored as a pickle ({config_name})")
                    if not _PAYLOAD[kind].fullmatch(str(entry.get("path_name", ""))):
                        raise refuse(f"{fqn!r} is a Python object ({config_name})")
                    stored = sizes.get(kind + entry["path_name"], 0)
                    if wrong := _payload_problem(entry.get("tensor_meta") or {}, stored):
                        raise refuse(f"{fqn!r} {wrong} ({config_name})")
            if wrong := archive_problem(records[inputs]):  # before torch unpickles them
                raise refuse(f"its sample inputs are refused: {wrong} ({inputs})")
            try:
                torch.load(io.BytesIO(records[inputs]), weights_only=True)
            except Exception:
                raise refuse(f"its sample inputs are not plain tensors ({inputs})") from None
            doc = json.loads(records[graph])
            if wrong := check_schema(doc, schema.ExportedProgram, strings):
                raise refuse(wrong)
            if not _bounded_arithmetic(doc):
                raise refuse("its shape arithmetic grows without bound (a load that never ends)")
    except CheckpointError:
        raise
    except _MALFORMED as e:  # an entry that is not what its name says (a crafted archive)
        raise CheckpointError(
            f"{where}: not a readable .pt2 archive ({type(e).__name__} reading its entries)"
        ) from None
