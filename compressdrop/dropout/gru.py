"""The GRU with recurrent dropout: a drop-in subclass of ``nn.GRU`` with the schemes of
:mod:`compressdrop.dropout.recurrent` (RNNDrop excepted: a GRU has no memory cell)."""

from __future__ import annotations

import torch
from torch import nn

from .recurrent import RecurrentDropout, _Masks

__all__ = ["GRU"]


class GRU(RecurrentDropout, nn.GRU):
    """``nn.GRU`` with a recurrent dropout ``scheme`` (all but ``"moon"``) and rate ``p``.

    ``batch_first`` defaults to True here; parameters and ``state_dict`` are those of ``nn.GRU``.

    Args:
        input_size, hidden_size, num_layers, scheme, p, record_masks, **kwargs: as for
            :class:`LSTM`.

    Raises:
        InputError: as for :class:`LSTM`, and for ``scheme="moon"`` (a GRU has no memory cell).
    """

    kind = "GRU"

    def forward(self, x, hx=None):
        """``(output, h_n)`` as ``nn.GRU`` returns them; unrolled with masks while sampling."""
        if not self.sampling:
            return super().forward(x, hx)
        return self.unrolled(x, hx)

    def unrolled(self, x, hx=None):
        """The recurrence unrolled in Python, with the scheme's masks while sampling.

        Args:
            x: input of shape ``(B, T, F)`` (``batch_first``), ``(T, B, F)`` or unbatched
                ``(T, F)``.
            hx: initial ``h_0``, ``(num_layers, B, H)`` (``(num_layers, H)`` unbatched); zeros by
                default.

        Returns:
            ``(output, h_n)`` as :meth:`forward` returns them.

        Raises:
            TypeError: ``x`` is a ``PackedSequence``.
        """
        xs, unbatched = self._time_major(x)
        steps, batch, _ = xs.shape
        sample = self.sampling
        masks = _Masks(self.p, batch, steps, xs, self.record_masks and sample)
        H, L = self.hidden_size, self.num_layers
        h0 = xs.new_zeros(L, batch, H) if hx is None else (hx.unsqueeze(1) if unbatched else hx)
        seq = list(xs.unbind(0))
        h_last = []
        for layer in range(L):
            w = self._weights(layer)
            h = h0[layer]
            m_in, m_h = self._sequence_masks(masks, sample, seq[0].shape[-1])
            out = []
            for t in range(steps):
                inp = self._input_dropout(seq[t], layer, masks, sample, m_in)
                rec = h if m_h is None else h * masks.note(f"l{layer}.hidden", m_h)
                gi = inp @ w[0].T
                gh = rec @ w[1].T
                if self.bias:
                    gi, gh = gi + w[2], gh + w[3]
                ir, iz, in_ = gi.chunk(3, dim=-1)
                hr, hz, hn = gh.chunk(3, dim=-1)
                r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
                n = (in_ + r * hn).tanh()
                if sample and self.scheme == "semeniuta":
                    n = n * masks.note(f"l{layer}.update", masks.draw(H) / masks.q)
                h = (1 - z) * n + z * h
                out.append(h)
            h_last.append(h)
            seq = out
        y = torch.stack(seq)
        if sample:
            y = self._output_dropout(y, masks)
        h_n = torch.stack(h_last)
        if unbatched:
            h_n = h_n.squeeze(1)
        return self._finish(y, unbatched, masks), h_n

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scheme={self.scheme!r}, p={self.p}"
