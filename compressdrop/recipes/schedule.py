"""The KL weight schedule β(t) of the ELBO loss NLL + β(t)·KL/N, and a stage's learning-rate
schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

__all__ = ["LR_SCHEDULES", "KLSchedule", "lr_factor"]

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class KLSchedule:
    """β(t): 0 for ``delay`` epochs, then linear up to ``beta`` over ``warmup`` epochs, then flat.

    ``t`` is fractional epochs since the start of the sparsify stage, so the ramp is smooth within
    an epoch. Molchanov et al. keep 0 for 5 epochs and ramp to 1 by epoch 20 (delay=5, warmup=15).

    Args:
        beta: the final weight (1 is the ELBO; > 1 buys more compression).
        warmup: epochs of the linear ramp (0: β from the first step).
        delay: epochs at weight 0 before the ramp.
    """

    beta: float = 1.0
    warmup: float = 0.0
    delay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("beta", "warmup", "delay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise InputError(f"{name}: must be a number ≥ 0, got {value!r}")

    def __call__(self, t: float) -> float:
        if t < self.delay:
            return 0.0
        if self.warmup <= 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, (t - self.delay) / self.warmup)


def lr_factor(schedule: str, done: float) -> float:
    """The factor on a stage's learning rates after ``done`` of it (a fraction in [0, 1)):
    1 for ``constant``; ½·(1 + cos(π·done)) for ``cosine``, from 1 at the first step towards 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
    raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
