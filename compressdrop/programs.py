"""``torch.export`` programs (``.pt2``) in: checked so that loading runs no code, then turned into
modules that compressdrop can gate and prune.

**Safety.** ``torch.export.load`` is not safe on an untrusted file (PyTorch 2.13,
``torch/export/pt2_archive`` and ``torch/_export/serde``): a weight, constant or custom object
marked ``use_pickle`` is unpickled with ``weights_only=False``; sample inputs that fail the
weights-only unpickler are retried with full pickle; symbolic shape expressions are parsed with
``sympy.sympify``, which evaluates Python; ``guards_code`` strings become Python that runs on every
call; a node's target may name any attribute of ``torch`` (``torch.load``, ``torch.hub.load``, ...);
an AOTInductor entry is a compiled library. :func:`load_program_safely` reads the archive's JSON and
payload tables first and refuses all of these, then loads the program with the guards dropped
(they only re-check input shapes).

**Modules.** :func:`program_to_module` turns the ATen calls that are layers (``linear``,
``conv1d/2d/3d``, ``batch_norm``, ``layer_norm``, ``embedding``) back into the ``nn`` modules they
came from, at the program's own parameter names, so that Torch-Pruning's dependency graph and the
surgery see ordinary layers. A ``view``/``reshape`` that flattens everything after the batch
dimension becomes ``flatten(x, 1)``, so that it still fits once channels are removed.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import fx, nn

from .errors import CheckpointError

__all__ = [
    "check_pt2_archive",
    "is_pt2",
    "load_program",
    "load_program_safely",
    "program_record",
    "program_to_module",
]

aten = torch.ops.aten
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
    """Whether ``path`` is a ``torch.export`` archive (a zip holding ``*/archive_format``)."""
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
                        raise refuse(f"a shape expression is not arithmetic: {str(value)[:80]!r}")
                    if key == "custom_obj_values" and value:
                        raise refuse("it holds custom Python objects")
        if not any(n.endswith("/archive_format") for n in names):
            raise CheckpointError(f"{where}: a zip file, but not a torch.export archive")


def load_program_safely(
    src: Source | bytes, where: str | None = None
) -> torch.export.ExportedProgram:
    """:func:`check_pt2_archive`, then ``torch.export.load`` with the guards dropped."""
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


def load_program(src: Source | bytes, where: str | None = None) -> nn.Module:
    """A ``.pt2`` as a gateable, prunable module that records itself as its ``arch``.

    The module's ``arch`` is ``{"program": <the archive's bytes>, "input_shape": [...]}``, so a
    compressdrop checkpoint of it (dense, gated or slim) rebuilds the structure from the program,
    without any model code.
    """
    data, where = _read(src, where)
    model = program_to_module(load_program_safely(data, where))
    model.arch = {"program": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    shape = _input_shape(model)
    if shape is not None:
        model.arch["input_shape"] = list(shape)
    return model


def program_record(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """An ``arch`` record for a model with no factory (a pickled module, say): its dense structure
    exported as a program, so that its checkpoints rebuild without pickled code.

    Raises:
        CheckpointError: ``torch.export`` cannot capture the model.
    """
    was = model.training
    model.eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},))
    except Exception as e:
        raise CheckpointError(
            f"torch.export cannot capture {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}), so its structure cannot be saved "
            "without pickled code"
        ) from None
    finally:
        model.train(was)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return {
        "program": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
        "input_shape": list(example_input.shape[1:]),
    }


def _input_shape(gm: nn.Module) -> tuple[int, ...] | None:
    """One example's static shape from the program's only input, if it has one."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if val is None or not all(isinstance(s, int) for s in val.shape[1:]):
        return None
    return tuple(int(s) for s in val.shape[1:])


