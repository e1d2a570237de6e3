"""Complex tensors written with real ones, for the ONNX exporter.

Rotary position embeddings in complex form (DeepSeek-V2's and Llama-4's ``apply_rotary_emb``:
``torch.polar``, ``torch.view_as_complex``, a complex product, ``torch.view_as_real``) stop
``torch.onnx.export`` (torch 2.13, onnxscript 0.7.2): its translation of complex tensors covers
some operators only, not ``unsqueeze`` ("No decompositions registered for the complex-valued
input"). Here the exported program's complex values become real tensors with a last dimension of
2 (real, imaginary), as ``torch.view_as_real`` lays them out; the program is then exported again,
complex-free. A complex operator not in :data:`_RULES` is an :class:`ExportError` that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ._check import ExportError

__all__: list[str] = []  # internal to compressdrop.export

aten = torch.ops.aten
ADVICE = (
    "export_program (a .pt2 file) takes complex tensors; for ONNX, rewrite the model's complex "
    "arithmetic with real tensors (cos and sin of the rotary angles)"
)


def _is_complex(a: Any) -> bool:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def _parts(g: fx.Graph, z: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The real and imaginary parts of a pair ``(..., 2)``."""
    re = g.call_function(aten.select.int, (z, -1, 0))
    return re, g.call_function(aten.select.int, (z, -1, 1))


def _pair(g: fx.Graph, re: fx.Node, im: fx.Node) -> fx.Node:
    return g.call_function(aten.stack.default, ([re, im], -1))


def _polar(g: fx.Graph, n: fx.Node, args: list) -> fx.Node:
    r, theta = args
    cos = g.call_function(aten.cos.default, (theta,))
    sin = g.call_function(aten.sin.default, (theta,))
    return _pair(
        g, g.call_function(aten.mul.Tensor, (r, cos)), g.call_function(aten.mul.Tensor, (r, sin))
    )


def _mul(g: fx.Graph, n: fx.Node, args: list) -> fx.Node | None:
    """A product with a complex factor; ``None`` (not written) for a Python complex number."""
    a, b = args
    if _is_complex(n.args[0]) and _is_complex(n.args[1]):  # (a0 + i a1)(b0 + i b1)
        a0, a1 = _parts(g, a)
        b0, b1 = _parts(g, b)
        mul = lambda x, y: g.call_function(aten.mul.Tensor, (x, y))  # noqa: E731
        re = g.call_function(aten.sub.Tensor, (mul(a0, b0), mul(a1, b1)))
        im = g.call_function(aten.add.Tensor, (mul(a0, b1), mul(a1, b0)))
        return _pair(g, re, im)
    z, s = (a, b) if _is_complex(n.args[0]) else (b, a)
    if isinstance(s, complex):
        return None
    if isinstance(s, fx.Node):  # a real tensor: the same factor for both parts
        s = g.call_function(aten.unsqueeze.default, (s, -1))
    return g.call_function(aten.mul.Tensor, (z, s))


def _unsqueeze(g: fx.Graph, n: fx.Node, args: list) -> fx.Node:
    z, dim = args
    return g.call_function(aten.unsqueeze.default, (z, dim if dim >= 0 else dim - 1))


def _same(g: fx.Graph, n: fx.Node, args: list) -> fx.Node:
    """``view_as_complex``, ``view_as_real``: the pair as it is."""
    return args[0]


def _moved(g: fx.Graph, n: fx.Node, args: list) -> fx.Node | None:
    """``.to(device)`` of a complex tensor: the pair as it is; ``None`` (not written) for a
    conversion to a real dtype (which drops the imaginary part) or another complex one."""
    val, was = n.meta["val"], n.all_input_nodes[0].meta["val"]
    return args[0] if val.dtype == was.dtype else None


_RULES: dict[Any, Callable[[fx.Graph, fx.Node, list], fx.Node | None]] = {
    aten.polar.default: _polar,
    aten.mul.Tensor: _mul,
    aten.unsqueeze.default: _unsqueeze,
    aten.view_as_complex.default: _same,
    aten.view_as_real.default: _same,
    aten.to.dtype_layout: _moved,
    aten.to.dtype: _moved,
}


def _complex_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and (_is_complex(n) or any(map(_is_complex, n.all_input_nodes)))
    ]


def _unwritten(what: str) -> ExportError:
    return ExportError(
        f"the model computes with complex tensors (torch.view_as_complex, torch.polar: complex "
        f"rotary positions, say), which torch.onnx.export cannot convert; compressdrop writes "
        f"them with real ones, but not {what}: {ADVICE}"
    )


def real_valued(
    model: nn.Module, xs: tuple[torch.Tensor, ...], dims: tuple[dict, ...]
) -> nn.Module | None:
    """``model`` as ``torch.export`` traces it, its complex values written as real pairs (see the
    module), a module the ONNX exporter can trace again; ``None`` where no value is complex.

    Raises:
        ExportError: a complex operator this rewrite does not know; a complex input, constant
            (a buffer) or output.
    """
    gm = torch.export.export(model, xs, dynamic_shapes=dims).module()
    graph = gm.graph
    nodes = _complex_nodes(graph)
    if not nodes:
        return None
    done: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n.target is aten._assert_tensor_metadata.default:  # a check of a dtype now other
            continue
        rule = _RULES.get(n.target)
        outside = [a for a in n.all_input_nodes if _is_complex(a) and a not in done]
        if outside or (_is_complex(n) and any(u.op == "output" for u in n.users)):
            raise _unwritten(f"a complex input, constant or output of {n.target}")
        args = [done.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
        with graph.inserting_before(n):
            new = None if rule is None else rule(graph, n, args)
        if new is None:
            raise _unwritten(str(n.target))
        if _is_complex(n):
            done[n] = new
        else:  # view_as_real: the complex value leaves as a real one
            n.replace_all_uses_with(new)
    for n in reversed(nodes):  # users first
        graph.erase_node(n)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
