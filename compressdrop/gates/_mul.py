"""The gate's training multiply as one autograd function (eager mode)."""

from __future__ import annotations

from typing import Any

import torch


class _GateMul(torch.autograd.Function):
    """y = x · θ for x of shape (B, U, ...) and θ of shape (n, U), n ∈ {B, 1}, in eager mode.

    The same values and gradients as broadcasting ``x * θ.reshape(n, U, 1, ...)``, but the
    gradient of θ is a batched dot product instead of a full-size product followed by a
    reduction (one pass over the activation fewer, no temporary of its size).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, theta)
        return x * theta.reshape(theta.shape + (1,) * (x.dim() - 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, theta = ctx.saved_tensors
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * theta.reshape(theta.shape + (1,) * (x.dim() - 2))
        if ctx.needs_input_grad[1]:
            b, u = x.shape[0], x.shape[1]
            # (B, U, rest) · (B, U, rest) → (B, U)
            grad_theta = torch.linalg.vecdot(grad.reshape(b, u, -1), x.reshape(b, u, -1))
            if theta.shape[0] != b:
                grad_theta = grad_theta.sum(0, keepdim=True)
        return grad_x, grad_theta
