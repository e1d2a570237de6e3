"""A compiled step's gated convolution before a max-pool, for gates whose θ may be negative.

A gated convolution before an (optional ReLU and a) max-pool moves its multiply past the pool in
training (``_defer.py``) only where θ ≥ 0: max-pooling x·θ picks x's maximum only then. For the
variational family's Gaussian θ the compiled step kept the convolution's output for the gradient
of θ instead (2.1–2.2× the plain step's bytes on LeNet-5, BENCHMARKS §3). :class:`SignedMaxPool`
pools x·θ itself, as one autograd function that keeps only the pooled values and their indices,
which the plain graph keeps for its pool: each pooled value is x·θ at its window's argmax, so
Σ g·y/θ over the pooled values is the gradient of θ, for θ of either sign.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._compiled import factor_grad
from ._mul import relu_takes_over


def no_padding_window(pool: nn.Module) -> bool:
    """No window of the max-pool can hold padding alone (its -inf, which a ReLU after would make
    0): no padding or no dilation, in any dimension (an adaptive pool has neither)."""
    pad, dil = getattr(pool, "padding", 0), getattr(pool, "dilation", 1)
    pads, dils = (p if isinstance(p, tuple | list) else (p,) for p in (pad, dil))
    return all(p == 0 or d == 1 for p in pads for d in dils)


def signed_ok(children: list, act: int | None, k: int) -> bool:
    """θ of either sign (variational) may be pooled with the max-pool ``children[k]`` in a
    compiled step (:class:`SignedMaxPool`), after no activation or an ``nn.ReLU``
    that passes its input on, with no window of padding alone."""
    pool, relu = children[k], None if act is None else children[act]
    return "Max" in type(pool).__name__ and (
        relu is None
        or (
            type(relu) is nn.ReLU
            and no_padding_window(pool)
            and relu_takes_over in relu._forward_hooks.values()
        )
    )


def _max_pool_with_indices(pool: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool`` (an ``nn.MaxPool*d`` or ``nn.AdaptiveMaxPool*d``) on ``x``, with its indices."""
    d = x.dim() - 2
    if "Adaptive" in type(pool).__name__:
        adaptive = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[d - 1]
        return adaptive(x, pool.output_size, return_indices=True)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
    return fn(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
              ceil_mode=pool.ceil_mode, return_indices=True)  # fmt: skip


class SignedMaxPool(torch.autograd.Function):
    """y = maxpool(x·θ), or relu of it, for θ of either sign (the variational family's), keeping
    y, the pool's indices and θ: what the plain graph keeps for the pool, not x. Each pooled value
    is x·θ at its window's argmax, so the gradient of θ is Σ g·y/θ over the pooled values (0
    where θ = 0), and x's gradient goes back through the indices, times θ. (relu commutes with
    max, so relu(maxpool(x·θ)) is maxpool(relu(x·θ)), in the order inductor runs faster.)"""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, factor: torch.Tensor, pool: nn.Module, relu: bool
    ) -> torch.Tensor:
        y, indices = _max_pool_with_indices(pool, x * factor)
        if relu:
            y = torch.relu(y)
        ctx.save_for_backward(y, indices, factor)
        ctx.shape, ctx.relu = x.shape, relu
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂L/∂x and ∂L/∂θ from the gradient of the pooled output (the class docstring)."""
        y, indices, factor = ctx.saved_tensors
        if ctx.relu:
            grad = torch.where(y > 0, grad, 0.0)
        b, c = ctx.shape[:2]
        grad_x = grad.new_zeros(b, c, math.prod(ctx.shape[2:]))
        grad_x.scatter_add_(2, indices.reshape(b, c, -1), grad.reshape(b, c, -1))
        return grad_x.view(ctx.shape) * factor, factor_grad(grad, y, factor), None, None