def _layer(node: fx.Node, params: dict[str, torch.Tensor]) -> tuple[nn.Module, str] | None:
    """The ``nn`` module an ATen layer call came from and the name it had, or None."""
    args = [*node.args, *[None] * 10]
    embedding = node.target is aten.embedding.default
    first = args[0] if embedding else args[2] if node.target is aten.layer_norm.default else args[1]
    if not (isinstance(first, fx.Node) and first.op == "get_attr" and first.target in params):
        return None
    prefix = first.target.rpartition(".")[0]

    def tensor(a: Any) -> torch.Tensor | None:
        return params.get(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None

    w = params[first.target]
    b = tensor(args[3] if node.target is aten.layer_norm.default else args[2])
    m: nn.Module
    if node.target is aten.linear.default:
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    elif node.target in _CONVS:
        stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
        if isinstance(padding, str):  # "same"/"valid": keep the ATen call
            return None
        m = _CONVS[node.target](
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=b is not None,
        )
    elif node.target is aten.batch_norm.default:
        mean, var = tensor(args[3]), tensor(args[4])
        val = args[0].meta.get("val") if isinstance(args[0], fx.Node) else None
        kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
        if mean is None or var is None or b is None or val is None or val.dim() not in kind:
            return None
        m = kind[val.dim()](w.shape[0], momentum=float(args[6]), eps=float(args[7]))
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        tracked = params.get(f"{prefix}.num_batches_tracked")
        if tracked is not None:
            m.num_batches_tracked.copy_(tracked)
    elif node.target is aten.layer_norm.default:
        eps = float(args[4]) if args[4] is not None else 1e-5
        m = nn.LayerNorm(list(args[1]), eps=eps, bias=b is not None)
    elif embedding:
        pad = args[2] if args[2] is not None and args[2] >= 0 else None
        m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=pad)
    else:
        return None
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m, prefix


_CONVS = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
}


def program_to_module(program: torch.export.ExportedProgram) -> nn.Module:
    """An ``fx.GraphModule`` with the program's layers as ``nn`` modules (module docstring).

    Its ``state_dict`` keys are the program's parameter names, so the original model's
    ``state_dict`` loads into it. A layer whose parameters sit on a module that has children of
    its own stays an ATen call (it is then not prunable, and attach says so).
    """
    gm = program.module()
    params = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    graph = gm.graph
    done: set[str] = set()
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)  # input-shape guards; the inputs' shapes do not change
            continue
        if node.op != "call_function":
            continue
        if node.target in (aten.view.default, aten.reshape.default):
            _flatten_if_it_is_one(graph, node)
            continue
        found = _layer(node, params)
        if found is None or not found[1] or found[1] in done:
            continue
        module, prefix = found
        parent_name, _, leaf = prefix.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        if list(parent._modules[leaf].children()):
            continue
        parent._modules[leaf] = module  # the holder of weight/bias becomes the layer itself
        done.add(prefix)
        x = node.args[1] if node.target is aten.embedding.default else node.args[0]
        with graph.inserting_before(node):
            new = graph.call_module(prefix, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in list(graph.nodes):  # the loose references to the layers' weights
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    # a plain GraphModule: the program's own refuses train()/eval(), which training needs
    return ProgramModule(gm, graph).eval()


class ProgramModule(fx.GraphModule):
    """The module :func:`program_to_module` returns: an ``fx.GraphModule`` that keeps the
    attributes compressdrop sets (``arch``, the gating state, the prune report) when copied, which
    ``GraphModule.__deepcopy__`` does not."""

    def __deepcopy__(self, memo: dict[int, Any]) -> ProgramModule:
        with warnings.catch_warnings():
            # torch 2.13's own pytree deprecation, raised inside GraphModule's copy
            warnings.filterwarnings("ignore", "`isinstance\\(treespec", FutureWarning)
            res = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key not in res.__dict__:
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res  # type: ignore[return-value]


def _flatten_if_it_is_one(graph: fx.Graph, node: fx.Node) -> None:
    """``view(x, [B, prod(rest)])`` of an input of rank > 2 → ``flatten(x, 1)``."""
    x, shape = node.args[0], node.args[1]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or val.dim() <= 2 or len(shape) != 2:
        return
    rest = val.shape[1:]
    if any(not isinstance(s, int) for s in rest) or not isinstance(shape[1], int):
        return
    if shape[1] not in (-1, math.prod(rest)):
        return
    with graph.inserting_before(node):
        new = graph.call_function(aten.flatten.using_ints, (x, 1))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
