"""The gate's training multiply as one autograd function (eager mode), and the hand-off that lets
a ReLU right after a gate take over the tensor the gate keeps for its backward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InputError

ATTR = "_compressdrop_gate_input"
_OFF = [0]  # open hand_overs_off() contexts


@contextlib.contextmanager
def hand_overs_off() -> Iterator[None]:
    """Inside this context every gate multiplies at its own layer and keeps its own input: no
    ReLU takes over what it keeps (:func:`hand_over_to_relus`), no pool its multiply
    (``compressdrop/gates/_defer.py``). The same function with more memory and time; what a
    second derivative through the gates (``create_graph=True``) needs. The switch is read when a
    layer runs: under activation checkpointing (``torch.utils.checkpoint``) the backward pass
    runs the forward again, so run ``backward()`` inside the context too (outside it the
    recomputation hands over again and PyTorch raises ``CheckpointError``)."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def wrapper_pre_hook(module: nn.Module, args: Any) -> None:
    """The forward pre-hook of every gated wrapper (``compressdrop.gating.gated.Gated`` and its
    kin). It does nothing: a hooked submodule turns fused fast paths off
    (``nn.TransformerEncoderLayer``'s in eval), which read the wrapped weights directly and would
    skip the gate."""


class _Kept:
    """What a gate multiply keeps for the gradient of θ: its input x, or (``divide``) a tensor
    that is x·θ where it matters: its own output when it multiplied in place, or the output of
    the ReLU that is the only reader of its output (see :func:`relu_takes_over`). ``version``
    guards against an in-place change before the backward pass."""

    __slots__ = ("divide", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, divide: bool = False) -> None:
        self.tensor, self.version, self.divide = tensor, tensor._version, divide


