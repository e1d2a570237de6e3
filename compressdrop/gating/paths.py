"""Following a gate site's units to their consumers: which operations on the way keep removing a
unit exact (they map a zero unit to zero and keep units apart), and where the units are consumed.

Used by :func:`compressdrop.gating.find_groups` on Torch-Pruning's dependency graph.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import has_role

__all__: list[str] = []  # internal to compressdrop.gating

# element-wise activations that map 0 to 0 (and a constant to a constant)
_ACTIVATIONS = (
    "Relu",
    "Gelu",
    "Silu",
    "Tanh",
    "Hardtanh",
    "LeakyRelu",
    "Elu",
    "Celu",  # max(0, x) + min(0, α(e^{x/α} − 1)): 0 at 0, as ELU (SELU is EluBackward too)
    "Mish",
    "Hardswish",
    "Clamp",
    "ClampMin",
    "ClampMax",
    "Threshold",
)
# grad_fn names (without the trailing version digit) of operations that map a zero unit to zero
# and keep units separate. Anything else on the path from a site to a consumer blocks gating.
_ZERO_PRESERVING = {
    *_ACTIVATIONS,
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "MaxPool1DWithIndices",
    "MaxPool2DWithIndices",
    "MaxPool3DWithIndices",
    "AvgPool1D",
    "AvgPool2D",
    "AvgPool3D",
    "AdaptiveAvgPool1D",
    "AdaptiveAvgPool2D",
    "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D",
    "AdaptiveMaxPool2D",
    "AdaptiveMaxPool3D",
    "Mean",
    "Sum",
    "View",
    "Reshape",
    "UnsafeView",
    "Flatten",
    "T",
    "Transpose",
    "Cat",
    "Split",
    "SplitWithSizes",
    "Slice",
    "Select",
    "Clone",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "NativeDropout",
    "Dropout",
    "ConstantPadNd",
    "UpsampleNearest2D",
    "UpsampleBilinear2D",
    "Alias",
    "Permute",
}


# what the autograd nodes in "its units pass through X" are, in words
_PLAIN_OPS = {
    "Mm": "a matrix product outside a Linear layer, e.g. attention's scores",
    "Bmm": "a batched matrix product, e.g. attention's scores or values",
    "AsStrided": "a strided view: a window partition, or a permuted layout copied",
    "Softmax": "a softmax over the units",
    "LogSoftmax": "a log-softmax over the units",
    "Exp": "an exponential",
    "Sigmoid": "a sigmoid",
    "Div": "a division",
}


def _op_name(node) -> str:
    name = type(node.module).__name__
    grad_fn = getattr(node.module, "_grad_fn", None)  # TP stores the grad_fn's name or the object
    if grad_fn is not None:
        name = grad_fn if isinstance(grad_fn, str) else type(grad_fn).__name__
    return name.rstrip("0123456789").removesuffix("Backward")


def _is_producer(m: object) -> bool:
    return has_role(m, "producer")


# matmuls that a Linear (or a registered producer) on (N, T, F) input runs as an op of its own
_MATMULS = ("Addmm", "Mm", "Bmm")
_WEIGHT_VIEWS = ("TBackward0", "TransposeBackward0", "PermuteBackward0")


def _matmul_consumer(node) -> nn.Module | None:
    """The producer whose weight the matmul ``node`` multiplies its input by (``None``: none).

    Torch-Pruning names a Linear's node after the grad_fn of its output. On (N, T, F) input that
    is the View after an Addmm (View → Addmm → View; without a bias View → Mm → UnsafeView; on a
    non-contiguous input Mm → UnsafeView → Add), so the matmul that consumes the units is an
    unnamed node one or two steps before the Linear's own. Only a matmul whose weight operand is
    that producer's ``weight`` counts, so an unrelated matmul is still refused.
    """
    fn = getattr(node, "grad_fn", None)
    if fn is None:
        return None
    leaves = set()
    for f, _ in fn.next_functions:
        while f is not None and type(f).__name__ in _WEIGHT_VIEWS:
            f = f.next_functions[0][0]
        if getattr(f, "variable", None) is not None:
            leaves.add(id(f.variable))
    frontier = list(node.outputs)
    for _ in range(2):
        nxt = []
        for n in frontier:
            m = n.module
            if _is_producer(m):
                if id(getattr(m, "weight", None)) in leaves:
                    return m
            elif not type(m).__module__.startswith("torch.nn"):
                nxt.extend(n.outputs)
        frontier = nxt
    return None


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.groups == m.in_channels == m.out_channels
        and m.groups > 1
    )


_SCALE_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid)
_PASS_THROUGH = ("View", "Reshape", "UnsafeView", "Expand", "Unsqueeze", "Squeeze", "Flatten")
# element-wise ops: after them the units are still along the site's unit dimension
_SAME_LAYOUT = (*_ACTIVATIONS, "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Dropout", "NativeDropout",
                "Clone", "Alias")  # fmt: skip


def _averages_units(grad_fn, unit_dim: int) -> bool:
    """Whether a mean (its ``grad_fn``) reduces over ``unit_dim`` of its input: then removing a
    unit changes the divisor, and the slim model would differ from the gated one."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return False
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is None:  # MeanBackward0: the mean of every element
        return True
    ndim = len(sizes)
    # negative dims come back as unsigned 64-bit integers
    reduced = {(d - 2**64 if d >= 2**63 else d) % ndim for d in dims}
    return unit_dim % ndim in reduced


