"""The gate's training multiply as one autograd function (eager mode), and the hand-offs that let
a gate keep no tensor of its own for its backward pass: a ReLU right after it takes over what it
keeps, or, where one operation alone reads the gated layer's output and keeps it anyway (the
GELU of a transformer layer's MLP), the gate multiplies in place and keeps that output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._families import BERT_LIKE, LLAMA_LIKE, hf_module
from ..errors import InputError
from ._compiled import (
    _OFF,
    OUR_RELU_HOOKS,
    TRANSFORMER_LAYERS,
    read_by_dropout,
    read_by_relu_in,
    relu_passed,
    remove_relu_arming,
    unseen,
)
from ._dot import unit_dot

ATTR = "_compressdrop_gate_input"
# _OFF: open hand_overs_off() contexts (in _compiled, which reads it too)


@contextlib.contextmanager
def hand_overs_off() -> Iterator[None]:
    """Inside this context every gate multiplies at its own layer and keeps its own input: no
    ReLU takes over what it keeps (:func:`hand_over_to_relus`), no pool its multiply
    (``compressdrop/gates/_defer.py``), no BatchNorm before it or projection after it runs with
    it as one function (``_bn.py``, ``_proj.py``). The same function with more memory and
    time; what a second derivative through the gates (``create_graph=True``) needs. The switch
    is read when a layer runs: under activation checkpointing (``torch.utils.checkpoint``) the
    backward pass runs the forward again, so run ``backward()`` inside the context too (outside
    it the recomputation hands over again and PyTorch raises ``CheckpointError``). In a step
    compiled whole with ``fullgraph=True``, a checkpointed region that holds a gated layer and the
    ReLU or pool after it compiles only inside this context: the compiled hand-offs
    (``_compiled.py``) keep per-thread state, which dynamo refuses to change in such a region."""
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
    """y = x · θ for x of shape (B, U, ...) (or, ``last`` = B, of B·rest·U values, (B, ..., U) or
    (B·rest, U)) and θ of shape (n, U), n ∈ {B, 1}, in eager mode.

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
    Multiplied in place without a ReLU (:func:`hand_over_in_transformer_layers`), the gate keeps
    y and divides by θ wherever θ ≠ 0; where θ = 0 the true Σ g·x is lost, and 0 is given: a
    pruned unit's factor and a hard-concrete θ clamped at 0 have derivative 0 with respect to the
    gate's parameters, so nothing of it reaches them, and the other families draw θ ≠ 0.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        theta: torch.Tensor,
        inplace: bool = False,
        handoff: bool = False,
        last: int = 0,
    ) -> torch.Tensor:
        ctx.save_for_backward(theta)
        ctx.last = last
        if inplace:
            ctx.mark_dirty(x)
            xs = x.view(last, -1, theta.shape[1]) if last else x  # (B·rest, U) too; contiguous
            xs.mul_(theta.reshape(_factor_shape(theta, xs.dim(), bool(last))))
            y = x
            kept = _Kept(y.detach(), divide=True)  # an alias: no cycle through the output
        else:  # x is (B, U, ...) or (B, ..., U); no view of the output: a ReLU may change it
            y = x * theta.reshape(_factor_shape(theta, x.dim(), bool(last)))
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
        grad_x = grad_theta = None
        b, u = ctx.last or t.shape[0], theta.shape[1]
        g = grad.reshape(b, -1, u) if ctx.last else grad
        if ctx.needs_input_grad[0]:
            grad_x = g * theta.reshape(_factor_shape(theta, g.dim(), bool(ctx.last)))
            grad_x = grad_x.view(grad.shape)
        if ctx.needs_input_grad[1]:
            if ctx.last:  # (B, rest, U) · (B, rest, U) → (B, U)
                grad_theta = torch.linalg.vecdot(g, t.reshape(b, -1, u), dim=1)
            elif t.dim() == 2:
                grad_theta = grad * t
            else:  # (B, U, rest) · (B, U, rest) → (B, U)
                grad_theta = unit_dot(grad.reshape(b, u, -1), t.reshape(b, u, -1))
            if kept.divide:
                grad_theta = torch.where(theta != 0, grad_theta / theta, 0.0)
            if theta.shape[0] != b:
                grad_theta = grad_theta.sum(0, keepdim=True)
        return grad_x, grad_theta, None, None, None


