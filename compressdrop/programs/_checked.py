"""The allowed operators whose CPU kernels trust their arguments' shapes, called through checks.

``aten.lstm.input``, ``gru.input`` and ``rnn_tanh.input`` read each layer's weights at the sizes
the hidden state gives (weights of 4 rows for a hidden size of 4,096: a segfault), and
``scaled_dot_product_attention`` reads the values at the keys' length (keys of 64 against values
of 2 returned rows read past the values; the other way round, a segfault). The fake tensors that
measure a graph before it runs (:mod:`._measure`) take such shapes without complaint, as does
``torch.export``, so a file can hold them. :func:`~.convert.program_to_module` points each such
node at a function here that checks the shapes ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and
``F.scaled_dot_product_attention`` would have given it, then calls the operator: every run of the
module (the one at load, evaluation, pruning, export) is checked. A symbolic size (a dynamic batch
or length) is checked by ``torch._check``, which a re-export keeps as a runtime assertion.
``aten.index.Tensor`` goes through :func:`index`, which gives its 0-d indices the shape the fake
kernel measures right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import CheckpointError, brief

__all__ = ["CHECKED", "check_enum_arguments"]

aten = torch.ops.aten


class _Call:
    """The checks of one operator call: each names the argument it is about. ``sizes``: the
    call's plain size arguments are checked (a kernel, a padding, offsets), not its tensors'
    shapes against each other; the refusal says so."""

    def __init__(self, op: str, sizes: bool = False) -> None:
        self.op = op
        self.sizes = sizes

    def require(self, ok: Any, what: Callable[[], str]) -> None:
        """Refuse the call unless ``ok``: a clear error for plain sizes, ``torch._check`` for
        symbolic ones (a Python ``if`` would fix a dynamic size to this call's)."""
        if isinstance(ok, bool):
            if not ok:
                problem, harm = (
                    ("sizes its kernel does not check", "could crash the process")
                    if self.sizes
                    else ("shapes that disagree", "would read past its tensors")
                )
                raise CheckpointError(
                    f"the program calls {self.op} with {problem} ({what()}); its kernel "
                    f"{harm}, so it is not run"
                )
        else:
            torch._check(ok, lambda: f"{self.op}: {what()}")

    def shape(self, name: str, t: Any, want: Sequence[Any]) -> None:
        """``t`` is a tensor of the shape ``want`` (``None``: any size there)."""
        self.require(isinstance(t, torch.Tensor), lambda: f"{name} is not a tensor")
        self.require(
            t.dim() == len(want), lambda: f"{name} has {t.dim()} dimensions, not {len(want)}"
        )
        for got, exp in zip(t.shape, want):
            if exp is not None:
                self.require(got == exp, lambda: f"{name} is {_dims(t.shape)}, not {_dims(want)}")


def _check_rnn(
    op: str, gates: int, input: Any, hx: Any, params: Any, flags: tuple[Any, ...]
) -> None:
    """The checks ``nn.LSTM`` (``nn.GRU``, ``nn.RNN``) makes before it calls ``op``: hidden
    states of (layers × directions, batch, size), and per layer and direction the input weights
    (gates × size, the layer's input size), the recurrent ones (gates × size, the output size),
    the biases, and an LSTM's projection (output size, size) when it has one."""
    has_biases, num_layers, _, _, bidirectional, batch_first = flags
    c, has_cell = _Call(op), op == "aten.lstm.input"
    states = list(hx) if has_cell else [hx]
    directions = 2 if bidirectional else 1
    c.shape("the input", input, (None, None, None))
    c.require(len(states) == 1 + has_cell, lambda: f"{len(states)} hidden states")
    c.require(len(params) >= 2, lambda: f"{len(params)} weights")
    c.shape("layer 0's recurrent weight", params[1], (None, None))
    size = params[1].shape[0] // gates  # the weights' sizes; the states are judged by them
    out = params[1].shape[1]
    # a projection where the output size is not the hidden size, as the kernel decides (from the
    # states, checked against these sizes below); nn.LSTM's is smaller, and only an LSTM's
    proj = int(bool(out != size))
    c.require(out < size if proj else True, lambda: f"a projection to {out} of {size} units")
    c.require(has_cell or not proj, lambda: f"recurrent weights of {out} columns for {size} units")
    per = 2 + 2 * bool(has_biases)
    n = num_layers * directions * (per + proj)
    c.require(len(params) == n, lambda: f"{len(params)} weights for {num_layers} layers")
    batch = input.shape[0 if batch_first else 1]
    cell = states[-1]
    c.shape("the hidden state", states[0], (num_layers * directions, batch, out))
    if has_cell:
        c.shape("the cell state", cell, (num_layers * directions, batch, size))
    width = input.shape[2]
    for i in range(num_layers * directions):
        layer, w = i // directions, params[i * (per + proj) : (i + 1) * (per + proj)]
        at = f"layer {layer}'s"
        c.shape(f"{at} input weight", w[0], (gates * size, out * directions if layer else width))
        c.shape(f"{at} recurrent weight", w[1], (gates * size, out))
        if has_biases:
            c.shape(f"{at} input bias", w[2], (gates * size,))
            c.shape(f"{at} recurrent bias", w[3], (gates * size,))
        if proj:
            c.shape(f"{at} projection", w[per], (out, size))


def lstm(input: Any, hx: Any, params: Any, *flags: Any) -> Any:
    """``aten.lstm.input`` after :func:`_check_rnn`."""
    _check_rnn("aten.lstm.input", 4, input, hx, params, flags)
    return aten.lstm.input(input, hx, params, *flags)


def gru(input: Any, hx: Any, params: Any, *flags: Any) -> Any:
    """``aten.gru.input`` after :func:`_check_rnn`."""
    _check_rnn("aten.gru.input", 3, input, hx, params, flags)
    return aten.gru.input(input, hx, params, *flags)


def rnn_tanh(input: Any, hx: Any, params: Any, *flags: Any) -> Any:
    """``aten.rnn_tanh.input`` after :func:`_check_rnn`."""
    _check_rnn("aten.rnn_tanh.input", 1, input, hx, params, flags)
    return aten.rnn_tanh.input(input, hx, params, *flags)


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """``aten.scaled_dot_product_attention`` after the checks of the CPU kernels that trust
    them: keys and values of one length, queries and keys of one width, the same batch, and as
    many heads (a multiple of the keys' for grouped-query attention)."""
    c = _Call("aten.scaled_dot_product_attention")
    q, k, v = query, key, value
    c.shape("the queries", q, (None,) * max(q.dim(), 2))
    rank = q.dim()
    lead, heads = tuple(q.shape[:-3]), (k.shape[-3],) if rank >= 3 else ()
    c.shape("the keys", k, (*lead, *heads, None, q.shape[-1]))
    c.shape("the values", v, (*lead, *heads, k.shape[-2], None))
    if rank >= 3:
        gqa = bool(kwargs.get("enable_gqa", False))  # keyword-only in its schema
        n, m = q.shape[-3], k.shape[-3]
        if gqa:  # grouped-query attention: each key head serves a group of query heads
            c.require(m > 0, lambda: "keys of no heads")
        c.require(n % m == 0 if gqa else n == m, lambda: f"{n} query heads for {m} key heads")
    return aten.scaled_dot_product_attention.default(query, key, value, *args, **kwargs)


def _check_window(op: str, args: Sequence[Any]) -> None:
    """``col2im`` and ``im2col`` keep their sizes, kernel, dilation, padding and stride as 32-bit
    ints: a padding of 2**31 or 2**32 crashed ``col2im``, a dilation or stride of 2**32 + 1 was
    taken as 1. Each must be a pair of ints from 0 to 2**31 - 1."""
    c = _Call(op, sizes=True)
    for i, pair in enumerate(args):
        _check_pair(c, f"argument {i + 1} is {brief(pair)}", pair)


def _check_pair(c: _Call, shown: str, pair: Any, n: int | None = 2) -> None:
    """``pair`` is a list of ``n`` ints (any number: None) from 0 to 2**31 - 1."""
    ok = isinstance(pair, (list, tuple)) and (n is None or len(pair) == n)
    c.require(ok, lambda: f"{shown}, not a list of {n or 'some'} ints")
    ok = all(isinstance(v, torch.SymInt) or (isinstance(v, int) and 0 <= v < 2**31) for v in pair)
    c.require(ok, lambda: f"{shown}, not from 0 to 2**31 - 1")


def max_pool1d(input: Any, *args: Any, **kwargs: Any) -> Any:
    """``aten.max_pool1d`` (``nn.MaxPool1d``) with a kernel, stride, padding and dilation from 0 to
    2**31 - 1: its CPU kernel sized its loop before it checked them (a kernel of 2**63 - 1
    segfaulted, one of 2**62 ran on without end, a dilation of 2**32 + 1 was taken as 1)."""
    c = _Call("aten.max_pool1d.default", sizes=True)
    names = ("kernel_size", "stride", "padding", "dilation")
    given = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
    for name, value in given.items():
        value = [value] if isinstance(value, int) else value
        _check_pair(c, f"its {name} is {brief(value)}", value, None)
    return aten.max_pool1d.default(input, *args, **kwargs)


def col2im(input: Any, *args: Any) -> Any:
    """``aten.col2im`` (``nn.Fold``) after :func:`_check_window`."""
    _check_window("aten.col2im.default", args)
    return aten.col2im.default(input, *args)


def im2col(input: Any, *args: Any) -> Any:
    """``aten.im2col`` (``nn.Unfold``) after :func:`_check_window`."""
    _check_window("aten.im2col.default", args)
    return aten.im2col.default(input, *args)


def _check_bags(op: str, indices: Any, offsets: Any, last: Any) -> None:
    """An embedding bag of no bags (offsets of none, or of one with ``include_last_offset``)
    crashed the CPU kernel in max mode or with a padding index: there must be one."""
    c = _Call(op, sizes=True)
    c.shape("the indices", indices, (None,))
    c.shape("the offsets", offsets, (None,))
    bags = offsets.shape[0] - (1 if last else 0)
    c.require(bags >= 1, lambda: f"offsets of {offsets.shape[0]} make no bag")


def _embedding_bag(weight: Any, indices: Any, offsets: Any, *args: Any, **kwargs: Any) -> Any:
    """``aten._embedding_bag`` (``nn.EmbeddingBag``, decomposed) after :func:`_check_bags`."""
    last = args[4] if len(args) > 4 else kwargs.get("include_last_offset", False)
    _check_bags("aten._embedding_bag.default", indices, offsets, last)
    return aten._embedding_bag.default(weight, indices, offsets, *args, **kwargs)


def embedding_bag(weight: Any, indices: Any, offsets: Any, *args: Any, **kwargs: Any) -> Any:
    """``aten.embedding_bag.padding_idx`` (``nn.EmbeddingBag``) after :func:`_check_bags`."""
    last = args[4] if len(args) > 4 else kwargs.get("include_last_offset", False)
    _check_bags("aten.embedding_bag.padding_idx", indices, offsets, last)
    return aten.embedding_bag.padding_idx(weight, indices, offsets, *args, **kwargs)


def index(input: Any, indices: Any) -> Any:
    """``aten.index.Tensor`` (``x[i, j]``) with each 0-d integer index beside a longer one made a
    1-element index: the same result (they broadcast alike), whose size the fake tensors then
    measure right. Torch 2.13's fake kernel drops the broadcast dimensions where a 0-d index
    follows a longer one (``x(2, 3, 1000)[i(2), j()]``: ``(1000,)`` for the real ``(2, 1000)``),
    so a graph's tensors could come to many times what :mod:`._measure` found before it ran."""
    if isinstance(indices, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dim() > 0 for t in indices
    ):
        indices = [
            t.reshape(1) if isinstance(t, torch.Tensor) and t.dim() == 0 and not _bool(t) else t
            for t in indices
        ]
    return aten.index.Tensor(input, indices)


def _bool(t: torch.Tensor) -> bool:  # a 0-d mask adds a dimension: not the same as a (1,) one
    return t.dtype == torch.bool or t.dtype == torch.uint8


#: the schema types whose values the kernels look up by number without a bound (a ScalarType
#: of -1 or a MemoryFormat of -100 read past a table: a segfault, in the fake kernels too), and
#: the constant a program's node must hold for them
_ENUMS: dict[str, type] = {
    "ScalarType": torch.dtype,
    "Layout": torch.layout,
    "MemoryFormat": torch.memory_format,
}


def check_enum_arguments(gm: torch.nn.Module, where: str) -> None:
    """Refuse a program whose node passes anything but a constant dtype, layout or memory format
    (or None) where an operator's schema takes one: ``torch.export.load`` takes an ``as_int``
    (or a node's output) there as well, and ATen turns the number into the enum unchecked.

    Raises:
        CheckpointError: naming ``where``, the operator, the argument and the value.
    """
    for mod in gm.modules():
        graph = getattr(mod, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            for i, arg in enumerate(node.target._schema.arguments):
                kind = str(arg.real_type).removeprefix("Optional[").removesuffix("]")
                want = _ENUMS.get(kind)
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if want is None or value is None or isinstance(value, want):
                    continue
                shown = brief(value) if not isinstance(value, torch.fx.Node) else "a computed value"
                raise CheckpointError(
                    f"{where}: the program passes {shown} as the {arg.name} of {node.target}, "
                    f"where a {kind} belongs; its kernel would use the number unchecked, so it "
                    "is not run"
                )


def _dims(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


#: each checked operator and the function a program's node calls instead
CHECKED: dict[Any, Callable[..., Any]] = {
    aten.lstm.input: lstm,
    aten.gru.input: gru,
    aten.rnn_tanh.input: rnn_tanh,
    aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    aten.col2im.default: col2im,
    aten.im2col.default: im2col,
    aten._embedding_bag.default: _embedding_bag,
    aten.embedding_bag.padding_idx: embedding_bag,
    aten.max_pool1d.default: max_pool1d,
    aten.index.Tensor: index,
}
