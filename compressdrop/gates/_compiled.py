"""The gate multiply of a compiled training step (``torch.compile``), and what lets the compiled
graph keep no more for the backward pass than the plain model's where the eager hand-offs apply.

Eager mode hands over by hooks and flags on tensors (``_mul.py``, ``_defer.py``); a compiled
graph is traced once, keeps whatever its partitioner chooses, and cannot carry flags on
tensors. What it keeps follows from the backward formulas it is given, so the gate multiply of
a compiled step is :class:`_KeepOutput`, whose gradient of θ reads its output y = x·θ instead of
x (Σ g·x = Σ g·y/θ), wherever y is what the reader of a gate's output keeps anyway (elsewhere
it is plain tensor code, which leaves the graph free to keep x or compute it again: before a
residual add, keeping y cost a ResNet 1.14× the plain step's bytes against 1.003×):

* a ReLU module alone reads it (``relu_after``): the gate applies the ReLU itself and keeps its
  output, and that ReLU module, told so through this thread's :class:`_Trace` (its forward hook
  :func:`~._mul.relu_takes_over` returns its input unchanged), adds no second copy. Only where
  the parent of the two (an ``nn.Sequential``, a known block, a transformer layer) armed the
  pair for this call: anywhere else (a slice, the layers called one by one, a hook on the ReLU,
  a swapped ReLU) the gated layer's output is x·θ, as in eager mode;
* a pool follows a convolution (``_defer.py``): the pool's hook multiplies the pool's output,
  which the next layer keeps;
* in PyTorch's transformer layers, ``linear2(dropout(relu(linear1(x))))`` with ``linear1``
  gated by a family whose θ ≥ 0: the gate's multiply moves past the ReLU and the dropout (both
  commute with it), and the dropout's hook multiplies the dropout's output, which ``linear2``
  keeps. With the gate applying the ReLU instead, the graph kept the ReLU's output beside
  the dropout's (the encoder of BENCHMARKS §3: 1.18× the plain step's bytes).

The marks are per-thread state that the traced hooks change, which dynamo refuses inside a
checkpointed region (``torch.utils.checkpoint``) of a step compiled with ``fullgraph=True``:
there, run the step inside ``compressdrop.gates.hand_overs_off()`` (nothing is armed or marked;
the gates keep their inputs), or compile without ``fullgraph``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..runtime import is_exporting


class _Trace(threading.local):
    """Per thread, while a compiled step is traced: ``armed``, the gated layers (by id) whose
    ReLU is sure to read their output next in this call of their parent (:func:`_arm_relus`);
    ``next_relu``, the ReLU module (by id) after the gated layer now running; ``passed``, the
    ReLU modules whose input a gate has just passed through a ReLU already; ``past_dropout``,
    the armed gated layers whose multiply the dropout after their ReLU may take over;
    ``next_dropout``, that dropout (by id) for the gated layer now running; ``deferred``, the
    factor each such dropout multiplies its output by next."""

    def __init__(self) -> None:
        self.armed: set[int] = set()
        self.next_relu: int | None = None
        self.passed: set[int] = set()
        self.past_dropout: set[int] = set()
        self.next_dropout: int | None = None
        self.deferred: dict[int, torch.Tensor] = {}


_TRACE = _Trace()
_OFF = [0]  # open hand_overs_off() contexts (compressdrop.gates._mul)
KEY = "gate_relus"  # on the parent of a gated layer and its ReLU: [(gated layer's name, ReLU's)]
OUR_RELU_HOOKS: list[Any] = []  # the forward hooks compressdrop puts on a ReLU (_mul, _defer)
DROPOUT = "dropout_module"  # on a transformer layer's gated linear1: the nn.Dropout after its ReLU
GATE: list[Any] = []  # compressdrop.gates.base.Gate, appended there (base imports this module)
# PyTorch's own transformer layers, whose MLP is linear2(dropout(activation(linear1(x))))
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def read_by_relu_in(parent: nn.Module, gated: str, relu: str) -> None:
    """Record that in ``parent``'s forward the ReLU ``parent.<relu>`` alone reads the output of
    the gated layer ``parent.<gated>``, and hook ``parent`` to arm that pair for a compiled
    training step (:func:`_arm_relus`) and disarm it after (:func:`_disarm_relus`)."""
    pairs = vars(parent).setdefault(KEY, [])
    if (gated, relu) not in pairs:
        pairs.append((gated, relu))
    if _arm_relus not in parent._forward_pre_hooks.values():
        parent.register_forward_pre_hook(_arm_relus)
        parent.register_forward_hook(_disarm_relus, always_call=True)


def read_by_dropout(gated: nn.Module, layer: nn.Module) -> None:
    """Record that in the transformer ``layer`` the ``nn.Dropout`` ``layer.dropout`` reads the
    ReLU of the gated ``linear1`` alone, and hook it to take over the gate's multiply in a
    compiled training step (:func:`dropout_takes_over`)."""
    dropout = getattr(layer, "dropout", None)
    if type(layer) in TRANSFORMER_LAYERS and type(dropout) is nn.Dropout:
        vars(gated)[DROPOUT] = dropout
        if dropout_takes_over not in dropout._forward_hooks.values():
            dropout.register_forward_hook(dropout_takes_over)


def dropout_takes_over(dropout: nn.Module, args: Any, output: torch.Tensor) -> Any:
    """Forward hook of a transformer layer's dropout (:func:`read_by_dropout`): its output times
    the factor a gate left for it in this compiled step, through :class:`_KeepOutput` (``linear2``
    keeps the product anyway); anywhere else nothing changes."""
    factor = _TRACE.deferred.pop(id(dropout), None)
    return None if factor is None else _KeepOutput.apply(output, factor, False)


def remove_relu_arming(m: nn.Module) -> None:
    """Undo :func:`read_by_relu_in` and :func:`read_by_dropout` on ``m``."""
    vars(m).pop(KEY, None)
    vars(m).pop(DROPOUT, None)
    for key in [k for k, fn in m._forward_hooks.items() if fn is dropout_takes_over]:
        del m._forward_hooks[key]
    for hooks in (m._forward_hooks, m._forward_pre_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_arm_relus, _disarm_relus)]:
            del hooks[key]
            m._forward_hooks_always_called.pop(key, None)


def _pair_ok(parent: nn.Module, gated: str, relu: str) -> bool:
    """The pair is as recorded: the gated layer's recorded ReLU, next in an ``nn.Sequential``
    that runs its own forward, and no hook but compressdrop's could see that ReLU's input."""
    g, r = getattr(parent, gated, None), getattr(parent, relu, None)
    if not isinstance(g, nn.Module) or vars(g).get("relu_module") is not r or r is None:
        return False
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        if type(parent).forward is not nn.Sequential.forward or relu not in keys:
            return False
        if gated not in keys or keys.index(relu) != keys.index(gated) + 1:
            return False
    return (
        not r._forward_pre_hooks
        and all(fn in OUR_RELU_HOOKS for fn in r._forward_hooks.values())
        and not (r._backward_hooks or r._backward_pre_hooks)
        and getattr(r, "_compiled_call_impl", None) is None
    )


def _arm_relus(parent: nn.Module, args: Any) -> None:
    """Forward pre-hook of a gated layer's parent: in a compiled training step, arm each gated
    layer whose ReLU is sure to read its output next (for this one call). Inside
    ``hand_overs_off()`` nothing is armed, and no state changes: what a checkpointed region of
    a compiled step needs (dynamo refuses side effects there)."""
    if _OFF[0] or not compiled_training():
        return
    for gated, relu in vars(parent).get(KEY, ()):
        if _pair_ok(parent, gated, relu):
            _TRACE.armed.add(id(getattr(parent, gated)))
            if _dropout_ok(parent, getattr(parent, gated)):
                _TRACE.past_dropout.add(id(getattr(parent, gated)))


def _dropout_ok(layer: nn.Module, gated: nn.Module) -> bool:
    """The gated ``linear1``'s multiply may move to the dropout after its ReLU: ``layer`` is
    one of PyTorch's transformer layers running its own MLP with the dropout recorded, whose
    only hook is ours, its activation an ``nn.ReLU`` (relu(x·θ) = relu(x)·θ for θ ≥ 0; not
    ReLU6), and the gate draws θ ≥ 0 and multiplies as :class:`~.base.Gate` does. (A hook on the
    gate, which would see or change its output before θ is applied, turns ``relu_after`` off
    before this is asked: :func:`unseen`.) θ of either sign could move too, as |θ| with the ReLU
    and the dropout run on x·sign θ (relu(x·θ) = |θ|·relu(x·sign θ)): measured on the encoder of
    BENCHMARKS §3, the variational step kept 1.01× the plain step's bytes instead of 1.15–1.17×
    but took 1.13–1.19× its time instead of 0.90–0.93×, past issue 17's 1.10; not done."""
    (gate_base,) = GATE
    d, gate = vars(gated).get(DROPOUT), getattr(gated, "gate", None)
    if not isinstance(d, nn.Dropout) or not isinstance(gate, gate_base):
        return False
    cls = type(gate)
    return (
        type(layer) in TRANSFORMER_LAYERS
        and not {"forward", "_ff_block"} & set(vars(layer))
        and layer._modules.get("dropout") is d
        and type(vars(gated).get("relu_module")) is nn.ReLU
        and cls.nonnegative
        and cls.multiply is gate_base.multiply
        and cls.forward is gate_base.forward
        and all(fn is dropout_takes_over for fn in d._forward_hooks.values())
        and not (d._forward_pre_hooks or d._backward_hooks or d._backward_pre_hooks)
        and getattr(d, "_compiled_call_impl", None) is None
    )


