"""Gates on the hidden units of an LSTM, and the surgery that removes them.

A unit of a one-layer :class:`compressdrop.dropout.LSTM` is its hidden state h_j, shared by the
four gates (rows j of each block of ``weight_ih``/``weight_hh``) and fed back through column j of
``weight_hh``. The gate multiplies h by θ (one draw per sequence and unit) both where h re-enters
the recurrence and where it leaves the layer, as in Lobacheva, Chirkova & Vetrov, "Bayesian
Sparsification of Gated Recurrent Neural Networks" (2018; group noise on hidden units, shared by the
gates; the weight-level method is their 2017 "Bayesian Sparsification of Recurrent Neural
Networks"). A unit with
θ = 0 then influences nothing, so removing it is exact.

In eval mode the gate is folded on the fly: W_hh·diag(E[θ]) and the output times E[θ], which keeps
PyTorch's fused kernel. Pruning folds it for good (``weight_hh`` columns and the layer's
``out_scale`` buffer) and :class:`LSTMPruner` cuts the rows and columns; Torch-Pruning's dependency
graph finds the consumers of the hidden units.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..dropout.recurrent import LSTM
from ..errors import InputError
from .gated import Gated
from .registry import LayerSpec, kept_indices, register_layer, spec_of

__all__ = [
    "GatedLSTM",
    # built on first access (module __getattr__), so that Torch-Pruning loads only when used
    "LSTMPruner",  # noqa: F822
    "fold_lstm_",
    "gateable_lstm",
]


def gateable_lstm(m: nn.Module) -> str | None:
    """Why the hidden units of recurrent layer ``m`` cannot be gated, or ``None`` if they can.

    Only a one-layer :class:`compressdrop.dropout.LSTM` qualifies; the reason names the fix.
    """
    spec = spec_of(m)
    if spec is None:
        return f"{type(m).__name__} hidden units are not gated (only LSTM's are, so far)"
    return spec.why_not(m)


def _lstm_why_not(m: nn.Module) -> str | None:
    if getattr(m, "num_layers", 1) != 1:
        return "a multi-layer LSTM: stack one-layer compressdrop.dropout.LSTM modules to gate it"
    return None


class GatedLSTM(Gated):
    """A one-layer :class:`compressdrop.dropout.LSTM` whose hidden units pass through a gate.

    The gate multiplies the hidden state where it re-enters the recurrence and where it leaves the
    layer (see the module docstring); ``unit_dim`` is unused.
    """

    module: LSTM

    def forward(self, x, hx=None):
        """The LSTM's ``(output, (h_n, c_n))`` on ``x`` with its hidden units gated.

        Training draws one θ per sequence and unit and unrolls the recurrence; eval folds E[θ]
        into ``weight_hh`` and ``out_scale`` and keeps PyTorch's fused kernel.

        Raises:
            InputError: unbatched input (2 dims) in training.
        """
        m, g = self.module, self.gate
        dtype = m.weight_hh_l0.dtype
        keep = (~g.pruned).to(dtype)
        # the gate's own flag, not the wrapper's: mc_mode samples gates with the model in eval
        if g.training:
            if x.dim() != 3:
                raise InputError(f"a gated LSTM takes batched input (3 dims), got {tuple(x.shape)}")
            theta = g._training_sample(x.shape[0 if m.batch_first else 1]).to(dtype) * keep
            return m.unrolled(x, hx, hidden_scale=theta)
        s = g.eval_factor().to(dtype)
        return functional_call(
            m,
            {"weight_hh_l0": m.weight_hh_l0 * s, "out_scale": m.out_scale * s},
            (x, hx),
        )


@torch.no_grad()
def fold_lstm_(m: nn.Module, scale: torch.Tensor) -> None:
    """Multiply the hidden units of LSTM ``m`` by ``scale`` for good, in place.

    The recurrent columns of ``weight_hh_l0`` and the ``out_scale`` buffer absorb the factors, so
    with ``scale = E[θ]·keep`` the LSTM computes without the gate what the gated layer computes in
    eval mode.
    """
    assert isinstance(m, LSTM)
    s = scale.to(m.weight_hh_l0.dtype)
    m.weight_hh_l0.mul_(s)
    m.out_scale.mul_(s)


def _lstm_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    """One hidden unit: four rows of both weights and their biases plus a recurrent column
    (output unit), or a column of ``weight_ih`` (input unit); MACs per time step."""
    assert isinstance(m, LSTM)
    H, width = m.hidden_size, m.input_size + 2 * m.hidden_size
    if out:
        return float(4 * width + (8 if m.bias else 0)), float(4 * width)
    return float(4 * H), float(4 * H)


def _lstm_steps(m: nn.Module, out: Any) -> int:
    """Time steps: one unit's MACs recur at each."""
    assert isinstance(m, LSTM)
    y = out[0]
    return int(y.shape[1 if m.batch_first else 0]) if y.dim() == 3 else int(y.shape[0])


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


