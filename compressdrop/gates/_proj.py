"""A head gate and the projection after it as one autograd function (eager training).

A head gate multiplies an attention's output x (B, ..., H·D) head by head, and the output
projection reads the product. Computed apart, autograd keeps both: x (which the attention's own
backward pass usually keeps anyway) for the gate's gradient, and x·θ for the projection's weight
gradient, one activation-sized tensor more than the plain model keeps (the tiny ViT's log-normal
step kept 1.13× the plain step's bytes, BENCHMARKS §3). :class:`_GatedLinear` keeps x and θ only
and multiplies again in its backward pass, one pass over x: the gated step keeps what the plain
one keeps there. The same values (the product and the projection as the unfused code computes
them) and the same gradients to rounding, first and second order (its backward is
differentiable tensor code); ``tests/test_gate_memory.py`` checks both.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from . import _mul
from ._defer import _clean, no_global_hooks
from .base import Gate

_OFF = [0]  # open off() contexts


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Compute head gates and their projections apart inside this context, as before the fusion:
    the same function, for measuring what the fusion saves and costs."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


# projections whose forward is F.linear(x, weight, bias) and nothing else
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _project(
    xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool
) -> torch.Tensor:
    """The projection's own forward: F.linear, or Conv1D's addmm."""
    if not conv1d or bias is None:
        return F.linear(xs, weight.t() if conv1d else weight, bias)
    rows = torch.addmm(bias, xs.reshape(-1, xs.shape[-1]), weight)
    return rows.view(*xs.shape[:-1], weight.shape[1])


def _scaled(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (B, ..., H·D) with head h of example b multiplied by θ[b, h] (θ of shape (B or 1, H))."""
    n, h = theta.shape
    # reshape, not unflatten and flatten: a vectorized backward pass (is_grads_batched,
    # jacobian(vectorize=True)) vmaps this, and those two have no batching rule there
    heads = x.reshape(*x.shape[:-1], h, x.shape[-1] // h)
    return (heads * theta.reshape(n, *(1,) * (x.dim() - 2), h, 1)).reshape(x.shape)


class _GatedLinear(torch.autograd.Function):
    """y = linear(x·θ, W, b), θ per example and head (``conv1d``: W stored (in, out), as
    transformers' ``Conv1D`` stores it); keeps x and θ, not x·θ."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        theta: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv1d: bool,
    ) -> torch.Tensor:
        _, need_theta, need_w, _, _ = ctx.needs_input_grad
        # x only for θ's and the weight's gradients: x's own needs θ and the weight alone
        ctx.save_for_backward(x if need_theta or need_w else None, theta, weight)
        ctx.conv1d = conv1d
        return _project(_scaled(x, theta), weight, bias, conv1d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, theta, weight = ctx.saved_tensors
        need_x, need_theta, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = grad_theta = grad_w = grad_b = None
        if need_x or need_theta:
            g_scaled = grad @ (weight.t() if ctx.conv1d else weight)  # ∂L/∂(x·θ), x's shape
            if need_x:
                grad_x = _scaled(g_scaled, theta)
            if need_theta:
                n, h = theta.shape
                # sizes spelled out, no -1: an empty batch or sequence has none to infer
                rest = math.prod(x.shape[1:-1])
                products = (g_scaled * x).reshape(x.shape[0], rest, h, x.shape[-1] // h)
                grad_theta = products.sum((1, 3))  # (B, H)
                if n != x.shape[0]:
                    grad_theta = grad_theta.sum(0, keepdim=True)
        if need_w:
            rows = grad.reshape(-1, grad.shape[-1])
            scaled = _scaled(x, theta).reshape(rows.shape[0], x.shape[-1])
            grad_w = scaled.t() @ rows if ctx.conv1d else rows.t() @ scaled
        if need_b:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_theta, grad_w, grad_b, None


def _runs_as_is(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's forward and nothing else: no hook, not compiled
    on its own (``_defer._clean``), no forward set on the instance (as accelerate's
    ``add_hook_to_module`` does)."""
    return _clean(module, ()) and "forward" not in vars(module)


def may_fuse(gate: Gate, layer: nn.Module, x: torch.Tensor) -> bool:
    """What any fusion of a gate with the layer beside it (this module's, ``_bn.py``'s) needs:
    eager training with gradients, both in training mode, a gate class without its own
    ``forward``, ``check_units`` or ``multiply``, no hook (forward or backward) on either or
    module-wide, no forward set on either instance, not under autocast, forward-mode AD, a
    ``torch.func`` transform (the fused functions have neither a ``jvp`` nor a
    ``setup_context``) or :func:`~compressdrop.gates.hand_overs_off`."""
    cls = type(gate)
    return not (
        not (gate.training and layer.training)
        or _mul._OFF[0]
        or cls.forward is not Gate.forward
        or cls.check_units is not Gate.check_units
        or cls.multiply is not Gate.multiply
        or not _runs_as_is(layer)
        or not _runs_as_is(gate)
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)
        or fwAD._current_level >= 0  # a dual level is open: tangents may flow
        or torch._C._are_functorch_transforms_active()
        or not no_global_hooks()
    )


def fused_projection(wrapper: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The head-gated projection of ``x`` as :class:`_GatedLinear`, or None where it does not
    apply: an output projection that is not a stock ``nn.Linear`` or transformers' ``Conv1D`` (a
    parametrized one is another class), inside :func:`off`, and wherever :func:`may_fuse` says
    no (outside eager training with gradients, hooks, a gate class with its own ``forward``,
    ``check_units`` or ``multiply``, a forward set on either instance, autocast, forward-mode AD,
    a ``torch.func`` transform, :func:`~compressdrop.gates.hand_overs_off`).
    ``wrapper``: a :class:`~compressdrop.gating.gated.HeadGated`."""
    proj: Any = wrapper.module
    gate = cast(Gate, wrapper.gate)
    conv1d = (type(proj).__module__, type(proj).__name__) == _mul.CONV1D  # weight (in, out)
    if (
        _OFF[0]
        or (type(proj) not in _LINEARS and not conv1d)
        or not may_fuse(gate, proj, x)
        or x.dim() < 2
        or x.shape[-1] != gate.num_units * wrapper.head_dim
    ):
        return None
    theta = gate.training_factor(x.shape[0], x.dtype)
    return _GatedLinear.apply(x, theta, proj.weight, proj.bias, conv1d)