def _only_scales(node) -> bool:
    """Whether a squeeze-excitation activation (sigmoid, hard sigmoid) at ``node`` reaches nothing
    but products: ``x * sigmoid(...)``, where x holds the same units (Torch-Pruning couples them
    through the product). A pruned unit of x is zero and stays zero whatever its scale, so the
    units of the excitation need no gate of their own."""
    frontier, seen = list(node.outputs), set()
    if not frontier:
        return False
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        op = _op_name(n).lstrip("_")
        if op == "Mul":
            continue
        if isinstance(n.module, nn.Module) or not op.startswith(_PASS_THROUGH) or not n.outputs:
            return False
        frontier.extend(n.outputs)
    return True


def _is_scale_activation(n) -> bool:
    return isinstance(n.module, _SCALE_ACTIVATIONS) or _op_name(n).lstrip("_") in (
        "Sigmoid",
        "Hardsigmoid",
    )


def _moves_zero(op: str, grad_fn) -> bool:
    """Whether a bounded activation maps 0 elsewhere: a threshold at or above 0 (0 becomes its
    value, which autograd does not keep: any), a clamp or Hardtanh whose range leaves 0 out."""
    if op == "Threshold":
        t = getattr(grad_fn, "_saved_threshold", None)
        return not (isinstance(t, (int, float)) and t < 0)
    if op not in ("Hardtanh", "Clamp", "ClampMin", "ClampMax"):
        return False
    lo = getattr(grad_fn, "_saved_min_val", getattr(grad_fn, "_saved_min", None))
    hi = getattr(grad_fn, "_saved_max_val", getattr(grad_fn, "_saved_max", None))
    return (lo is not None and bool(torch.as_tensor(lo).gt(0).any())) or (
        hi is not None and bool(torch.as_tensor(hi).lt(0).any())
    )


def _positive_power(grad_fn) -> bool:
    """Whether ``grad_fn`` is ``x ** p`` with a constant ``p > 0`` (then 0 ** p = 0)."""
    exponent = getattr(grad_fn, "_saved_exponent", None)
    return isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and exponent > 0


# ops that map a per-channel constant to a per-channel constant, between a BatchNorm that turns a
# pruned (zero) channel into a constant and the layer that can fold that constant into its bias
_CONSTANT_KEEPING = (
    *_ACTIVATIONS,
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "Mean",  # an adaptive pool to 1×1 is traced as a mean over the positions
    "View",
    "Reshape",
    "UnsafeView",
    "Flatten",
    "NativeDropout",
    "Dropout",
    "Clone",
    "Alias",
)


def folds_constant(m: nn.Module) -> bool:
    """Whether a constant input channel of ``m`` can be folded into its bias exactly: a Linear,
    or a convolution with a 1×1 kernel, no padding and no groups (every output position sees the
    channel's constant once)."""
    if isinstance(m, nn.Linear):
        return True
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.groups == 1
        and all(k == 1 for k in m.kernel_size)
        and not isinstance(m.padding, str)
        and all(p == 0 for p in m.padding)
    )


def _constant_path(norm_node) -> str | None:
    """After a BatchNorm, a pruned unit is the constant β − γμ/σ, not zero. ``None`` where every
    path from the norm reaches a layer that folds it (:func:`folds_constant`) through ops that keep
    it constant; else why not."""
    stack, seen = list(norm_node.outputs), set()
    if not stack:
        return "its units pass through BatchNorm to the output"
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        m = n.module
        if _is_producer(m):
            if folds_constant(m):
                continue
            return (
                f"its units pass through BatchNorm (a pruned unit becomes a constant) into a "
                f"{type(m).__name__} that cannot fold a constant into its bias"
            )
        op = _op_name(n).lstrip("_")
        if op in _MATMULS and _matmul_consumer(n) is not None:
            continue
        if isinstance(m, nn.Module) and type(m).__module__.startswith("torch.nn"):
            return f"its units pass through BatchNorm, then {type(m).__name__}"
        if op.startswith("OutputOp") or not n.outputs:
            return "its units pass through BatchNorm to the output"
        if not op.startswith(_CONSTANT_KEEPING):
            return f"its units pass through BatchNorm, then {op}, which does not keep a constant"
        stack.extend(n.outputs)
    return None


