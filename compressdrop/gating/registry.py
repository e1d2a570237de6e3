"""What compressdrop knows about each layer type, in one place: one :class:`LayerSpec` per type.

A spec says whether the layer's outputs are units a gate can multiply (a *producer*: Linear, Conv,
LSTM) or a per-channel layer that may host its producer's gate (a *norm*: BatchNorm), along which
output dimension the units lie, what parameters and multiply-adds each unit controls, how E[θ]
folds into the layer for good, which wrapper applies the gate, which Torch-Pruning pruner slices
the layer if Torch-Pruning has none, and why a particular layer cannot be gated. Attaching,
costing, folding and surgery all look the type up here, so supporting a new layer type (one of
yours included) is one :func:`register_layer` call.

Example: a custom producer, a linear map whose weight is stored transposed::

    class TLinear(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

        def forward(self, x):
            return x @ self.weight

    register_layer(
        TLinear,
        LayerSpec(
            role="producer",
            kind="neuron",
            unit_dim=-1,
            unit_costs=lambda m, out: (m.weight.shape[0] if out else m.weight.shape[1],) * 2,
            fold=lambda m, s: m.weight.mul_(s),
            pruner=TLinearPruner,  # a torch_pruning BasePruningFunc subclass that slices it
        ),
    )

``tests/test_registry.py`` runs this example end to end (attach, train a step, prune, compare).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "LayerSpec",
    "customized_pruners",
    "fold_columns",
    "has_role",
    "kept_indices",
    "linear_positions",
    "register_layer",
    "register_pruner",
    "register_wrapper",
    "registered_types",
    "spec_of",
    "wrapper_of",
]


def _never(m: nn.Module) -> str | None:
    return None


def _output_positions(m: nn.Module, out: Any) -> int:
    """Output positions per example whose units a unit's filter touches (the MACs multiplier)."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return 1
    return int(out[0, 0].numel())


@dataclass(frozen=True)
class LayerSpec:
    """What compressdrop needs to know about a layer type to gate, cost, fold and prune it.

    Attributes:
        role: ``"producer"`` (its outputs are units: gate them, remove them), ``"norm"`` (a
            per-channel layer directly after a producer, where the producer's gate then sits) or
            ``"refused"`` (a layer type whose units are never gated; ``why_not`` says why).
        kind: ``"neuron"`` or ``"channel"``: what ``attach(granularity=...)`` selects.
        unit_dim: the dimension of the layer's output that holds the units (1: channels of
            ``(N, C, ...)``, −1: features of ``(..., F)``).
        unit_costs: ``(module, out) → (params, macs)``: parameters one unit controls and its
            multiply-adds per output position, for removing an output unit (``out=True``) or an
            input unit (``out=False``).
        fold: ``(module, scale) → None``: multiply the layer's output units by ``scale`` for good,
            in place (how E[θ] folds into the weights).
        output_positions: ``(module, output) → int``: positions per example one unit is computed
            at (spatial size of a conv, sequence length of an LSTM), the multiplier of its MACs.
        why_not: ``module → reason``: why this layer cannot be gated (``None``: it can).
        wrapper: the :class:`~compressdrop.gating.Gated` subclass that applies the gate
            (``None``: ``Gated`` itself, the gate on the layer's output).
        pruner: a zero-argument factory of the Torch-Pruning pruner for the type, for types
            Torch-Pruning does not slice itself (``None``: its own).
        fold_in: ``(module, scale) → None``: multiply the layer's *input* features by ``scale``
            for good, in place (how a gate on its input folds: an attention's head gates on its
            output projection). ``None``: the layer cannot host an input gate.
    """

    role: Literal["producer", "norm", "refused"]
    kind: str
    unit_dim: int
    unit_costs: Callable[[nn.Module, bool], tuple[float, float]]
    fold: Callable[[nn.Module, torch.Tensor], None]
    output_positions: Callable[[nn.Module, Any], int] = _output_positions
    why_not: Callable[[nn.Module], str | None] = _never
    wrapper: type[nn.Module] | None = None
    pruner: Callable[[], Any] | None = None
    fold_in: Callable[[nn.Module, torch.Tensor], None] | None = None