def handoff_flags(wrapper: nn.Module) -> tuple[bool, bool]:
    """(``relu_after``, ``inplace``) for a gated wrapper's multiply of its layer's output: a
    hand-off only where a ReLU alone reads the output (or one operation that keeps it and leaves
    it: a GELU), so no hook of this wrapper or its gate, nor a global one, may see it or its
    gradient (:func:`~._compiled.unseen`); in place only where no hook of the layer saw it."""
    free = not _OFF[0] and unseen(wrapper)
    flags = wrapper.__dict__
    after = flags.get("relu_after", False) and free
    alone = flags.get("inplace_alone", False) and free
    layer: nn.Module = wrapper.module  # type: ignore[assignment]
    return after, flags.get("gate_inplace", False) and (after or alone) and not layer._forward_hooks


def kept_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """What the gates' multiplies in ``out``'s autograd graph keep for their backward pass outside
    autograd's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks`` do not see it):
    for a count of the memory a step keeps."""
    found, stack, done = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in done:
            continue
        done.add(node)
        kept = getattr(node, "kept", None)
        if isinstance(kept, _Kept):
            found.append(kept.tensor)
        stack.extend(f for f, _ in node.next_functions)
    return found


def _factor_shape(theta: torch.Tensor, dims: int, last: bool) -> tuple[int, ...]:
    """θ (n, U) shaped to broadcast over x of ``dims`` dimensions, units at 1 or (``last``) last."""
    n, u = theta.shape
    return (n, *(1,) * (dims - 2), u) if last else (n, u, *(1,) * (dims - 2))


def gate_multiply(
    x: torch.Tensor, theta: torch.Tensor, inplace: bool, handoff: bool, last: bool = False
) -> torch.Tensor:
    """:class:`_GateMul` of ``x`` and ``theta``; ``handoff``: a hooked ReLU alone reads the result
    (see :func:`hand_over_to_relus`); ``inplace``: ``x`` may be overwritten (its producer's
    backward pass does not read it, and nothing else has seen it); ``last``: the units are x's
    last dimension, not its second."""
    shape, base = x.shape, x._base
    # x, its layer's output reshaped (an nn.Linear's of (B, T, K) inputs): multiply that output
    # itself in place, since autograd copies the gradient of a view changed in place
    if last and inplace and base is not None and _reshaped(x, base):
        x = base
    y = _GateMul.apply(x, theta, inplace, handoff, shape[0] if last else 0)
    if inplace:  # autograd bumps the version of a tensor changed in place once forward returns
        kept = y.__dict__.pop(ATTR)
        kept.version = kept.tensor._version
        if y.shape != shape:  # the output multiplied, as the layer's reshaped output
            y = y.view(shape)
        if handoff:
            setattr(y, ATTR, kept)  # for the ReLU's hook
    return y


