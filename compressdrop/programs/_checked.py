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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["CHECKED"]

aten = torch.ops.aten


class _Call:
    """The checks of one operator call: each names the argument it is about."""

    def __init__(self, op: str) -> None:
        self.op = op

    def require(self, ok: Any, what: Callable[[], str]) -> None:
        """Refuse the call unless ``ok``: a clear error for plain sizes, ``torch._check`` for
        symbolic ones (a Python ``if`` would fix a dynamic size to this call's)."""
        if isinstance(ok, bool):
            if not ok:
                raise CheckpointError(
                    f"the program calls {self.op} with shapes that disagree ({what()}); its "
                    "kernel would read past its tensors, so it is not run"
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


def _dims(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


#: each checked operator and the function a program's node calls instead
CHECKED: dict[Any, Callable[..., Any]] = {
    aten.lstm.input: lstm,
    aten.gru.input: gru,
    aten.rnn_tanh.input: rnn_tanh,
    aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
}
