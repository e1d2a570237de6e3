"""A gated convolution's training multiply deferred past the ReLU and pool after it (eager mode).

For θ ≥ 0, one factor per example and channel, a ReLU and a pool commute with the gate:
``pool(relu(θ·x)) = θ·pool(relu(x))`` (a ReLU and a leaky ReLU are positively homogeneous; a
max-pool picks the same element from values scaled alike; an average pool is linear). So where a
gated convolution is followed, inside an ``nn.Sequential``, by an optional ``nn.ReLU`` and a
pool, the gate may multiply the pool's output instead of the convolution's: the same function on
a k-th of the values (a 2×2 pool: a quarter), for the multiply and for both products of its
backward pass. That is most of what a gate adds to a LeNet-style step (BENCHMARKS.md §3).

The gate stays where it is: its site is still the convolution, and folding E[θ] into the
convolution's weights (what exact surgery rests on) is the same function too. Only the training
multiply moves, and only while it provably reaches the pool:

* the ``nn.Sequential``'s forward pre-hook arms each such gated layer for that one call (in
  this thread), after checking again that the layers after it are of the kinds above, so a gated
  layer called any other way (on its own, from a slice of the ``nn.Sequential``, after a layer
  was swapped) multiplies at once as before;
* the armed layer returns its convolution's output tagged with θ; the ReLU's hook passes the tag
  on, and the pool's hook multiplies its output by θ: in place where the next layer of the
  ``nn.Sequential`` is a stock convolution, linear or batch-norm layer (gated or not) without
  hooks, which reads it and keeps it for its own backward pass anyway; out of place elsewhere
  (what comes after may change it in place, which the gate's backward pass would refuse);
* the ``nn.Sequential``'s forward hook (also run when the forward pass raises) disarms, and
  raises :class:`~compressdrop.errors.InputError` if a deferred multiply was never applied.

Only gate families whose draws are ≥ 0 (``Gate.nonnegative``: log-normal, concrete, hard concrete;
the variational family's Gaussian θ only before a compiled step's max-pool: ``_signed_pool.py``),
only a pool of the convolution's dimensionality (a 2-d pool after a 1-d convolution would pool
across channels), only in eager training with none of the
three layers compiled on its own, or in a training step compiled whole (``torch.compile``, where
no tag can ride on a tensor: the armed layer leaves its pool's id in this thread's ``carry``, and
the pool's hook draws θ and multiplies; ``_compiled.py``), and only while no hook could see the
values between (a forward hook on the gated layer, any hook on the ReLU or the pool, any global
module hook): then the gate multiplies at the convolution as before.
:func:`~compressdrop.gates._mul.hand_overs_off` turns it off. Forward values are the same
(rounding included, for the max-pool); the gradient of θ is a sum over fewer, pooled terms.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..runtime import is_traced
from . import _mul
from ._compiled import (
    broadcast_multiply,
    compiled_training,
    mark_relu_passed,
    no_global_hooks,
)
from ._mul import (
    hand_over_in_known_blocks,
    hand_over_in_transformer_layers,
    hand_over_to_relus,
    relu_takes_over,
    remove_relu_hooks,
    wrapper_pre_hook,
)
from ._signed_pool import SignedMaxPool, no_padding_window, signed_ok
from .base import Gate

__all__: list[str] = []  # internal: attach and detach call hand_over and remove_hand_overs

TAG = "_compressdrop_deferred"  # on the tensor between the gated layer and the pool: (layer, θ)
KEY = "gate_defer"  # on the nn.Sequential: [(gated index, activation index or None, pool index)]
# positively homogeneous: f(θ·x) = θ·f(x) for θ ≥ 0 (not ReLU6: its cap at 6 is not)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)
POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_OFF = [0]  # open off() contexts


class _Local(threading.local):
    """Per thread: ``armed``, the gated layers (by id) armed for this call of their
    ``nn.Sequential``, each with (whether the pool after it may multiply in place, that pool, the
    activation between or None); ``pending``, those whose θ waits for the pool; while a training
    step is compiled (no flag can ride on a tensor there), ``carry``, the gated layer (by its
    pool's id) whose θ that pool draws and multiplies by, with whether the pool applies the ReLU
    too (the ReLU then passes its input on, marked as ``_compiled.py``'s hand-off marks it) and
    whether θ may be negative (the pool then pools x·θ itself: ``_signed_pool.py``)."""

    def __init__(self) -> None:
        self.armed: dict[int, tuple[bool, nn.Module, nn.Module | None]] = {}
        self.pending: set[int] = set()
        self.carry: dict[int, tuple[nn.Module, bool, bool]] = {}


_LOCAL = _Local()


def _state() -> tuple[dict[int, tuple[bool, nn.Module, nn.Module | None]], set[int]]:
    """(armed, pending) of this thread (see :class:`_Local`)."""
    return _LOCAL.armed, _LOCAL.pending


# the stock forwards of the layers that read their input and change nothing in place
_STOCK_FORWARDS = {
    c.forward for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
}


def _stock(m: nn.Module, ours: tuple = ()) -> bool:
    """``m`` runs its class's forward (none set on the instance), and no hook but the pre-hooks
    in ``ours`` could change its input in place."""
    return (
        "forward" not in vars(m)
        and not m._forward_hooks
        and all(fn in ours for fn in m._forward_pre_hooks.values())
    )


def _reads_only(m: nn.Module) -> bool:
    """A layer that reads its input, keeps it for its backward pass and changes nothing in place
    (a stock convolution, linear or batch-norm layer, or compressdrop's gated wrapper of one,
    without hooks): the pool before it may multiply its own output in place."""
    inner = getattr(m, "module", None)
    if isinstance(getattr(m, "gate", None), Gate) and isinstance(inner, nn.Module):
        return _stock(m, (wrapper_pre_hook,)) and _reads_only(inner)
    return type(m).forward in _STOCK_FORWARDS and _stock(m)


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Multiply at the gated layer inside this context, as without the deferral: the same
    function, for measuring what the deferral saves."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def _eager() -> bool:
    """Whether hooks run as plain Python on real tensors (not compiled, exported or traced)."""
    return not is_traced()


def _hooks_run() -> bool:
    """Whether the deferral applies: in eager mode, or while a training step is compiled."""
    return _eager() or compiled_training()


def _pool_ok(pool: nn.Module, dims: int) -> bool:
    """A pool that keeps the units where they are: of the convolution's ``dims``, no indices."""
    return (
        type(pool) in POOLS
        and type(pool).__name__.endswith(f"{dims}d")
        and not getattr(pool, "return_indices", False)
    )


def _conv_dims(g: nn.Module) -> int:
    """The spatial dimensions of the gated layer's convolution (0: not a channel-gated conv)."""
    conv = getattr(g, "module", None)
    if not isinstance(conv, nn.modules.conv._ConvNd) or getattr(g, "unit_dim", None) != 1:
        return 0
    return len(conv.kernel_size)


def hand_over(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """What a gated layer of type ``wrapper`` may hand over to the layers after it in eager
    training: to a ReLU or the one operation that keeps it anyway, the tensor its gate keeps
    (:func:`~._mul.hand_over_to_relus` in an ``nn.Sequential``; in a transformer layer's MLP,
    :func:`~._mul.hand_over_in_transformer_layers`; in ResNet blocks and Hugging Face MLPs,
    :func:`~._mul.hand_over_in_known_blocks`); to a pool, its multiply
    (:func:`hand_over_to_pools`)."""
    hand_over_to_relus(model, wrapper)
    hand_over_in_transformer_layers(model, wrapper)
    hand_over_in_known_blocks(model, wrapper)
    hand_over_to_pools(model, wrapper)


def remove_hand_overs(model: nn.Module) -> None:
    """Undo :func:`hand_over` (``compressdrop.detach`` calls it)."""
    remove_relu_hooks(model)
    remove_pool_hooks(model)


def hand_over_to_pools(model: nn.Module, wrapper: type[nn.Module]) -> None:
    """Defer the training multiply of each gated convolution followed by a pool (see the module).

    ``wrapper`` is the gated layer's type (exactly): one wrapping an ``nn.Conv*d`` whose units
    are its channels (``unit_dim`` 1) and whose gate family draws θ ≥ 0, followed in an
    ``nn.Sequential`` by an optional ``nn.ReLU``/``nn.LeakyReLU`` and an ``nn.*Pool*d`` that does
    not return indices. :func:`remove_pool_hooks` undoes it (``compressdrop.detach`` calls it).
    """
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq)
        found = []
        for i, g in enumerate(children):
            if type(g) is not wrapper or not _conv_dims(g) or sum(c is g for c in children) != 1:
                continue
            act, k = None, i + 1
            if k < len(children) and type(children[k]) in ACTIVATIONS:
                act, k = k, k + 1
            if k >= len(children) or not _pool_ok(children[k], _conv_dims(g)):
                continue
            if not getattr(type(g.gate), "nonnegative", False) and not signed_ok(children, act, k):
                continue
            found.append((i, act, k))
            vars(g)["defer_ok"] = True
            if act is not None and _pass_on not in children[act]._forward_hooks.values():
                children[act].register_forward_hook(_pass_on)
            if _apply not in children[k]._forward_hooks.values():
                children[k].register_forward_hook(_apply)
        if found:
            vars(seq)[KEY] = found
            if _arm not in seq._forward_pre_hooks.values():
                seq.register_forward_pre_hook(_arm)
                seq.register_forward_hook(_settle, always_call=True)


def _clean(m: nn.Module, ours: tuple, pre_hooks_ok: bool = False) -> bool:
    """Whether every forward hook of ``m`` is one of ``ours``, it has no other hook (but forward
    pre-hooks, which see its input only, where ``pre_hooks_ok``), and it is not compiled on its
    own (its hooks would run inside the compiled code)."""
    return (
        all(fn in ours for fn in m._forward_hooks.values())
        and (pre_hooks_ok or not m._forward_pre_hooks)
        and not m._backward_hooks
        and not m._backward_pre_hooks
        and getattr(m, "_compiled_call_impl", None) is None
    )


def _arm(seq: nn.Sequential, args: Any) -> None:
    """Forward pre-hook of the ``nn.Sequential``: arm its gated layers for this call."""
    if _OFF[0] or _mul._OFF[0] or not _hooks_run() or not no_global_hooks():
        return
    children = list(seq)
    armed, pending = _state()
    for i, act, k in vars(seq).get(KEY, ()):
        if k >= len(children):
            continue
        g, pool = children[i], children[k]
        ok = (
            vars(g).get("defer_ok", False)
            and (
                getattr(type(g.gate), "nonnegative", False)
                or (
                    compiled_training()
                    and signed_ok(children, act, k)
                    and type(g.gate).multiply is Gate.multiply
                )
            )
            and _clean(g, (), pre_hooks_ok=True)
            and _clean(g.gate, ())  # a hook on the gate would see no multiply here
            and _pool_ok(pool, _conv_dims(g))
            and _clean(pool, (_apply,))
            and (
                act is None
                or (
                    type(children[act]) in ACTIVATIONS
                    and _clean(children[act], (_pass_on, relu_takes_over))
                )
            )
        )
        if ok:
            inplace = k + 1 < len(children) and _reads_only(children[k + 1])
            armed[id(g)] = (inplace, pool, None if act is None else children[act])
            pending.discard(id(g))


def defer(layer: nn.Module, out: Any) -> bool:
    """Called by a gated layer that may defer on its wrapped layer's output ``out``: if armed,
    tag it with θ for the pool's hook instead of multiplying now. False where the gate
    multiplies at once (not armed, eval mode, not a batch of channels)."""
    armed, pending = _state()
    if id(layer) not in armed:
        return False
    inplace, pool, act = armed.pop(id(layer))  # for this one call
    gate: Gate = layer.gate  # type: ignore[assignment]
    if not gate.training or not _hooks_run() or not isinstance(out, torch.Tensor):
        return False
    if out.dim() != _conv_dims(layer) + 2:
        return False
    gate.check_units(out, 1)
    if not _eager():  # compiled: the pool's hook draws θ too
        # relu(maxpool(x)) = maxpool(relu(x)): inductor's CPU code for a ReLU and then a max-pool
        # is 2.4 times slower than the other way round (LeNet-5), and the mask it keeps shrinks
        relu = (
            isinstance(act, nn.ReLU)
            and type(act) is nn.ReLU
            and "Max" in type(pool).__name__
            and no_padding_window(pool)
            and type(gate).multiply is Gate.multiply
            and relu_takes_over in act._forward_hooks.values()  # (it passes its input on)
        )
        signed = not getattr(type(gate), "nonnegative", False)  # (armed: _signed_ok)
        _LOCAL.carry[id(pool)] = (layer, relu, signed)
        if relu and act is not None:
            mark_relu_passed(act)
        pending.add(id(layer))
        return True
    out.__dict__[TAG] = (layer, gate.training_factor(out.shape[0], out.dtype), inplace)
    pending.add(id(layer))
    return True


def _pass_on(act: nn.Module, inputs: tuple, output: Any) -> None:
    """Forward hook of the activation between: move the tag from its input to its output."""
    if not _eager() or not inputs or not isinstance(inputs[0], torch.Tensor):
        return
    tag = inputs[0].__dict__.pop(TAG, None)
    if tag is not None and isinstance(output, torch.Tensor):
        output.__dict__[TAG] = tag


_mul.OUR_RELU_HOOKS.append(_pass_on)


def _apply(pool: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
    """Forward hook of the pool: multiply its output by the θ its input was tagged with (or,
    compiled, by a θ it draws for the gated layer that deferred to it)."""
    if not _eager():
        carried = _LOCAL.carry.pop(id(pool), None) if compiled_training() else None
        if carried is None:
            return None
        layer, relu, signed = carried
        _LOCAL.pending.discard(id(layer))
        gate: Gate = layer.gate  # type: ignore[assignment]
        theta = gate.training_factor(output.shape[0], output.dtype)
        if signed:  # θ of either sign: the pool's own output is dropped, x·θ pooled instead
            factor = theta.reshape(*theta.shape, *(1,) * (output.dim() - 2))
            return SignedMaxPool.apply(inputs[0], factor, pool, relu)
        if relu or type(gate).multiply is Gate.multiply:  # (relu: relu(maxpool(x))·θ)
            return broadcast_multiply(output, theta, 1, relu, mark=False, keep_output=True)
        return gate.multiply(output, theta, 1)
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        return None
    tag = inputs[0].__dict__.pop(TAG, None)
    if tag is None or not isinstance(output, torch.Tensor):
        return None
    layer, theta, inplace = tag
    _state()[1].discard(id(layer))
    if output.dim() != inputs[0].dim():
        raise InputError(f"compressdrop: {type(pool).__name__} changed the rank of a gated output")
    # (the pools' backward passes read their input and indices, never their output)
    inplace = inplace and output._base is None and output.data_ptr() != inputs[0].data_ptr()
    return layer.gate.multiply(output, theta, 1, inplace=inplace)


def _settle(seq: nn.Sequential, args: Any, output: Any) -> None:
    """Forward hook of the ``nn.Sequential`` (run even when its forward pass raised): disarm, and
    raise where a deferred multiply was never applied."""
    if _OFF[0] or _mul._OFF[0] or not _hooks_run():
        return  # (as _arm: nothing armed, no state to change)
    children = list(seq)
    armed, pending = _state()
    missed = []
    for i, _, k in vars(seq).get(KEY, ()):  # (an unused ReLU mark: _compiled._disarm_relus)
        if k < len(children):
            _LOCAL.carry.pop(id(children[k]), None)
        if i < len(children):
            g = children[i]
            armed.pop(id(g), None)
            if id(g) in pending:
                pending.discard(id(g))
                missed.append(i)
    if missed and output is not None:
        raise InputError(
            f"compressdrop: the gate of layer {missed[0]} of this nn.Sequential deferred its "
            "multiply to the pool after it, which did not run on its output (was the "
            "nn.Sequential changed after attach? call compressdrop.detach and attach again)"
        )


def remove_pool_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`hand_over_to_pools` registered and its marks."""
    ours = (_arm, _settle, _pass_on, _apply)
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if fn in ours]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)
        for name in (KEY, "defer_ok"):
            vars(m).pop(name, None)
