"""A slim model's kept units with their learned noise: Monte-Carlo prediction after pruning.

Pruning folds each kept unit's E[θ] into its layer and drops the gate, so the slim model is
deterministic. :class:`NoisySite` puts the noise back on a slim layer: in eval mode it changes
nothing (the fold already scaled the unit by E[θ]); when its gate samples (in
:func:`compressdrop.uncertainty.mc_mode`) it multiplies each kept unit by θ/E[θ], so the layer's
output is the gated model's θ·h for the kept units, drawn from the same learned posterior.
:func:`compressdrop.uncertainty.keep_noise` builds such a model from a gated model and its slim
one; a checkpoint records the sites (:func:`noise_record`) and rebuilds them (:func:`put_noise`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..gates import Gate, LogNormalGate, check_gate_kwargs, gate_class
from ..gates._mul import wrapper_pre_hook
from ..gates.distributions import truncnorm_icdf_coefs
from ..runtime import is_exporting
from .gated import Wrapper
from .heads import head_spec_of

__all__ = [
    "NoisySite",
    "ndtri_approx",
    "noise_record",
    "noisy_sites",
    "prepare_attention",
    "put_noise",
    "share_samples",
]


class NoisySite(Wrapper):
    """Wraps a slim layer so that its kept units carry their learned noise again.

    ``gate`` is the gated model's gate restricted to the kept units (:meth:`Gate.select`). In
    eval mode the site returns the layer's output unchanged; while the gate samples it multiplies
    unit ``u`` by θ_u / E[θ_u] (the layer's weights already hold E[θ_u]).

    Args:
        module: the slim layer.
        gate: one unit per kept unit of the layer.
        unit_dim: the dimension of the layer's output that holds the units, or, with
            ``head_dim``, ignored.
        head_dim: for an attention's output projection: the features per head of its input,
            whose heads are the units.

    Attributes:
        tile: when above 1, the site repeats its output that many times along the batch before
            the noise (set by :class:`compressdrop.uncertainty.MCSampler` on the first site, so
            that the layers before it run once per input rather than once per sample).
    """

    def __init__(
        self,
        module: nn.Module,
        gate: Gate,
        unit_dim: int,
        head_dim: int | None = None,
        attention: str | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.gate = gate
        self.unit_dim = int(unit_dim)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.attention = attention
        self.tile = 1
        # as on a Gated: a hooked submodule turns fused attention paths off
        self.register_forward_pre_hook(wrapper_pre_hook)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output (or, for heads, the projection of its noisy input)."""
        if self.head_dim is None:
            return self._noise(self._tiled(self.module(*args, **kwargs)), self.unit_dim)
        x, *rest = args
        heads = self._noise(self._tiled(x).unflatten(-1, (-1, self.head_dim)), -2)
        return self.module(heads.flatten(-2), *rest, **kwargs)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile <= 1:
            return x
        return x.repeat(self.tile, *([1] * (x.dim() - 1)))

    def _noise(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if not self.gate.training:
            return x
        if not isinstance(x, torch.Tensor):  # an LSTM's (output, (h, c))
            raise InputError(
                f"the noise of a {type(self.module).__name__} whose output is a "
                f"{type(x).__name__} cannot be sampled from the slim model; sample the gated "
                "model instead (compressdrop eval gated.pt --mc N)"
            )
        dim = dim % x.dim()
        if x.shape[dim] != self.gate.num_units:
            raise InputError(
                f"noisy site has {self.gate.num_units} units but the layer gives {x.shape[dim]} "
                f"along dim {dim}"
            )
        theta = self._draw(x.shape[0])  # (B, U) or (1, U)
        mean = self._buffers.get("export_mean") if is_exporting() else None
        mean = self.gate.expected() if mean is None else mean
        ratio = (theta / mean.to(theta.dtype)).to(x.dtype)
        shape = [ratio.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = self.gate.num_units
        return x * ratio.reshape(shape)

    def _draw(self, batch: int) -> torch.Tensor:
        if is_exporting() and isinstance(self.gate, LogNormalGate):
            coefs = self._buffers.get("export_coefs")
            if coefs is None:
                raise InputError("call prepare_export() on the noisy sites before exporting")
            return _lognormal_for_export(coefs, self.gate, batch)
        return self.gate._training_sample(batch)

    @torch.no_grad()
    def prepare_export(self) -> None:
        """Store what an exported graph needs as constants: E[θ], and a log-normal gate's
        inverse-CDF coefficients (their closed forms use functions ONNX lacks)."""
        self.register_buffer("export_mean", self.gate.expected().detach().clone(), persistent=False)
        if isinstance(self.gate, LogNormalGate):
            mu, sigma, alpha, beta, log_z = self.gate._terms()
            coefs = torch.stack([mu, *truncnorm_icdf_coefs(sigma, alpha, beta, log_z)])
            self.register_buffer("export_coefs", coefs.detach().clone(), persistent=False)

    def extra_repr(self) -> str:
        what = f"head_dim={self.head_dim}" if self.head_dim else f"unit_dim={self.unit_dim}"
        return f"{what}, tile={self.tile}" if self.tile > 1 else what


# Acklam's rational approximation of the normal quantile: one rational function of p − ½ in the
# centre, one of √(−2 log p) in each tail (P. J. Acklam, "An algorithm for computing the inverse
# normal cumulative distribution function", 2003); relative error about 1.2e-9.
_CENTRAL_NUM = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_CENTRAL_DEN = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
    1.0,
)
_TAIL_NUM = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_TAIL_DEN = (
    7.784695709041462e-03,
    3.224671290700398e-01,
    2.445134137142996e00,
    3.754408661907416e00,
    1.0,
)
_TAIL_BELOW = 0.02425


def _horner(coefs: tuple[float, ...], w: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(w, coefs[0])
    for c in coefs[1:]:
        acc = acc * w + c
    return acc


def ndtri_approx(p: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(p) from standard ONNX operators (log, sqrt, rational functions), for exported samplers.

    ``torch.special.ndtri`` has no ONNX form. This one agrees with it to about 1e-9 relative
    for p in [1e-300, 1 − 1e-16] in float64 (tested), far below the Monte-Carlo error of any
    sample it feeds.
    """
    near = torch.minimum(p, 1 - p)
    q = torch.sqrt(-2 * torch.log(near))
    tail = _horner(_TAIL_NUM, q) / _horner(_TAIL_DEN, q)
    tail = torch.where(p > 0.5, -tail, tail)
    r = p - 0.5
    central = _horner(_CENTRAL_NUM, r * r) * r / _horner(_CENTRAL_DEN, r * r)
    return torch.where(near < _TAIL_BELOW, tail, central)


def _lognormal_for_export(coefs: torch.Tensor, gate: LogNormalGate, batch: int) -> torch.Tensor:
    """The gate's draw by the inverse CDF with :func:`ndtri_approx` (what the ONNX graph runs);
    ``coefs`` holds μ and the inverse-CDF coefficients, ``(4, U)`` float64."""
    mu, offset, width, signed_scale = coefs
    u = torch.rand(batch, gate.num_units, dtype=torch.float64, device=coefs.device)
    # bounds as float64 tensors: scalar bounds may reach the graph as float32 (0 and 1 there)
    low = torch.tensor(torch.finfo(torch.float64).tiny, dtype=torch.float64)
    high = torch.tensor(1 - 1e-16, dtype=torch.float64)
    z = ndtri_approx(torch.minimum(torch.maximum(offset + u * width, low), high))
    return (mu + signed_scale * z).clamp(gate.low, gate.high).exp().to(gate.mu.dtype)


def noisy_sites(model: nn.Module) -> Iterator[tuple[str, NoisySite]]:
    """Yield ``(name, site)`` for every :class:`NoisySite` of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, NoisySite):
            yield name, m


def _gate_kwargs(gate: Gate) -> dict[str, Any]:
    keys = {
        "lognormal": ("low", "high"),
        "concrete": ("prior_keep", "temperature", "inverted"),
        "hardconcrete": ("penalty",),
    }.get(gate.family, ())
    return {k: getattr(gate, k) for k in keys}


def noise_record(model: nn.Module) -> list[dict[str, Any]]:
    """The noisy sites of a slim model as plain data, for a checkpoint (see :func:`put_noise`).

    A gate shared by several sites is recorded once, at its first site; the others name it.
    """
    first: dict[int, str] = {}
    out = []
    for name, site in noisy_sites(model):
        entry: dict[str, Any] = {
            "site": name,
            "unit_dim": site.unit_dim,
            "head_dim": site.head_dim,
            "attention": site.attention,
        }
        if id(site.gate) in first:
            entry["shares"] = first[id(site.gate)]
        else:
            first[id(site.gate)] = name
            entry.update(
                family=site.gate.family,
                units=site.gate.num_units,
                kwargs=_gate_kwargs(site.gate),
            )
        out.append(entry)
    return out


def put_noise(model: nn.Module, record: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Wrap ``model``'s layers as :func:`noise_record` describes, with fresh gates.

    The gates' learned values come with the checkpoint's ``state_dict``, loaded afterwards.

    Returns:
        ``model``, changed in place.

    Raises:
        InputError: a record names a layer the model does not have, a gate family that does not
            exist or arguments the family does not take (see
            :func:`~compressdrop.gates.check_gate_kwargs`).
    """
    gates: dict[str, Gate] = {}
    for entry in record:
        if entry.get("attention"):
            prepare_attention(model, str(entry["attention"]))
        name = str(entry["site"])
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"the noise record names a layer {name!r} the model lacks") from None
        if "shares" in entry:
            gate = gates[str(entry["shares"])]
            gate.shared = True
        else:
            cls = gate_class(str(entry["family"]))
            kwargs = check_gate_kwargs(cls, entry.get("kwargs"))  # as attach checks them
            gate = cls(int(entry["units"]), **kwargs)
            gates[name] = gate
        site = NoisySite(
            module, gate, int(entry["unit_dim"]), entry.get("head_dim"), entry.get("attention")
        )
        model.set_submodule(name, site)
    share_samples(model)
    return model


def prepare_attention(model: nn.Module, name: str) -> None:
    """Give the attention ``name`` the form whose output projection runs as a module (what its
    head spec prepares: a stock ``nn.MultiheadAttention`` becomes compressdrop's subclass), so
    that a :class:`NoisySite` on that projection sees the heads.

    Raises:
        InputError: ``model`` has no module ``name``.
    """
    from .attention import nested_off

    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the noise record names an attention {name!r} the model lacks") from None
    found = head_spec_of(m)
    if found is not None and found[0].prepare is not None:
        model.set_submodule(name, found[0].prepare(m))
    nested_off(model)


def share_samples(model: nn.Module) -> None:
    """Make each shared gate of ``model`` draw once per forward pass (a root pre-hook), as in
    the gated model: its sites on one residual stream see the same θ."""
    from .gated import _clear_gate_samples

    shared = any(isinstance(m, Gate) and m.shared for m in model.modules())
    hooks = model._forward_pre_hooks.values()
    if shared and not any(fn is _clear_gate_samples for fn in hooks):
        model.register_forward_pre_hook(_clear_gate_samples)
