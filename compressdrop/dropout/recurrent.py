"""Recurrent dropout: LSTM and GRU layers with the four published schemes (the schemes' shared
machinery and the LSTM here; the GRU in :mod:`compressdrop.dropout.gru`).

``LSTM`` and ``GRU`` are drop-in subclasses of ``nn.LSTM`` / ``nn.GRU`` (same parameters, same
``state_dict``, same output tuple). With ``scheme="none"`` or ``p=0``, and always in eval mode, they
run PyTorch's fused kernel, so eval mode exports to ONNX as the standard ``LSTM``/``GRU`` operator.
While sampling (training, or Monte-Carlo mode) the recurrence is unrolled in Python so that masks
can enter it. Every scheme uses inverted scaling (a kept value is divided by q = 1 − p), so eval
mode is the plain network.

Schemes (``m`` a Bernoulli(q) mask / q; "per step" masks are fresh at each time step, "per
sequence" masks are drawn once per sequence and reused at every step):

* ``"zaremba"``: dropout on the non-recurrent connections only: each layer's input and the last
  layer's output, per step; the recurrent path h_{t-1} → h_t is never dropped.
  Zaremba, Sutskever & Vinyals, "Recurrent Neural Network Regularization", arXiv:1409.2329, 2014.
* ``"moon"`` (RNNDrop, LSTM only): one mask per sequence on the memory cell,
  c_t = m₀₁ ⊙ (f ⊙ c_{t−1} + i ⊙ g), where m₀₁ is the 0/1 mask; the 1/q rescaling is applied to the
  cell's output h_t = o ⊙ tanh(c_t) / q rather than to the carried cell (rescaling the carried cell
  would compound over time steps). A dropped unit forgets its memory for the whole sequence.
  Moon, Choi, Lee & Song, "RNNDROP: A Novel Dropout for RNNs in ASR", ASRU 2015.
* ``"semeniuta"``: recurrent dropout without memory loss: per step dropout on the cell update only,
  c_t = f ⊙ c_{t−1} + i ⊙ (m ⊙ g) (GRU: h_t = (1 − z) ⊙ (m ⊙ n) + z ⊙ h_{t−1}); the carried part
  f ⊙ c_{t−1} is never touched. Semeniuta, Severyn & Barth, "Recurrent Dropout without Memory Loss",
  COLING 2016.
* ``"gal"``: variational RNN dropout: per sequence masks on every layer's input, on the hidden state
  fed back into the recurrence, and on the last layer's output (one mask for all four gates: the
  "tied" variant). Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
  Neural Networks", NeurIPS 2016.

``record_masks=True`` keeps the masks of the last sampling forward pass in ``last_masks`` (name →
tensor of shape (T, B, features), 0 or 1/q), for inspection and tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .layers import _check_p

__all__ = ["LSTM", "SCHEMES", "RecurrentDropout", "tracing"]

SCHEMES = ("none", "zaremba", "moon", "semeniuta", "gal")


class _Masks:
    """Draws and records the masks of one forward pass."""

    def __init__(self, p: float, batch: int, steps: int, like: torch.Tensor, record: bool) -> None:
        self.q = 1.0 - p
        self.batch, self.steps, self.like = batch, steps, like
        self.record: dict[str, list[torch.Tensor]] | None = {} if record else None

    def draw(self, features: int) -> torch.Tensor:
        keep = torch.full((self.batch, features), self.q, device=self.like.device)
        return torch.bernoulli(keep).to(self.like.dtype)

    def note(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        if self.record is not None:
            self.record.setdefault(name, []).append(mask.detach())
        return mask


class RecurrentDropout:
    """Mixin of :class:`LSTM` and :class:`GRU`: the dropout scheme, its rate and their checks.

    It comes before the ``torch.nn`` recurrent class in the bases and takes that class's arguments
    plus ``scheme``, ``p`` and ``record_masks``. As on a
    :class:`~compressdrop.dropout.layers.StochasticLayer`, the ``mc`` flag makes eval mode sample
    (Monte-Carlo dropout); ``scheme="none"`` or ``p = 0`` means no noise at all.
    """

    kind = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        scheme: str = "none",
        p: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        record_masks: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first, **kwargs
        )
        self._setup(scheme, p, record_masks)

    def _setup(self, scheme: str, p: float, record_masks: bool) -> None:
        if scheme not in SCHEMES:
            raise InputError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme == "moon" and self.kind == "GRU":
            raise InputError("scheme 'moon' (RNNDrop) drops the LSTM memory cell; a GRU has none")
        if self.bidirectional or getattr(self, "proj_size", 0):  # type: ignore[attr-defined]
            raise InputError("bidirectional and projected recurrent layers are not supported")
        self.scheme, self.p = scheme, _check_p(p)
        self.record_masks = bool(record_masks)
        self.last_masks: dict[str, torch.Tensor] = {}
        self.mc = False

    @property
    def sampling(self) -> bool:
        """Whether a forward pass draws masks: training or ``mc`` set, a scheme, and p > 0."""
        return (self.training or self.mc) and self.scheme != "none" and self.p > 0  # type: ignore[attr-defined]

    def _weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        w = [getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")]
        if self.bias:  # type: ignore[attr-defined]
            w += [getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")]
        return tuple(w)

    def _sequence_masks(
        self, masks: _Masks, sample: bool, in_features: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gal's per-sequence masks on a layer's input and on its fed-back hidden state."""
        if not (sample and self.scheme == "gal"):
            return None, None
        H = self.hidden_size  # type: ignore[attr-defined]
        return masks.draw(in_features) / masks.q, masks.draw(H) / masks.q

    def _input_dropout(
        self, inp: torch.Tensor, layer: int, masks: _Masks, sample: bool, m_in
    ) -> torch.Tensor:
        """A layer's input at one step: Zaremba's fresh mask, or Gal's sequence mask."""
        if sample and self.scheme == "zaremba":
            return inp * masks.note(f"l{layer}.input", masks.draw(inp.shape[-1]) / masks.q)
        if m_in is not None:
            return inp * masks.note(f"l{layer}.input", m_in)
        return inp

    def _output_dropout(self, y: torch.Tensor, masks: _Masks) -> torch.Tensor:
        """The last layer's output (T, B, H): per step (Zaremba) or per sequence (Gal)."""
        if self.scheme not in ("zaremba", "gal"):
            return y
        steps, H = y.shape[0], y.shape[-1]
        if self.scheme == "zaremba":
            m_out = torch.stack([masks.draw(H) for _ in range(steps)]) / masks.q
        else:
            m_out = (masks.draw(H) / masks.q).expand(steps, -1, -1)
        for m in m_out:
            masks.note("output", m)
        return y * m_out

    def _time_major(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{self.kind} with dropout does not take PackedSequence input")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:  # type: ignore[attr-defined]
            x = x.transpose(0, 1)
        return x, unbatched

    def _finish(self, out: torch.Tensor, unbatched: bool, masks: _Masks) -> torch.Tensor:
        if masks.record is not None:
            self.last_masks = {k: torch.stack(v) for k, v in masks.record.items()}
        if unbatched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out  # type: ignore[attr-defined]


class LSTM(RecurrentDropout, nn.LSTM):
    """``nn.LSTM`` with a recurrent dropout ``scheme`` (see the module docstring) and rate ``p``.

    ``batch_first`` defaults to True here. Beyond ``nn.LSTM``'s parameters it holds one buffer,
    ``out_scale`` (ones; shape ``(hidden_size,)``), that multiplies the last layer's output and its
    final hidden state: pruning folds the gates' E[θ] into it. A ``state_dict`` of a plain
    ``nn.LSTM`` loads (``out_scale`` stays ones).

    ``unrolled(x, hx, hidden_scale)``: ``hidden_scale`` (used by compressdrop's gates, shape
    ``(batch, hidden_size)``) multiplies a one-layer LSTM's hidden state, in the recurrence and in
    the output, by a per-sequence factor.

    Args:
        input_size, hidden_size, num_layers: as for ``nn.LSTM``.
        scheme: one of :data:`SCHEMES`.
        p: drop probability of the scheme's masks, in [0, 1).
        record_masks: keep the last sampling pass's masks in ``last_masks``.
        **kwargs: ``nn.LSTM``'s other options (``bias``, ``batch_first``, ...); bidirectional and
            projected layers are not supported.

    Raises:
        InputError: an unknown scheme, a bad ``p``, or a bidirectional or projected layer.
    """

    kind = "LSTM"
    # set by nn.LSTM (parameters of layer 0) and by __init__ (buffer); declared for type checkers
    weight_ih_l0: torch.Tensor
    weight_hh_l0: torch.Tensor
    bias_ih_l0: torch.Tensor
    bias_hh_l0: torch.Tensor
    out_scale: torch.Tensor

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs: Any):
        super().__init__(input_size, hidden_size, num_layers, **kwargs)
        self.register_buffer("out_scale", torch.ones(hidden_size))
        self._tracing = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "out_scale" not in state_dict:  # a plain nn.LSTM's state_dict
            state_dict[prefix + "out_scale"] = torch.ones_like(self.out_scale)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, hx=None):
        """``(output, (h_n, c_n))`` as ``nn.LSTM`` returns them, ``out_scale`` applied.

        While sampling the recurrence is unrolled with the scheme's masks; otherwise PyTorch's
        fused kernel runs.
        """
        if self._tracing:
            return _trace_outputs(self, x)
        if not self.sampling:
            y, (h, c) = super().forward(x, hx)
            return y * self.out_scale, (_scale_last(h, self.out_scale), c)
        return self.unrolled(x, hx)

    def unrolled(self, x, hx=None, hidden_scale: torch.Tensor | None = None):
        """The recurrence unrolled in Python, with the scheme's masks while sampling.

        Args:
            x: input of shape ``(B, T, F)`` (``batch_first``), ``(T, B, F)`` or unbatched
                ``(T, F)``.
            hx: initial ``(h_0, c_0)``, each ``(num_layers, B, H)`` (``(num_layers, H)``
                unbatched); zeros by default.
            hidden_scale: a per-sequence factor ``(B, H)`` on a one-layer LSTM's hidden state, in
                the recurrence and in the output (compressdrop's gates use it).

        Returns:
            ``(output, (h_n, c_n))`` as :meth:`forward` returns them.

        Raises:
            TypeError: ``x`` is a ``PackedSequence``.
        """
        xs, unbatched = self._time_major(x)
        steps, batch, _ = xs.shape
        sample = self.sampling
        masks = _Masks(self.p, batch, steps, xs, self.record_masks and sample)
        H, L = self.hidden_size, self.num_layers
        if hx is None:
            h0 = xs.new_zeros(L, batch, H)
            c0 = xs.new_zeros(L, batch, H)
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        seq = list(xs.unbind(0))
        h_last, c_last = [], []
        for layer in range(L):
            w = self._weights(layer)
            h, c = h0[layer], c0[layer]
            m_in, m_h = self._sequence_masks(masks, sample, seq[0].shape[-1])
            m_c = None
            if sample and self.scheme == "moon":
                m_c = masks.draw(H)
            out = []
            for t in range(steps):
                inp = self._input_dropout(seq[t], layer, masks, sample, m_in)
                rec = h if m_h is None else h * masks.note(f"l{layer}.hidden", m_h)
                gates = inp @ w[0].T + rec @ w[1].T
                if self.bias:
                    gates = gates + w[2] + w[3]
                i, f, g, o = gates.chunk(4, dim=-1)
                i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                if sample and self.scheme == "semeniuta":
                    g = g * masks.note(f"l{layer}.update", masks.draw(H) / masks.q)
                c = f * c + i * g
                if m_c is not None:
                    c = c * masks.note(f"l{layer}.cell", m_c)
                h = o * c.tanh()
                if m_c is not None:
                    h = h / masks.q
                if hidden_scale is not None:
                    h = h * hidden_scale
                out.append(h)
            h_last.append(h)
            c_last.append(c)
            seq = out
        y = torch.stack(seq)
        if sample:
            y = self._output_dropout(y, masks)
        y = y * self.out_scale
        h_last[-1] = h_last[-1] * self.out_scale
        h_n, c_n = torch.stack(h_last), torch.stack(c_last)
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(y, unbatched, masks), (h_n, c_n)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scheme={self.scheme!r}, p={self.p}"