def _walk(
    start,
    members,
    names: dict,
    products: dict[int, bool] | None = None,
    unit_dim: int | None = None,
) -> str:
    """Follow a site's output to its consumers.

    Returns "consumed" (some layer consumes the units: the site needs the gate), "covered" (the
    units only flow into a depthwise conv of the same group, whose own site is gated, or only
    scale that group's units through a squeeze-excitation product), "output" (the
    units reach the model's output), or a sentence naming the operation that blocks exactness.

    ``products``, when given, receives the products (``Mul`` nodes) that the units reach before
    any sum, by node id: True where nothing but reshapes lies between the site and the product
    (the units enter it linearly), False where an activation does. Two sites of one group that
    reach the same product are factors of it (a gated MLP's ``act(gate(x)) * up(x)``): one θ
    there gates the unit (``_one_gate_per_product`` in :mod:`compressdrop.gating.groups`).

    ``unit_dim``: the dimension of the site's output that holds the units. A mean over it, reached
    through element-wise operations only, blocks gating (the slim model would divide by fewer
    units); after a reshape or transpose the dimension is not followed, and the check that
    :func:`~compressdrop.prune` makes of the slim model against the masked one is what remains.
    """
    # (node, before any sum, linear so far, units still along unit_dim)
    stack = [(n, True, True, unit_dim is not None) for n in start.outputs]
    visited, consumed = set(), False
    if not start.outputs:
        return "output"
    while stack:
        n, unsummed, linear, layout = stack.pop()
        if id(n) in visited:
            continue
        visited.add(id(n))
        m = n.module
        if _is_producer(m):
            if _is_depthwise(m) and m in members:
                continue
            # a grouped conv consumes the units too: find_groups aligns them to its groups
            consumed = True
            continue
        if isinstance(m, nn.PReLU):
            stack.extend((o, unsummed, False, layout) for o in n.outputs)
            continue
        if _is_scale_activation(n) and _only_scales(n):
            continue  # squeeze-excitation: these units only scale units of the same group
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m in members:
            # a norm after a concatenation (DenseNet): the constant it makes of a pruned unit is
            # folded into the consumers' biases by compressdrop.prune
            why = _constant_path(n)
            if why is not None:
                return why
            consumed = True
            continue
        if isinstance(m, nn.Module) and type(m).__module__.startswith("torch.nn"):
            # a real layer between the site and a consumer (a norm after the residual add, ...)
            return f"its units pass through {type(m).__name__}, which does not map 0 to 0 per unit"
        op = _op_name(n).lstrip("_")
        if op.startswith("OutputOp") or not n.outputs:
            return "output"
        if op in _MATMULS and _matmul_consumer(n) is not None:
            consumed = True  # the input side of a Linear applied to (N, T, F)
            continue
        grad_fn = getattr(n, "grad_fn", None)
        if (
            op in ("Add", "Sub")
            and grad_fn is not None
            and any(f is None for f, _ in grad_fn.next_functions)
        ):
            # the other operand is outside the graph (the model's input, a constant): it is not
            # zero where a unit is pruned, and nothing can slice it
            return f"its units are summed with a tensor that cannot be pruned (the input?) at {op}"
        structural = op.startswith(("Reshape", "Concat", "Split", "Slice", "Expand", "Unbind"))
        if op == "Pow" and _positive_power(grad_fn):
            pass  # x ** p maps 0 to 0 for p > 0 (the cube in GPT-2's tanh GELU)
        elif (op not in _ZERO_PRESERVING or _moves_zero(op, grad_fn)) and not structural:
            plain = _PLAIN_OPS.get(op.rstrip("0123456789"))
            return f"its units pass through {op}{f' ({plain})' if plain else ''}, which does not map 0 to 0"
        if op == "Mean" and layout and _averages_units(grad_fn, unit_dim):  # type: ignore[arg-type]
            return (
                "its units are averaged together (a mean over their dimension: a norm's "
                "statistics, RMSNorm's or LayerNorm's), so removing one would change the mean"
            )
        if op == "Mul" and unsummed and products is not None:
            products[id(n)] = linear
        unsummed = unsummed and op not in ("Add", "Sub", "Cat")
        linear = linear and (structural or op.startswith(_PASS_THROUGH))
        layout = layout and op in _SAME_LAYOUT
        stack.extend((o, unsummed, linear, layout) for o in n.outputs)
    return "consumed" if consumed else "covered"
