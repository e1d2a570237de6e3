"""The gate protocol: a per-unit multiplicative noise layer with a KL term and an SNR."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from ..errors import InputError

__all__ = ["Gate", "noise_shard"]

MIN_VARIANCE = 1e-24
# (rank, world size, global batch) inside noise_shard, None outside it
_NOISE_SHARD: ContextVar[tuple[int, int, int] | None] = ContextVar(
    "compressdrop_noise_shard", default=None
)


@contextlib.contextmanager
def noise_shard(rank: int, world: int, global_batch: int) -> Iterator[None]:
    """Make every gate draw the noise of this rank's slice of a global batch.

    In a data-parallel run each of ``world`` processes sees examples ``rank, rank + world, ...`` of
    a global batch of ``global_batch`` examples. Inside this context a gate draws θ for the whole
    global batch and keeps those rows, so with the ranks' random streams in step the W processes
    together draw exactly the noise one process would draw for the global batch, and a distributed
    run follows the single-process run. A forward pass whose batch is not this rank's share raises
    :class:`~compressdrop.errors.InputError`.

    The setting belongs to the current thread (and asyncio task); contexts nest, and leaving one,
    by an exception too, restores the setting it replaced.

    Args:
        rank: this process's index, ``0 <= rank < world``.
        world: the number of processes sharing the global batch.
        global_batch: the examples in the global batch.

    Raises:
        InputError: ``world`` or ``global_batch`` is below 1, or ``rank`` is not in
            ``range(world)``.

    Example:
        >>> import torch
        >>> from compressdrop.gates import LogNormalGate, noise_shard
        >>> gate = LogNormalGate(4)
        >>> with noise_shard(rank=1, world=2, global_batch=6):
        ...     y = gate(torch.ones(3, 4))  # rows 1, 3, 5 of the global batch's noise
        >>> y.shape
        torch.Size([3, 4])
    """
    if world < 1 or global_batch < 1 or not 0 <= rank < world:
        raise InputError(
            f"noise_shard needs 0 <= rank < world and global_batch >= 1, got rank={rank}, "
            f"world={world}, global_batch={global_batch}"
        )
    token = _NOISE_SHARD.set((int(rank), int(world), int(global_batch)))
    try:
        yield
    finally:
        _NOISE_SHARD.reset(token)


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
    KL, as for L0).

    When one gate serves several sites of a coupled group (a residual stream, say), every site in a
    forward pass must see the same θ: the first site samples and the others reuse the sample until
    ``clear_sample`` runs (attach registers a forward pre-hook on the root model that calls it).
    """

    family: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 1.0
    unit_cost: torch.Tensor  # buffer (num_units,)
    pruned: torch.Tensor  # bool buffer (num_units,)

    def __init__(self, num_units: int) -> None:
        super().__init__()
        if num_units < 1:
            raise InputError(f"num_units must be ≥ 1, got {num_units}")
        self.num_units = int(num_units)
        self.register_buffer("unit_cost", torch.ones(num_units))
        self.register_buffer("pruned", torch.zeros(num_units, dtype=torch.bool))
        self.shared = False
        self._sample: torch.Tensor | None = None

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
        return value.to(next(self.parameters()).dtype)

    def kl_per_unit(self) -> torch.Tensor:
        """KL(q(θ_u) ‖ p(θ_u)) of each unit, shape ``(num_units,)``, differentiable."""
        return self._out(kl_divergence(self.posterior(), self.prior()))

    def kl(self) -> torch.Tensor:
        """The gate's regularizer Σ_u cost_u · KL(q(θ_u) ‖ p(θ_u)), a differentiable scalar."""
        return (self.unit_cost * self.kl_per_unit()).sum()

    def expected(self) -> torch.Tensor:
        """E[θ] per unit, shape ``(num_units,)``: the factor eval mode multiplies by."""
        return self._out(self.posterior().mean)

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
    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Multiply each unit of ``x`` by its factor: a sample of θ in training, E[θ] in eval.

        Units marked ``pruned`` are multiplied by 0 in both modes.

        Args:
            x: a batch, examples along dim 0.
            dim: the dimension of ``x`` that holds the units (negative counts from the end).

        Returns:
            ``x`` times θ, broadcast over every dimension but the batch and ``dim``.

        Raises:
            InputError: ``x`` does not have ``num_units`` entries along ``dim``.
        """
        dim = dim % x.dim()
        if x.shape[dim] != self.num_units:
            raise InputError(
                f"{type(self).__name__} has {self.num_units} units but the input has "
                f"{x.shape[dim]} along dim {dim} (shape {tuple(x.shape)})"
            )
        keep = (~self.pruned).to(x.dtype)
        if self.training:
            theta = self._training_sample(x.shape[0]).to(x.dtype) * keep  # (B, U)
            shape = [x.shape[0]] + [1] * (x.dim() - 1)
            shape[dim] = self.num_units
        else:
            theta = self.expected().to(x.dtype) * keep  # (U,)
            shape = [1] * x.dim()
            shape[dim] = self.num_units
        return x * theta.reshape(shape)

    def _training_sample(self, batch: int) -> torch.Tensor:
        if not self.shared:
            return self._draw(batch)
        if self._sample is None or self._sample.shape[0] != batch:
            self._sample = self._draw(batch)
        return self._sample

    def _draw(self, batch: int) -> torch.Tensor:
        shard = _NOISE_SHARD.get()
        if shard is None:
            return self.sample(batch)
        rank, world, global_batch = shard
        if batch != len(range(rank, global_batch, world)):
            raise InputError(
                f"rank {rank} of {world} got {batch} examples of a global batch of {global_batch}"
            )
        return self.sample(global_batch)[rank::world]

    def clear_sample(self) -> None:
        """Forget the θ that a shared gate's sites reuse, so that the next site draws afresh."""
        self._sample = None

    def extra_repr(self) -> str:
        return f"units={self.num_units}"