def _reshaped(x: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``x`` (contiguous) is all of ``base``, reshaped."""
    return base.is_contiguous() and base.numel() == x.numel() and base.data_ptr() == x.data_ptr()


# ReLU and ReLU6: the derivative is 0 wherever the output differs from the input
RELUS = (nn.ReLU, nn.ReLU6)
# activations that keep their input for their backward pass (and, not in place, leave it as is)
KEEP_THEIR_INPUT = (nn.GELU, nn.SiLU)
# transformers' Conv1D (GPT-2's): addmm(bias, x, weight), its weight stored (in, out)
CONV1D = ("transformers.pytorch_utils", "Conv1D")
# layers whose backward pass reads their input and weights, not their output
INPLACE_OK = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def relu_takes_over(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Any:
    """Forward hook of a ReLU that reads a gate's output only: the gate keeps the ReLU's output
    in place of its own input (see :class:`_GateMul`). Does nothing for any other input."""
    if torch.compiler.is_compiling():  # the gate applied the ReLU itself (_compiled.py)
        return inputs[0] if relu_passed(module) and type(module) is nn.ReLU else None
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        return None
    kept = inputs[0].__dict__.pop(ATTR, None)
    if kept is None or not isinstance(output, torch.Tensor):
        return None
    # (ReLU6 also clamps at 6: its derivative is 0 there too, so the identity still holds)
    alias = output.detach()  # the same storage and version counter, no autograd history
    kept.tensor, kept.version, kept.divide = alias, output._version, True
    return None


OUR_RELU_HOOKS.append(relu_takes_over)


def hand_over_to_relus(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Let each ReLU that reads a gated layer's output only keep what the gate needs.

    A ``wrapper`` (a gated layer, exactly of that type) followed by an ``nn.ReLU`` or
    ``nn.ReLU6`` in an ``nn.Sequential`` passes its output to that ReLU alone, so its gate can
    keep the ReLU's output for the backward pass instead of the layer's (:class:`_GateMul`): a
    gated training step keeps no more activation memory there than a plain one. Followed by an
    ``nn.GELU`` or ``nn.SiLU`` (not in place), which keep their input for their own backward
    pass, a layer whose backward pass does not read its output is multiplied in place and the
    gate keeps that same tensor. :func:`remove_relu_hooks` undoes it (``compressdrop.detach``
    calls it).
    """
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        named = list(seq._modules.items())
        for (name, gated), (after_name, after) in zip(named, named[1:], strict=False):
            if type(gated) is not wrapper:
                continue
            if type(after) in KEEP_THEIR_INPUT and not getattr(after, "inplace", False):
                _kept_by_its_reader(gated)
            elif type(after) in RELUS:
                _read_by_relu(gated, after, seq, (name, after_name))


def _read_by_relu(gated: nn.Module, relu: nn.Module, parent: nn.Module, names: tuple) -> None:
    """``relu`` alone reads the gated layer's output (``parent.<names[0]>`` and ``<names[1]>``):
    hooked, it takes over what the gate keeps; the output is multiplied in place where the
    layer's backward pass does not read it. (A compiled step: ``_compiled.py``.)"""
    if relu_takes_over not in relu._forward_hooks.values():
        relu.register_forward_hook(relu_takes_over)
    vars(gated)["relu_after"] = True
    vars(gated)["relu_module"] = relu
    read_by_relu_in(parent, *names)
    vars(gated)["gate_inplace"] = _inplace_ok(getattr(gated, "module", None))


def _kept_by_its_reader(gated: nn.Module) -> None:
    """One operation alone reads the gated layer's output and keeps it for its own backward pass:
    where the layer's backward pass does not read it, the gate multiplies it in place and keeps
    that same tensor."""
    if _inplace_ok(getattr(gated, "module", None)):
        vars(gated)["inplace_alone"] = vars(gated)["gate_inplace"] = True


# the layer's own activation function while an nn.ReLU module stands in for it
_OWN_ACTIVATION = "_compressdrop_activation"


def hand_over_in_transformer_layers(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Let the MLPs of PyTorch's transformer layers keep no tensor for their gates.

    In an ``nn.TransformerEncoderLayer`` or ``nn.TransformerDecoderLayer`` the activation alone
    reads ``linear1``'s output (the layer's ``_ff_block``), so a gated ``linear1`` (a ``wrapper``)
    may multiply it in place (a Linear's backward pass does not read its output). With a ReLU
    (``F.relu``, the layers' default, gets an ``nn.ReLU`` module in its place while the gates are
    attached, so that it can be hooked: a plain attribute, not a submodule) the ReLU takes over
    what the gate keeps, as in :func:`hand_over_to_relus`; with GELU, which keeps its input for
    its own backward pass, the gate keeps that same tensor, its output. Other activations are
    left alone.
    :func:`remove_relu_hooks` undoes it, the layer's own activation included.
    """
    for layer in model.modules():
        gated = getattr(layer, "linear1", None)
        if type(layer) not in TRANSFORMER_LAYERS or type(gated) is not wrapper:
            continue
        act: Any = layer.activation
        if act is F.relu:
            vars(layer)[_OWN_ACTIVATION] = act
            # a plain attribute, as the function was: no submodule is added, and a copy keeps it
            # (TransformerDecoderLayer.__setstate__ would put F.relu over a registered module)
            vars(layer)["activation"] = act = nn.ReLU()
        if type(act) in RELUS:
            _read_by_relu(gated, act, layer, ("linear1", "activation"))
            read_by_dropout(gated, layer)  # compiled: the dropout after it multiplies
        elif act is F.gelu or type(act) is nn.GELU:  # (the layers' F.gelu keeps its input too)
            _kept_by_its_reader(gated)


# blocks whose forward is known, by (module, class name): their layers whose output a ReLU module
# of the block alone reads (torchvision's ResNet blocks call self.relu, in place, right after
# bn1 and, in a Bottleneck, bn2; not after the last BN, whose output the shortcut is added to;
# SqueezeNet's Fire calls each of its three convolutions' own ReLU, in place, on its output)
_READ_BY_RELU = {
    ("compressdrop.models", "BasicBlock"): (("bn1", "relu"),),
    ("torchvision.models.resnet", "BasicBlock"): (("bn1", "relu"),),
    ("torchvision.models.resnet", "Bottleneck"): (("bn1", "relu"), ("bn2", "relu")),
    ("torchvision.models.squeezenet", "Fire"): tuple(
        (conv, f"{conv}_activation") for conv in ("squeeze", "expand1x1", "expand3x3")
    ),
}


# Hugging Face MLPs, by (module, class name): the layer whose output one operation alone reads,
# one that keeps it for its own backward pass and leaves it as it is (GPT-2's and BERT's
# activation, GELU by default; a LLaMA MLP's product act(gate_proj(x)) * up_proj(x))
_READ_ONCE_AND_KEPT = {
    ("transformers.models.gpt2.modeling_gpt2", "GPT2MLP"): "c_fc",
    **{
        (hf_module(family), f"{prefix}{kind}"): layer
        for families, kind, layer in (
            (BERT_LIKE, "Intermediate", "dense"),
            (LLAMA_LIKE, "MLP", "up_proj"),
        )
        for family, prefix in families.items()
    },
}


def _inplace_ok(layer: Any) -> bool:
    """Whether ``layer``'s backward pass reads its input and weights only, not its output (as
    :data:`INPLACE_OK`'s, and transformers' ``Conv1D``, GPT-2's addmm)."""
    if isinstance(layer, INPLACE_OK):
        return True
    kind = type(layer)
    return (kind.__module__, kind.__name__) == CONV1D


def hand_over_in_known_blocks(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Hand-offs in blocks whose forward is known. The ReLU modules of :data:`_READ_BY_RELU`'s
    (ResNet's) keep what the gate of the layer before them needs, as :func:`hand_over_to_relus`
    does in an ``nn.Sequential`` (their forward calls the ReLU outside one); the gated layer of
    a :data:`_READ_ONCE_AND_KEPT` MLP (Hugging Face's) multiplies in place and keeps its own
    output, which its one reader keeps anyway. :func:`remove_relu_hooks` undoes it."""
    for block in model.modules():
        key = (type(block).__module__, type(block).__name__)
        alone = getattr(block, _READ_ONCE_AND_KEPT.get(key, ""), None)
        if type(alone) is wrapper:
            _kept_by_its_reader(alone)
        for producer, reader in _READ_BY_RELU.get(key, ()):
            gated, relu = getattr(block, producer, None), getattr(block, reader, None)
            if type(gated) is wrapper and isinstance(relu, nn.Module) and type(relu) in RELUS:
                _read_by_relu(gated, relu, block, (producer, reader))


def remove_relu_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`hand_over_to_relus` and :func:`hand_over_in_transformer_layers`
    registered, and give the transformer layers their own activations back."""
    for m in list(model.modules()):
        own = vars(m).pop(_OWN_ACTIVATION, None)
        if own is not None:
            vars(m)["activation"] = own
        vars(m).pop("inplace_alone", None)
        for key in [k for k, fn in m._forward_hooks.items() if fn is relu_takes_over]:
            del m._forward_hooks[key]
        vars(m).pop("relu_after", None)
        vars(m).pop("relu_module", None)
        remove_relu_arming(m)
        vars(m).pop("gate_inplace", None)