_SPECS: dict[type, LayerSpec] = {}
_PRUNERS: dict[type, Callable[[], Any]] = {}  # Torch-Pruning pruners of non-layer types
# wrappers of modules known by a test, not a type (a fused experts module: gating/experts.py)
_WRAPPERS: list[tuple[Callable[[nn.Module], bool], type[nn.Module]]] = []


def register_layer(types: type | tuple[type, ...], spec: LayerSpec) -> None:
    """Tell compressdrop how to gate and prune layers of ``types`` (replacing an earlier spec).

    Raises:
        InputError: ``types`` are not ``nn.Module`` subclasses.
    """
    for t in types if isinstance(types, tuple) else (types,):
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise InputError(f"register_layer: {t!r} is not an nn.Module subclass")
        _SPECS[t] = spec


def spec_of(module: nn.Module | type) -> LayerSpec | None:
    """The spec of ``module``'s type, or of its nearest registered base class (``None``: none)."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        if base in _SPECS:
            return _SPECS[base]
    return None


def register_wrapper(test: Callable[[nn.Module], bool], wrapper: type[nn.Module]) -> None:
    """Gate the modules for which ``test`` is true with ``wrapper`` (a
    :class:`~compressdrop.gating.Gated` subclass), where no layer spec names one."""
    _WRAPPERS.append((test, wrapper))


def wrapper_of(module: nn.Module) -> type[nn.Module] | None:
    """The wrapper that gates ``module``: its spec's, else a :func:`register_wrapper` one whose
    test it passes (``None``: :class:`~compressdrop.gating.Gated` itself)."""
    spec = spec_of(module)
    if spec is not None and spec.wrapper is not None:
        return spec.wrapper
    return next((w for test, w in _WRAPPERS if test(module)), None)


def has_role(module: object, role: str) -> bool:
    """Whether ``module`` is a layer whose registered spec has ``role`` (``"producer"``, ...)."""
    spec = spec_of(module) if isinstance(module, nn.Module) else None
    return spec is not None and spec.role == role


def registered_types(role: str | None = None) -> tuple[type, ...]:
    """The registered layer types (of one ``role`` if given), most recently registered last."""
    return tuple(t for t, s in _SPECS.items() if role is None or s.role == role)


def register_pruner(types: type | tuple[type, ...], factory: Callable[[], Any]) -> None:
    """Give Torch-Pruning a pruner for modules of ``types`` that are not layers with units of
    their own (an attention with removable heads): it then treats them as one node and does not
    trace inside them."""
    for t in types if isinstance(types, tuple) else (types,):
        _PRUNERS[t] = factory


def customized_pruners() -> dict[type, Any]:
    """The Torch-Pruning pruners of the registered types that bring their own, keyed by type."""
    out = {t: f() for t, f in _PRUNERS.items()}
    out.update({t: s.pruner() for t, s in _SPECS.items() if s.pruner is not None})
    return out


# -- the built-in types ---------------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weighted_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    """A Linear's or a Conv's: one filter and its bias (output unit) or one input column."""
    w = m.get_parameter("weight")
    has_bias = getattr(m, "bias", None) is not None
    # an input channel of a conv with g groups reaches only the out/g filters of its group
    groups = getattr(m, "groups", 1)
    params = w[0].numel() + (1 if has_bias else 0) if out else w[:, 0].numel() // groups
    return float(params), float(params - (1 if out and has_bias else 0))


@torch.no_grad()
def _fold_rows(m: nn.Module, scale: torch.Tensor) -> None:
    """Scale output units along the weight's dimension 0 (and the bias)."""
    weight, bias = m.get_parameter("weight"), getattr(m, "bias", None)
    s = scale.to(weight.dtype)
    weight.mul_(s.reshape([-1] + [1] * (weight.dim() - 1)))
    if bias is not None:
        bias.mul_(s)


