"""A ``torch.export`` program's ATen graph turned back into ``nn`` modules.

:func:`program_to_module` turns the ATen calls that are layers (``linear``, ``conv1d/2d/3d``,
``batch_norm``, ``layer_norm``, ``embedding``) back into the ``nn`` modules they came from, at the
program's own parameter names, so that Torch-Pruning's dependency graph and the surgery see
ordinary layers. A ``view``/``reshape`` that flattens everything after the batch dimension becomes
``flatten(x, 1)``, so that it still fits once channels are removed.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from ._checked import CHECKED
from ._inputs import check_inputs, input_dims

__all__ = ["ProgramModule", "program_to_module"]

aten = torch.ops.aten


def _layer(node: fx.Node, params: dict[str, torch.Tensor]) -> tuple[nn.Module, str] | None:
    """The ``nn`` module an ATen layer call came from and the name it had, or None."""
    # each position's type is fixed by the op's ATen schema (a tensor node, int[], float, ...);
    # fx types every argument as its wide ``Argument`` union
    args: list[Any] = [*node.args, *[None] * 10]
    embedding = node.target is aten.embedding.default
    first = args[0] if embedding else args[2] if node.target is aten.layer_norm.default else args[1]
    if not (
        isinstance(first, fx.Node)
        and first.op == "get_attr"
        and isinstance(first.target, str)  # a get_attr's target is always its name
        and first.target in params
    ):
        return None
    prefix = first.target.rpartition(".")[0]

    def tensor(a: Any) -> torch.Tensor | None:
        if isinstance(a, fx.Node) and a.op == "get_attr" and isinstance(a.target, str):
            return params.get(a.target)
        return None

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
        bn = kind[val.dim()](w.shape[0], momentum=float(args[6]), eps=float(args[7]))
        # built with track_running_stats (the default): the buffers its type leaves optional exist
        assert bn.running_mean is not None and bn.running_var is not None
        assert bn.num_batches_tracked is not None
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        tracked = params.get(f"{prefix}.num_batches_tracked")
        if tracked is not None:
            bn.num_batches_tracked.copy_(tracked)
        m = bn
    elif node.target is aten.layer_norm.default:
        eps = float(args[4]) if args[4] is not None else 1e-5
        m = nn.LayerNorm(list(args[1]), eps=eps, bias=b is not None)
    elif embedding:
        pad = args[2] if args[2] is not None and args[2] >= 0 else None
        m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=pad)
    else:
        return None
    m = m.to(dtype=w.dtype)  # a bf16 or float64 program keeps its dtype (the copies are exact)
    with torch.no_grad():
        # every layer built above has a weight and, when ``b`` is given, a bias; nn.Module types
        # attribute access as ``Tensor | Module``
        cast(torch.Tensor, m.weight).copy_(w)
        if b is not None:
            cast(torch.Tensor, m.bias).copy_(b)
    return m, prefix


# the conv class of each ATen conv; called with a kernel size as long as the weight's spatial rank,
# which the classes' own types (an int or a tuple of exactly 1, 2 or 3) cannot say
_CONVS: dict[Any, Callable[..., nn.Module]] = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
}


def program_to_module(program: torch.export.ExportedProgram) -> ProgramModule:
    """An ``fx.GraphModule`` with the program's layers as ``nn`` modules (module docstring).

    Its ``state_dict`` keys are the program's parameter names, so the original model's
    ``state_dict`` loads into it. A layer whose parameters sit on a module that has children of
    its own stays an ATen call (it is then not prunable, and attach says so).

    Args:
        program: the exported program, e.g. from :func:`~compressdrop.programs.load_program_safely`.

    Returns:
        The module, in eval mode.
    """
    # no guard module: torch builds its Python source from the graph's inputs, a string input's
    # value pasted in unquoted-safe ('{value}'), and runs it (a crafted .pt2 ran code here)
    gm = program.module(check_guards=False)
    _check_shapes(gm)
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
        # the holder of the layer's parameters: a module, never a None placeholder
        holder = cast(nn.Module, parent._modules[leaf])
        if list(holder.children()) or _loses_a_read_tensor(graph, node, holder, module, prefix):
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
    module = ProgramModule(gm, graph).eval()
    # torch's input check went with the guards (and the program's own module): ours, from numbers
    module.program_inputs = input_dims(graph, program.range_constraints)  # type: ignore[assignment]
    module.register_forward_pre_hook(check_inputs)
    longest = _length_bound(program)
    if longest is not None:  # read by compressdrop.runtime.max_length when it is exported
        # nn.Module.__setattr__ is typed for tensors and modules only; any value may be set
        module.program_max_length = longest  # type: ignore[assignment]
    return module


def _check_shapes(gm: fx.GraphModule) -> None:
    """Point the calls of the operators whose kernels trust their arguments' shapes at
    :data:`._checked.CHECKED`'s checks, in the graph and in its subgraphs (``cond``'s branches,
    the grad-mode and autocast wrappers' bodies)."""
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        found = [n for n in sub.graph.nodes if n.op == "call_function" and n.target in CHECKED]
        for node in found:
            node.target = CHECKED[node.target]
        if found and sub is not gm:  # the root's code is made when ProgramModule is built
            sub.recompile()


def _length_bound(program: torch.export.ExportedProgram) -> int | None:
    """The most its only input's dimension 1 may be where that dimension is dynamic (token ids
    of any length up to a position table's): the upper end of its exported range."""
    inputs = [
        s.arg.name
        for s in program.graph_signature.input_specs
        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    val = nodes[inputs[0]].meta.get("val") if len(inputs) == 1 and inputs[0] in nodes else None
    if val is None or val.dim() < 2 or not isinstance(val.shape[1], torch.SymInt):
        return None
    ranges = program.range_constraints.get(val.shape[1].node.expr)
    upper = getattr(ranges, "upper", None)
    return int(upper) if upper is not None and getattr(upper, "is_finite", False) else None


def _loses_a_read_tensor(
    graph: fx.Graph, node: fx.Node, holder: nn.Module, layer: nn.Module, prefix: str
) -> bool:
    """Whether the holder has a tensor the layer built for it lacks that another node reads: a
    bias the program computes before the call (Swin V2 zeroes part of ``qkv.bias`` and passes the
    copy) leaves the layer without one, while the original is still read; the call then stays."""
    own = {n for n, _ in [*layer.named_parameters(), *layer.named_buffers()]}
    held = [n for n, _ in [*holder.named_parameters(), *holder.named_buffers()] if n not in own]
    lost = {f"{prefix}.{n}" for n in held}
    return any(
        n.op == "get_attr" and n.target in lost and any(u is not node for u in n.users)
        for n in graph.nodes
    )


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
        if "program_inputs" in vars(self):  # GraphModule's copy keeps no forward hooks
            res.register_forward_pre_hook(check_inputs)
        # GraphModule.__deepcopy__ builds type(self), but is typed as returning a GraphModule
        return res  # type: ignore[return-value]


def _flatten_if_it_is_one(graph: fx.Graph, node: fx.Node) -> None:
    """``view(x, [B, prod(rest)])`` of an input of rank > 2 → ``flatten(x, 1)``."""
    # aten.view/reshape(Tensor self, SymInt[] size): the size is a list
    x, shape = node.args[0], cast(Sequence[Any], node.args[1])
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
