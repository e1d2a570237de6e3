"""The gate protocol: a per-unit multiplicative noise layer with a KL term and an SNR."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from ..errors import InputError
from ._compiled import GATE, broadcast_multiply
from ._mul import gate_multiply
from ._replay import new_seed, replay
from .shard import _NOISE_SHARD, _OPEN_SHARDS, noise_shard

__all__ = ["Gate", "noise_shard"]

MIN_VARIANCE = 1e-24
NOISE_MODES = ("example", "batch")


class Gate(nn.Module):
    """Multiplies each unit (neuron or channel) of its input by a learned random factor θ.

    Contract every family fulfils:

    * ``forward(x, dim=1)``: in training, multiplies ``x`` by one sample of θ per example and unit
      (the local reparameterization of unit noise), broadcast over every other dimension; in eval,
      multiplies by E[θ], and by 0 for units marked pruned. ``dim`` is the unit dimension of ``x``.
    * ``posterior()`` / ``prior()``: ``torch.distributions`` objects over θ with batch shape
      ``(num_units,)``, built in float64 for the per-unit closed forms.
    * ``kl()``: Σ_units cost_u · KL(q(θ_u) ‖ p(θ_u)), a differentiable scalar (``unit_cost`` is 1 by
      default; a cost-aware prior sets it to the parameters or FLOPs the unit controls).
    * ``expected()``: E[θ] per unit; ``snr()``: E[θ] / std[θ] per unit.
    * ``mask(threshold)``: boolean keep-mask ``snr() >= threshold`` (``None``: the family default).

    Subclasses state their fixed facts as class attributes (``family``, ``default_threshold``) and
    implement ``posterior`` and ``prior`` (or override ``kl_per_unit`` when the regularizer is not a
    KL, as for L0). The built-in families also override ``sample``, ``kl_per_unit``, ``expected``
    and ``snr`` with lean closed forms that share their per-unit terms through :meth:`_memo`.

    Noise (``noise=``): ``"example"`` (the default) draws one θ per example and unit, the local
    reparameterization; ``"batch"`` draws one θ per unit for the whole mini-batch (as the SBP
    authors do), broadcast over the examples: B times fewer draws, noisier gradients of the
    gate parameters.

    Per-unit terms are computed once per training step: a term asked for twice (by the sample in
    the forward pass and by ``kl()``, say) is reused while the gate's parameters are the same
    objects at the same version, on the same dtype and device, in the same grad mode; an
    optimizer step (which updates the parameters in place), ``load_state_dict``, ``.to()`` and a
    backward pass through the term (which frees its graph) all make the next call recompute. Under
    ``torch.compile`` nothing is cached (the compiler shares the terms itself), and nothing is
    cached for parameters swapped in by ``torch.func.functional_call``. In a model from
    :func:`~compressdrop.attach` the gates of one family go further: their per-step terms and
    their KL are computed as one for all of them (:mod:`compressdrop.gates.bank`).

    When one gate serves several sites of a coupled group (a residual stream, say), every site in a
    forward pass must see the same θ: each site draws it from a stream started at the gate's seed
    for that pass, which ``reseed`` takes (attach registers a forward pre-hook on the root model
    that calls it), so that activation checkpointing recomputes the same draws
    (:mod:`compressdrop.gates._replay`). Under ``torch.compile`` the first site's θ is reused until
    ``clear_sample`` runs.
    """

    family: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 1.0
    # every draw of θ is ≥ 0, so that a ReLU and a max-pool after the gate commute with it
    nonnegative: ClassVar[bool] = False
    unit_cost: torch.Tensor  # buffer (num_units,)
    pruned: torch.Tensor  # bool buffer (num_units,)

    def __init__(self, num_units: int, noise: str = "example") -> None:
        super().__init__()
        if num_units < 1:
            raise InputError(f"num_units must be ≥ 1, got {num_units}")
        if noise not in NOISE_MODES:
            raise InputError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.num_units = int(num_units)
        self.noise = noise
        self.register_buffer("unit_cost", torch.ones(num_units))
        self.register_buffer("pruned", torch.zeros(num_units, dtype=torch.bool))
        self.shared = False
        self._sample: torch.Tensor | None = None  # under torch.compile only
        self._sample_batch = 0
        self._seed: int | None = None
        self._any_pruned: tuple[tuple[int, int] | None, bool] = (None, True)
        self._cache: tuple[tuple, dict[str, Any]] | None = None

    # --- per-step cache of per-unit terms ---------------------------------------------------------
    def _cache_key(self) -> tuple | None:
        params = list(self._parameters.values())
        if not all(isinstance(p, nn.Parameter) for p in params):
            return None  # torch.func.functional_call and friends: plain tensors swapped in
        return (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple((p._version, p.dtype, p.device) for p in params if p is not None),
        )

    def _memo(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, reused while the parameters are unchanged (see the class docstring)."""
        if torch.compiler.is_compiling():
            return compute()
        key = self._cache_key()
        if key is None:
            return compute()
        params = list(self._parameters.values())
        if self._cache is not None:
            old_key, entries = self._cache
            refs = entries.get("_params", ())
            if old_key == key and all(r() is p for r, p in zip(refs, params, strict=True)):
                if name in entries:
                    return entries[name]
            else:
                self._cache = None
        if self._cache is None:
            self._cache = (key, {"_params": [weakref.ref(p) for p in params]})
        value = compute()
        self._cache[1][name] = value
        if torch.is_grad_enabled():
            me = weakref.ref(self)

            def invalidate(grad: torch.Tensor) -> None:
                # backward through the term frees its graph: the next step computes it afresh
                gate = me()
                if gate is not None:
                    gate._cache = None

            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(invalidate)
        return value

    def clear_cache(self) -> None:
        """Forget the cached per-unit terms (they are recomputed on the next use)."""
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> Gate:
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # cached terms carry autograd graphs, which neither pickle nor deepcopy
        state = self.__dict__.copy()
        state["_cache"] = None
        state["_sample"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_cache", None)
        state.setdefault("noise", "example")
        state.setdefault("_sample_batch", 0)
        state.setdefault("_seed", None)
        state.setdefault("_any_pruned", (None, True))
        super().__setstate__(state)

    # --- what each family provides -------------------------------------------------------------
    def posterior(self) -> Distribution:
        """The learned distribution q(θ) over each unit's factor, batch shape ``(num_units,)``."""
        raise NotImplementedError

    def prior(self) -> Distribution:
        """The prior p(θ) that :meth:`kl` measures q(θ) against, batch shape ``(num_units,)``."""
        raise NotImplementedError

    # --- derived quantities ---------------------------------------------------------------------
    def _out(self, value: torch.Tensor) -> torch.Tensor:
        """Cast a float64 per-unit result back to the parameters' dtype.

        bf16/fp16 gates included: the closed forms themselves always run in float64.
        """
        return value.to(self._dtype())

    def _dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return next(iter(self._parameters.values())).dtype  # type: ignore[union-attr]

    def kl_per_unit(self) -> torch.Tensor:
        """KL(q(θ_u) ‖ p(θ_u)) of each unit, shape ``(num_units,)``, differentiable."""
        return self._out(kl_divergence(self.posterior(), self.prior()))

    def kl(self) -> torch.Tensor:
        """The gate's regularizer Σ_u cost_u · KL(q(θ_u) ‖ p(θ_u)), a differentiable scalar."""
        return torch.dot(self.unit_cost.to(self._dtype()), self.kl_per_unit())

    def expected(self) -> torch.Tensor:
        """E[θ] per unit, shape ``(num_units,)``."""
        return self._out(self._memo("mean", lambda: self.posterior().mean))

    def eval_factor(self) -> torch.Tensor:
        """What eval mode multiplies each unit by: E[θ], 0 for a pruned unit. While a model is
        exported it is a constant computed beforehand (``compressdrop.export``'s fixed factors)."""
        fixed = self.__dict__.get("_fixed_factor")
        return self._keep(self.expected()) if fixed is None else fixed

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio |E θ| / std θ per unit, shape ``(num_units,)``.

        A variance below 1e-24 counts as 1e-24, so the SNR of a unit whose noise has all but
        vanished is capped at |E θ|·1e12 rather than infinite.
        """
        q = self.posterior()
        # a variance below 1e-24 (noise that has all but vanished) caps the SNR at |E θ|·1e12
        return self._out(q.mean.abs() / q.variance.clamp(min=MIN_VARIANCE).sqrt())

    def mask(self, threshold: float | None = None) -> torch.Tensor:
        """The units to keep: ``snr() >= threshold``.

        Args:
            threshold: the SNR a unit needs to be kept; ``None``: the family's
                ``default_threshold``.

        Returns:
            A boolean tensor of shape ``(num_units,)``, True for a kept unit.
        """
        thr = self.default_threshold if threshold is None else float(threshold)
        with torch.no_grad():
            return self.snr() >= thr

    def sample(self, batch: int) -> torch.Tensor:
        """Draw θ for ``batch`` examples, reparameterized (gradients reach the parameters).

        Returns:
            A tensor of shape ``(batch, num_units)``.
        """
        return self.posterior().rsample((batch,))

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, dim: int = 1, relu_after: bool = False, inplace: bool = False
    ) -> torch.Tensor:
        """Multiply each unit of ``x`` by its factor: a sample of θ in training, E[θ] in eval.

        Units marked ``pruned`` are multiplied by 0 in both modes.

        Args:
            x: a batch, examples along dim 0.
            dim: the dimension of ``x`` that holds the units (negative counts from the end).
            relu_after: an ``nn.ReLU`` hooked by
                :func:`~compressdrop.gates._mul.hand_over_to_relus` alone reads the result, so
                the gate may keep that ReLU's output for its backward pass instead of ``x``
                (a training step in eager mode).
            inplace: multiply ``x`` in place (a layer output that nothing else has seen, that
                its layer's backward does not need, and that one reader alone reads).

        Returns:
            ``x`` times θ, broadcast over every dimension but the batch and ``dim``.

        Raises:
            InputError: ``x`` does not have ``num_units`` entries along ``dim``.
        """
        dim = self.check_units(x, dim)
        if self.training:
            theta = self.training_factor(x.shape[0], x.dtype)  # (B, U) or (1, U)
            return self.multiply(x, theta, dim, relu_after, inplace)
        theta = self.eval_factor().to(x.dtype)  # (U,)
        shape = [1] * x.dim()
        shape[dim] = self.num_units
        return x * theta.reshape(shape)

    def check_units(self, x: torch.Tensor, dim: int) -> int:
        """``dim`` made non-negative, after checking that ``x`` has ``num_units`` entries there.

        Raises:
            InputError: it has not.
        """
        dim = dim % x.dim()
        if x.shape[dim] != self.num_units:
            raise InputError(
                f"{type(self).__name__} has {self.num_units} units but the input has "
                f"{x.shape[dim]} along dim {dim} (shape {tuple(x.shape)})"
            )
        return dim

    def training_factor(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The θ a training batch of ``batch`` examples is multiplied by, pruned units at 0:
        ``(batch, U)``, or ``(1, U)`` with ``noise="batch"``."""
        return self._keep(self._training_sample(batch).to(dtype))

    def multiply(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        dim: int = 1,
        relu_after: bool = False,
        inplace: bool = False,
    ) -> torch.Tensor:
        """``x`` times a :meth:`training_factor` ``theta``, broadcast over every dimension but the
        batch and ``dim`` (non-negative). ``relu_after``: see :meth:`forward`; ``inplace``: ``x``
        may be overwritten (nothing else has seen it and its producer's backward pass does not
        read it)."""
        last = x.dim() > 2 and dim == x.dim() - 1 and (inplace or relu_after)  # (B, T, U)
        if (
            (last or (dim == 1 and (x.dim() > 2 or (relu_after and x.dim() == 2))))
            and x.is_contiguous()
            and not torch.compiler.is_compiling()
            and torch.is_grad_enabled()
        ):
            return gate_multiply(x, theta, inplace, relu_after, last)
        return broadcast_multiply(x, theta, dim, relu_after)

    def _keep(self, theta: torch.Tensor) -> torch.Tensor:
        """``theta`` with the pruned units' factors set to 0.

        In eager mode the multiply is skipped while no unit is pruned (known from the ``pruned``
        buffer's version, so a CUDA gate syncs once per change of the mask, not per step).
        """
        if not torch.compiler.is_compiling():
            version = (self.pruned._version, self.pruned.data_ptr())
            if self._any_pruned[0] != version:
                self._any_pruned = (version, bool(self.pruned.any()))
            if not self._any_pruned[1]:
                return theta
        return theta * (~self.pruned).to(theta.dtype)

    def _training_sample(self, batch: int) -> torch.Tensor:
        """θ for a training batch of ``batch`` examples: ``(batch, U)``, or ``(1, U)`` with
        ``noise="batch"``; a shared gate's sites reuse one draw per forward pass."""
        if not self.shared:
            return self._draw(batch)
        if torch.compiler.is_compiling():  # one traced draw, reused by the other sites
            if self._sample is None or self._sample_batch != batch:
                self._sample = self._draw(batch)
                self._sample_batch = batch
            return self._sample
        if self._seed is None:  # no pre-hook ran: the first site takes the seed
            self.reseed()
        with replay(self._seed, self.pruned.device):  # type: ignore[arg-type]
            return self._draw(batch)

    def _draw(self, batch: int) -> torch.Tensor:
        per_batch = self.noise == "batch"
        shard = _NOISE_SHARD.get() if _OPEN_SHARDS[0] else None
        if shard is None:
            return self.sample(1 if per_batch else batch)
        rank, world, global_batch = shard
        if batch != len(range(rank, global_batch, world)):
            raise InputError(
                f"rank {rank} of {world} got {batch} examples of a global batch of {global_batch}"
            )
        if per_batch:  # the ranks' streams are in step: every rank draws the same θ
            return self.sample(1)
        return self.sample(global_batch)[rank::world]

    def select(self, keep: torch.Tensor) -> Gate:
        """A new gate of the same family over the units where ``keep`` is True.

        Every per-unit parameter and buffer is sliced; the kept units' posteriors are unchanged,
        so the new gate's ``expected()``, ``snr()`` and draws are those of the kept units here.
        The new gate is not shared and holds no cached terms.

        Args:
            keep: a boolean mask of shape ``(num_units,)`` with at least one True.

        Raises:
            InputError: ``keep`` has the wrong shape or keeps no unit.
        """
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.pruned.device)
        if keep.shape != (self.num_units,) or not keep.any():
            raise InputError(
                f"keep must be a boolean mask of {self.num_units} units with at least one True, "
                f"got shape {tuple(keep.shape)} with {int(keep.sum())} kept"
            )
        self.clear_sample()
        new = copy.deepcopy(self)
        for name, t in [*new._parameters.items(), *new._buffers.items()]:
            if t is not None and t.dim() >= 1 and t.shape[0] == self.num_units:
                sliced = t.detach()[keep].clone()
                if name in new._parameters:
                    new._parameters[name] = nn.Parameter(sliced, requires_grad=t.requires_grad)
                else:
                    new._buffers[name] = sliced
        new.num_units = int(keep.sum())
        new.shared = False
        new._any_pruned = (None, True)
        for attr in ("unit_blocks", "unit_multiple"):
            vars(new).pop(attr, None)
        return new

    def clear_sample(self) -> None:
        """Forget the θ (the seed) a shared gate's sites share: the next site draws afresh."""
        self._sample = None
        self._seed = None

    def reseed(self) -> None:
        """Start a shared gate's forward pass: take the seed every site draws its θ from (one draw
        of the CPU's global random stream)."""
        self._sample = None
        self._seed = new_seed()

    def extra_repr(self) -> str:
        noise = "" if self.noise == "example" else f", noise={self.noise!r}"
        return f"units={self.num_units}{noise}"


GATE.append(Gate)  # for _compiled, which this module imports