@torch.no_grad()
def _fold_linear_inputs(m: nn.Module, scale: torch.Tensor) -> None:
    """Scale a Linear's input features (its weight's columns)."""
    weight = m.get_parameter("weight")
    weight.mul_(scale.to(weight.dtype))


def kept_indices(n: int, idxs: Sequence[int]) -> torch.Tensor:
    """The indices of ``range(n)`` not in ``idxs`` (what a pruner keeps), as a long tensor."""
    drop = {int(i) for i in idxs}
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def linear_positions(m: nn.Module, out: Any) -> int:
    """Positions per example of a Linear-like layer's output: T on ``(N, T, F)``, else 1."""
    if isinstance(out, torch.Tensor) and out.dim() > 2:  # a Linear on (N, T, F): T positions
        return math.prod(out.shape[1:-1])  # (N may be 0: X-MOD's adapter of a language unseen)
    return 1


def _conv_why_not(m: nn.Module) -> str | None:
    # groups > 1 is gated in blocks aligned to the groups (gating/aligned.py), except one output
    # channel per group with several inputs: Torch-Pruning takes that for depthwise and would cut
    # inputs with outputs
    if isinstance(m, _CONVS) and 1 < m.groups == m.out_channels != m.in_channels:
        return "grouped convolution with one output channel per group is not supported"
    return None


_DECONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _deconv_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    """A transposed conv's weight is (in, out, *kernel): output unit j is column j, input unit i
    is row i."""
    w = m.get_parameter("weight")
    has_bias = getattr(m, "bias", None) is not None
    params = w[:, 0].numel() + (1 if has_bias else 0) if out else w[0].numel()
    return float(params), float(params - (1 if out and has_bias else 0))


@torch.no_grad()
def fold_columns(m: nn.Module, scale: torch.Tensor) -> None:
    """Scale output units along the weight's dimension 1 (a transposed conv's) and the bias."""
    weight, bias = m.get_parameter("weight"), getattr(m, "bias", None)
    s = scale.to(weight.dtype)
    weight.mul_(s.reshape([1, -1] + [1] * (weight.dim() - 2)))
    if bias is not None:
        bias.mul_(s)


def _deconv_why_not(m: nn.Module) -> str | None:
    if getattr(m, "groups", 1) > 1:
        return "grouped transposed convolution is not supported yet"
    return None


def _norm_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    return (2.0 if out and getattr(m, "affine", False) else 0.0), 0.0


register_layer(
    nn.Linear,
    LayerSpec(
        "producer",
        "neuron",
        -1,
        _weighted_costs,
        _fold_rows,
        output_positions=linear_positions,
        fold_in=_fold_linear_inputs,
    ),
)
register_layer(
    _CONVS, LayerSpec("producer", "channel", 1, _weighted_costs, _fold_rows, why_not=_conv_why_not)
)
register_layer(
    _DECONVS,
    LayerSpec("producer", "channel", 1, _deconv_costs, fold_columns, why_not=_deconv_why_not),
)
register_layer(
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    LayerSpec("norm", "channel", 1, _norm_costs, _fold_rows),
)


def _rnn_why_not(m: nn.Module) -> str | None:
    if isinstance(m, nn.LSTM):
        return "a torch.nn.LSTM: use compressdrop.dropout.LSTM (a drop-in subclass) to gate it"
    return f"{type(m).__name__} hidden units are not gated (only LSTM's are, so far)"


def _no_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    return 0.0, 0.0


def _no_fold(m: nn.Module, scale: torch.Tensor) -> None:
    raise InputError(f"{type(m).__name__} is never gated")


# PyTorch's recurrent layers (compressdrop.dropout.LSTM registers its own spec, which wins)
register_layer(
    nn.RNNBase, LayerSpec("refused", "neuron", -1, _no_costs, _no_fold, why_not=_rnn_why_not)
)