class _LSTMSlicing:
    """The methods of :class:`LSTMPruner`, which adds them to Torch-Pruning's base class."""

    def prune_out_channels(self, layer: LSTM, idxs: Sequence[int]) -> nn.Module:
        """Remove hidden units ``idxs`` of ``layer``, in place; returns ``layer``.

        Raises:
            InputError: ``layer`` has several layers or is bidirectional.
        """
        if layer.num_layers != 1 or layer.bidirectional:
            raise InputError("LSTMPruner handles one-layer, unidirectional LSTMs")
        H = layer.hidden_size
        keep = kept_indices(H, idxs)
        rows = torch.cat([keep + k * H for k in range(4)])
        layer.weight_ih_l0 = _param(layer.weight_ih_l0[rows])
        layer.weight_hh_l0 = _param(layer.weight_hh_l0[rows][:, keep])
        if layer.bias:
            layer.bias_ih_l0 = _param(layer.bias_ih_l0[rows])
            layer.bias_hh_l0 = _param(layer.bias_hh_l0[rows])
        layer.out_scale = layer.out_scale[keep].clone()
        layer.hidden_size = len(keep)
        layer._init_flat_weights()
        return layer

    def prune_in_channels(self, layer: LSTM, idxs: Sequence[int]) -> nn.Module:
        """Remove input features ``idxs`` of ``layer``, in place; returns ``layer``."""
        keep = kept_indices(layer.input_size, idxs)
        layer.weight_ih_l0 = _param(layer.weight_ih_l0[:, keep])
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: LSTM) -> int:
        """The layer's hidden units."""
        return layer.hidden_size

    def get_in_channels(self, layer: LSTM) -> int:
        """The layer's input features."""
        return layer.input_size


@functools.cache
def _lstm_pruner() -> type:
    # Torch-Pruning is imported when the class is first needed, not with compressdrop.pruning
    import torch_pruning as tp

    class LSTMPruner(_LSTMSlicing, tp.pruner.function.BasePruningFunc):
        """Torch-Pruning pruner for a one-layer :class:`compressdrop.dropout.LSTM`.

        Output channels are hidden units: rows j + k·H (k = 0..3, the i, f, g, o blocks) of
        ``weight_ih``, ``weight_hh`` and both biases, column j of ``weight_hh`` and entry j of
        ``out_scale``. Input channels are columns of ``weight_ih_l0``. (Torch-Pruning's own LSTM
        pruner does not cut the recurrent columns nor the bias blocks.)

        The class is built on first access to ``compressdrop.gating.recurrent.LSTMPruner``.
        """

    LSTMPruner.__qualname__ = "LSTMPruner"  # as if defined at module level (repr, pickle)
    return LSTMPruner


def __getattr__(name: str) -> Any:
    if name == "LSTMPruner":
        return _lstm_pruner()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_layer(
    LSTM,
    LayerSpec(
        "producer",
        "neuron",
        -1,
        _lstm_costs,
        fold_lstm_,
        output_positions=_lstm_steps,
        why_not=_lstm_why_not,
        wrapper=GatedLSTM,
        pruner=lambda: _lstm_pruner()(),
    ),
)
