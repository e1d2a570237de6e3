"""A BatchNorm and the gate after it as one autograd function (eager training).

Computed apart, autograd keeps the BatchNorm's input x for the BatchNorm's backward pass and its
output y for the gate's (the gradient of θ is Σ g·y over each example's positions): one
activation-sized tensor more than the plain model keeps. Where no ReLU or pool after the layer
takes over what the gate keeps (``_mul.py``, ``_defer.py``), as for the BatchNorm whose output a
residual block adds its shortcut to, that was the gated ResNet's extra memory (1.23–1.24× the
plain step's bytes kept for backward, BENCHMARKS §3). :class:`_GatedBatchNorm` keeps x (which the
BatchNorm keeps anyway), θ and the batch's mean and 1/std per channel, and gets Σ g·y from them in
its backward pass: y = (x − mean)·invstd·γ + β, so Σ g·y = γ·Σ g·(x − mean)·invstd + β·Σ g. The
same values as ``bn(x) * θ``, and the same gradients to rounding
(``tests/test_gate_batchnorm.py``). For a second derivative (``create_graph=True``) the backward
pass computes y again as differentiable tensor code instead (``native_batch_norm_backward`` has
a derivative of its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._dot import unit_dot
from ._mul import _factor_shape
from ._proj import may_fuse
from .base import Gate

_OFF = [0]  # open off() contexts
# BatchNorms whose forward is nn.modules.batchnorm._BatchNorm's and nothing else
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Compute BatchNorms and their gates apart inside this context, as before the fusion: the
    same function, for measuring what the fusion saves and costs."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


class _GatedBatchNorm(torch.autograd.Function):
    """z = batch_norm(x) · θ in training mode (batch statistics; the running ones updated in
    place as ``F.batch_norm`` does), θ (B or 1, C); keeps x, θ and the batch's statistics."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        theta: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, theta, weight, bias, mean, invstd)
        ctx.eps = eps
        return y.mul_(theta.reshape(_factor_shape(theta, x.dim(), False)))  # y is ours alone

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, theta, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_theta, need_w, need_b = ctx.needs_input_grad[:4]
        b, c = x.shape[:2]
        grad_theta = grad_x = grad_w = grad_b = None
        if need_theta and torch.is_grad_enabled():  # create_graph: y as a function of x, γ, β
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
            grad_theta = torch.linalg.vecdot(grad.reshape(b, c, -1), y.reshape(b, c, -1))
        elif need_theta:
            # in the statistics' dtype: float32 for a half-precision x where the BatchNorm's
            # parameters are float32 (or on CUDA), x's own otherwise
            g = grad.reshape(b, c, -1).to(mean.dtype)
            sum_g = g.sum(-1)
            # Σ g·y = γ·Σ g·x̂ + β·Σ g, (B, C), with Σ g·(x − mean) = Σ g·x − mean·Σ g: no
            # centred copy of x (a pass and, at 32 MB or more, fresh pages: _dot.py), at the
            # cost of a factor |mean| / spread of float32's precision (tests/test_gate_dot.py)
            dot = unit_dot(g, x.reshape(b, c, -1).to(mean.dtype)) - mean * sum_g
            grad_theta = (dot * (invstd * weight) + sum_g * bias).to(theta.dtype)
        if grad_theta is not None and theta.shape[0] != b:  # one θ for the batch
            grad_theta = grad_theta.sum(0, keepdim=True)
        if need_x or need_w or need_b:
            grad_y = grad * theta.reshape(_factor_shape(theta, x.dim(), False))
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, weight, None, None, mean, invstd, True, ctx.eps,
                [need_x, need_w, need_b],
            )  # fmt: skip
        return grad_x, grad_theta, grad_w, grad_b, None, None, None, None


def fused_batchnorm(wrapper: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The gated output of the wrapped BatchNorm on ``args`` as :class:`_GatedBatchNorm`, or None
    where it does not apply: a layer that is not a stock affine ``nn.BatchNorm1d/2d/3d`` (attach
    gates no other) with a weight and a bias, a wrapper whose output a ReLU or pool after it takes
    over (those keep nothing either), an input that is not one contiguous tensor with more than
    one value per channel, inside :func:`off`, and wherever :func:`._proj.may_fuse` says no
    (outside eager training with gradients, hooks, a gate class of its own, autocast, ...).
    ``wrapper``: a :class:`~compressdrop.gating.gated.Gated`."""
    bn: Any = wrapper.module
    gate = cast(Gate, wrapper.gate)
    if (
        type(bn) not in _BATCHNORMS
        or not bn.affine
        or bn.weight is None  # either set to None since: F.batch_norm takes that
        or bn.bias is None
        or kwargs
        or len(args) != 1
    ):
        return None
    (x,) = args
    flags = vars(wrapper)
    if (
        _OFF[0]
        or flags.get("defer_ok") or flags.get("relu_after") or flags.get("inplace_alone")
        or wrapper.unit_dim != 1
        or not isinstance(x, torch.Tensor)
        or not may_fuse(gate, bn, x)
        or x.dim() < 2
        or x.shape[1] != gate.num_units
        or x.numel() <= x.shape[1]  # one value per channel or none: BatchNorm's own error
        or not x.is_contiguous()
    ):  # fmt: skip
        return None
    bn._check_input_dim(x)
    theta = gate.training_factor(x.shape[0], x.dtype)  # first: a draw that fails changes nothing
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:  # as _BatchNorm.forward
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return _GatedBatchNorm.apply(x, theta, bn.weight, bn.bias, *running, momentum, bn.eps)