class _Structure(torch.autograd.Function):
    """One autograd node from a layer's input (and first weight) to all of its outputs (zeros).

    That is what a dependency-graph trace needs to see a recurrent layer as one op.
    """

    @staticmethod
    def forward(ctx, x, weight, out_shape, state_shape):
        return x.new_zeros(out_shape), x.new_zeros(state_shape), x.new_zeros(state_shape)

    @staticmethod
    def backward(ctx, *grads):
        return None, None, None, None


def _trace_outputs(
    m: LSTM, x: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    out: tuple[int, ...]
    state: tuple[int, ...]
    if x.dim() == 3:
        batch, steps = (x.shape[0], x.shape[1]) if m.batch_first else (x.shape[1], x.shape[0])
        out = (batch, steps, m.hidden_size) if m.batch_first else (steps, batch, m.hidden_size)
        state = (m.num_layers, batch, m.hidden_size)
    else:
        out, state = (x.shape[0], m.hidden_size), (m.num_layers, m.hidden_size)
    y, h, c = _Structure.apply(x, m.weight_ih_l0, out, state)
    return y, (h, c)


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[nn.Module]:
    """Make ``model`` traceable by a dependency graph: eval mode, each :class:`LSTM` one op.

    Inside, every :class:`LSTM` is one autograd node from its input (and first weight) to its
    outputs, which are zeros: only the structure of what runs is the model's, not the values. The
    training flags are restored on exit.
    """
    was = [(m, m.training) for m in model.modules()]
    lstms = [m for m in model.modules() if isinstance(m, LSTM)]
    model.eval()
    for lstm in lstms:
        lstm._tracing = True
    try:
        yield model
    finally:
        for lstm in lstms:
            lstm._tracing = False
        for m, t in was:
            m.training = t


def _scale_last(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scale the last layer's slice of a (layers, [batch,] hidden) state."""
    return torch.cat([h[:-1], h[-1:] * scale])