def _disarm_relus(parent: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of the parent (also when its forward raised): disarm, and drop any mark a
    ReLU did not use, so that no later call of it skips its work."""
    if _OFF[0] or not torch.compiler.is_compiling():
        return
    for gated, _ in vars(parent).get(KEY, ()):
        g = getattr(parent, gated, None)
        if id(g) in _TRACE.armed:
            _TRACE.armed.discard(id(g))
        _TRACE.past_dropout.discard(id(g))
        dropout = vars(g).get(DROPOUT) if isinstance(g, nn.Module) else None
        if dropout is not None:  # a multiply left for it that it never applied (a raise)
            _TRACE.deferred.pop(id(dropout), None)
            _TRACE.next_dropout = None
        relu = vars(g).get("relu_module") if isinstance(g, nn.Module) else None
        if relu is not None and id(relu) in _TRACE.passed:
            _TRACE.passed.discard(id(relu))


def no_global_hooks() -> bool:
    """Whether no module-wide hook (``nn.modules.module.register_module_*_hook``) could see the
    gated layer's output."""
    module = nn.modules.module
    return not (
        module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


def unseen(wrapper: nn.Module) -> bool:
    """Whether no hook but compressdrop's could see or change what a gated wrapper's gate gives
    before its reader does: no forward hook on the wrapper or on its gate, no backward hook on
    either (a full backward hook sees the gradient of that output), no module-wide hook."""
    gate = getattr(wrapper, "gate", None)
    hooks = [wrapper._forward_hooks, wrapper._backward_hooks, wrapper._backward_pre_hooks]
    if isinstance(gate, nn.Module):
        hooks += [gate._forward_hooks, gate._backward_hooks, gate._backward_pre_hooks]
    return not any(hooks) and no_global_hooks()


def compiled_training() -> bool:
    """Whether a training step is being compiled (``torch.compile``; not ``torch.export``)."""
    return torch.compiler.is_compiling() and torch.is_grad_enabled() and not is_exporting()


def expect_relu(wrapper: nn.Module, relu_after: bool) -> bool:
    """Called by a gated wrapper before its gate multiplies; returns the ``relu_after`` to
    multiply with. Eager: ``relu_after`` as it is (what the gate keeps, not its value). Compiled:
    True only where its parent armed it (:func:`_arm_relus`: its ReLU is sure to read its output
    next), after naming that ReLU for :func:`broadcast_multiply` to mark as passed once it
    applied the ReLU itself, or, where the parent also armed the dropout after that ReLU
    (:func:`_dropout_ok`), after naming the dropout whose hook is to multiply instead (the gate's
    output is then x, and the ReLU runs as it is); anywhere else (a slice, the layers called one
    by one) its output is x·θ."""
    if not torch.compiler.is_compiling():
        return relu_after
    armed = id(wrapper) in _TRACE.armed
    if armed:
        _TRACE.armed.discard(id(wrapper))  # for this one call
    past_dropout = id(wrapper) in _TRACE.past_dropout
    _TRACE.past_dropout.discard(id(wrapper))
    relu = wrapper.__dict__.get("relu_module")
    if not (relu_after and armed and relu is not None and compiled_training()):
        return False
    if past_dropout:  # the ReLU runs as it is, the dropout after it multiplies
        _TRACE.next_dropout = id(wrapper.__dict__[DROPOUT])
        return True
    _TRACE.next_relu = id(relu)
    if id(relu) in _TRACE.passed:
        _TRACE.passed.discard(id(relu))
    return True


def mark_relu_passed(relu: nn.Module) -> None:
    """Tell ``relu`` (hooked by :func:`~._mul.relu_takes_over`) that its next input went through a
    ReLU already (the max-pool after it applies the ReLU: ``_defer.py``)."""
    _TRACE.passed.add(id(relu))


def relu_passed(relu: nn.Module) -> bool:
    """Whether ``relu``'s input is a gate's output passed through a ReLU already (then it is its
    own output); the mark is used once."""
    if id(relu) not in _TRACE.passed:
        return False
    _TRACE.passed.discard(id(relu))
    return True


class _KeepOutput(torch.autograd.Function):
    """y = x · factor (θ shaped to broadcast over x) that keeps y and the factor for its backward
    pass, not x: the gradient of θ is Σ g·x = Σ g·y/θ where θ ≠ 0, and 0 where θ = 0 (as
    ``_mul._GateMul`` gives when it divides: a pruned unit's factor and a hard-concrete θ clamped
    at 0 have derivative 0 with respect to the gate's parameters, and the other families draw
    θ ≠ 0). The compiled graph then keeps y, or x to compute y again, whichever its partitioner
    finds cheaper.

    ``relu``: y = relu(x·θ), for a gate whose output a ReLU alone reads: Σ g·y/θ is still the
    gradient of θ (g = 0 wherever x·θ ≤ 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor, relu: bool) -> torch.Tensor:
        y = x * factor
        if relu:
            y = torch.relu(y)
        ctx.save_for_backward(y, factor)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, factor = ctx.saved_tensors
        grad_factor = factor_grad(grad, y, factor)  # (g = 0 where the ReLU cut: y = 0 there)
        if ctx.relu:
            grad = torch.where(y > 0, grad, 0.0)
        return grad * factor, grad_factor, None


def factor_grad(grad: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The gradient of a factor θ (broadcast over ``y``) from that of y = x·θ and y itself:
    Σ g·y/θ over the dimensions θ is broadcast along, 0 where θ = 0."""
    dims = [d for d in range(y.dim()) if factor.shape[d] == 1 and y.shape[d] != 1]
    prod = (grad * y).sum(dims, keepdim=True) if dims else grad * y
    return torch.where(factor != 0, prod / factor, 0.0)


def broadcast_multiply(
    x: torch.Tensor,
    theta: torch.Tensor,
    dim: int,
    relu_after: bool = False,
    mark: bool = True,
    keep_output: bool = False,
) -> torch.Tensor:
    """``x`` times θ (n, U), n ∈ {B, 1}, broadcast over every dimension but the batch and
    ``dim``. In a compiled training step, with ``relu_after`` (the ReLU that alone reads the
    result applied too, and, with ``mark``, the ReLU module named by :func:`expect_relu` told
    so) or ``keep_output`` (the next layer keeps the result: a deferred pool's output), through
    :class:`_KeepOutput`; else as a plain product, which leaves the compiled graph free to keep
    x or recompute it (a ResNet's gates before a residual add: keeping y there cost 1.14× the
    plain step's bytes against 1.003×). Where :func:`expect_relu` named a transformer layer's
    dropout (:func:`read_by_dropout`), ``x`` itself: θ is left for that dropout's hook."""
    shape = [theta.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = theta.shape[1]
    factor = theta.reshape(shape)
    if not (compiled_training() and (relu_after or keep_output)):
        return x * factor
    if relu_after and mark and _TRACE.next_dropout is not None:  # read_by_dropout
        _TRACE.deferred[_TRACE.next_dropout] = factor
        _TRACE.next_dropout = None
        return x
    if relu_after and mark and _TRACE.next_relu is not None:
        _TRACE.passed.add(_TRACE.next_relu)
        _TRACE.next_relu = None
    return _KeepOutput.apply(x, factor, relu_after)