class _GateMul(torch.autograd.Function):
    """y = x · θ for x of shape (B, U, ...) and θ of shape (n, U), n ∈ {B, 1}, in eager mode.

    The same values and gradients as broadcasting ``x * θ.reshape(n, U, 1, ...)``, but the
    gradient of θ is a batched dot product instead of a full-size product followed by a
    reduction (one pass over the activation fewer, no temporary of its size).

    The gradient of θ needs x. When the only reader of y is a ReLU (a module right after the gated
    layer in an ``nn.Sequential``, hooked by :func:`hand_over_to_relus`), the gate multiplies in
    place and keeps that ReLU's output r instead, which the ReLU and the next layer keep anyway:
    no activation-sized tensor is allocated or kept beyond what the plain net has. Exact: the
    gradient g reaching y is 0 wherever y ≤ 0 (ReLU's derivative), and y = r elsewhere, so
    Σ g·x = Σ g·y/θ = Σ g·r/θ for θ ≠ 0; for θ = 0, y = r = 0 and Σ g·x = 0 as well, since g = 0
    there too. (Before the ReLU has run the gate keeps y itself and divides by θ the same way.)
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, theta: torch.Tensor, inplace: bool = False, handoff: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(theta)
        factor = theta.reshape(theta.shape + (1,) * (x.dim() - 2))
        if inplace:
            ctx.mark_dirty(x)
            y = x.mul_(factor)
            kept = _Kept(y.detach(), divide=True)  # an alias: no cycle through the output
        else:
            y = x * factor
            kept = _Kept(x)
        ctx.kept = kept
        if handoff or inplace:  # only then: a tensor kept by the user would hold x alive
            setattr(y, ATTR, kept)  # read (and removed) by the ReLU's hook or gate_multiply
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (theta,) = ctx.saved_tensors
        kept: _Kept = ctx.kept
        if kept.divide and torch.is_grad_enabled():
            raise InputError(
                "compressdrop: a second derivative (create_graph=True) through a gate that "
                "handed its input over to the ReLU or pool after it is not supported: run the "
                "forward pass inside compressdrop.gates.hand_overs_off()"
            )
        t = kept.tensor
        if t._version != kept.version:
            raise InputError(
                "compressdrop: a tensor a gate needs for its gradient was modified by an "
                "in-place operation after the gate (change a copy, run the forward pass inside "
                "compressdrop.gates.hand_overs_off(), or detach the gates)"
            )
        shape = theta.shape + (1,) * (t.dim() - 2)
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * theta.reshape(shape)
        if ctx.needs_input_grad[1]:
            b, u = t.shape[0], t.shape[1]
            if t.dim() == 2:
                grad_theta = grad * t
            else:  # (B, U, rest) · (B, U, rest) → (B, U)
                grad_theta = torch.linalg.vecdot(grad.reshape(b, u, -1), t.reshape(b, u, -1))
            if kept.divide:
                grad_theta = torch.where(theta != 0, grad_theta / theta, 0.0)
            if theta.shape[0] != b:
                grad_theta = grad_theta.sum(0, keepdim=True)
        return grad_x, grad_theta, None, None


def gate_multiply(
    x: torch.Tensor, theta: torch.Tensor, inplace: bool, handoff: bool
) -> torch.Tensor:
    """:class:`_GateMul` of ``x`` and ``theta``; ``handoff``: a hooked ReLU alone reads the result
    (see :func:`hand_over_to_relus`); ``inplace``: ``x`` may be overwritten (its producer's
    backward pass does not read it, and nothing else has seen it)."""
    y = _GateMul.apply(x, theta, inplace, handoff)
    if inplace:  # autograd bumps the version of a tensor changed in place once forward returns
        kept = y.__dict__[ATTR] if handoff else y.__dict__.pop(ATTR)
        kept.version = kept.tensor._version
    return y


# ReLU and ReLU6: the derivative is 0 wherever the output differs from the input
RELUS = (nn.ReLU, nn.ReLU6)
# layers whose backward pass reads their input and weights, not their output
INPLACE_OK = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def relu_takes_over(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook of a ReLU that reads a gate's output only: the gate keeps the ReLU's output
    in place of its own input (see :class:`_GateMul`). Does nothing for any other input."""
    if torch.compiler.is_compiling() or not inputs or not isinstance(inputs[0], torch.Tensor):
        return  # compiled: the gate multiply is plain tensor code there, nothing to hand over
    kept = inputs[0].__dict__.pop(ATTR, None)
    if kept is None or not isinstance(output, torch.Tensor):
        return
    # (ReLU6 also clamps at 6: its derivative is 0 there too, so the identity still holds)
    alias = output.detach()  # the same storage and version counter, no autograd history
    kept.tensor, kept.version, kept.divide = alias, output._version, True


def hand_over_to_relus(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Let each ReLU that reads a gated layer's output only keep what the gate needs.

    A ``wrapper`` (a gated layer, exactly of that type) followed by an ``nn.ReLU`` or
    ``nn.ReLU6`` in an ``nn.Sequential`` passes its output to that ReLU alone, so its gate can
    keep the ReLU's output for the backward pass instead of the layer's (:class:`_GateMul`): a
    gated training step keeps no more activation memory there than a plain one.
    :func:`remove_relu_hooks` undoes it (``compressdrop.detach`` calls it).
    """
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        for gated, after in zip(children, children[1:], strict=False):
            if type(gated) is not wrapper or type(after) not in RELUS:
                continue
            if relu_takes_over not in after._forward_hooks.values():
                after.register_forward_hook(relu_takes_over)
            vars(gated)["relu_after"] = True
            # the layers whose backward pass does not read their output may be multiplied in place
            vars(gated)["gate_inplace"] = isinstance(getattr(gated, "module", None), INPLACE_OK)


def remove_relu_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`hand_over_to_relus` registered."""
    for m in model.modules():
        for key in [k for k, fn in m._forward_hooks.items() if fn is relu_takes_over]:
            del m._forward_hooks[key]
        vars(m).pop("relu_after", None)
        vars(m).pop("gate_inplace", None)
