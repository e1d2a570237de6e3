"""Torch-Pruning's dependency graph, built and enumerated so that it cannot crash or blow up.

Two things go wrong inside Torch-Pruning on real models:

* its index mapping through ``view``/``reshape`` is a heuristic that can fail outright
  (ShuffleNetV2's channel shuffle divides by zero). :func:`build_graph` then redoes the mapping
  node by node and *blocks* the nodes that fail: no group through them is gated, the rest of the
  model still is. An error while tracing the model itself (in Torch-Pruning's code, not the
  model's) leaves nothing to gate, with a warning that names it.
* a group's channel indices multiply at every flatten-like mapping (Swin's and MaxViT's window
  partitions map each channel to every spatial position), and ``get_all_groups`` once grew past
  10 GB. :func:`bounded_groups` enumerates the same groups with a budget of indices per group and
  in all; a group over budget is skipped, with a warning naming its first layer.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..dropout.recurrent import tracing
from .experts import tuple_routers
from .registry import customized_pruners

__all__: list[str] = []  # internal to compressdrop

# channel indices one group may hold (each a small Python object, ~100 bytes: ~100 MB), and all
# groups together. The largest group of the torchvision CNNs at 224×224 holds 233,472 (VGG's
# flatten of 512 channels × 7×7 positions into its classifier), all of a model's groups at most
# 450,290 (EfficientNetV2-S); Swin's window partitions reach tens of millions.
MAX_GROUP_INDICES = 1_000_000
MAX_TOTAL_INDICES = 20_000_000
# indices enumerated for groups that were then skipped (freed at once: a bound on time, not
# memory); a 0.5 B LLaMA-style decoder's 48 key/value projections take about 48,000,000
MAX_SKIPPED_INDICES = 200_000_000
# steps (dependencies followed) one group may take, and the groups skipped in all: a bound on
# time where the indices stay few. The torchvision and Hugging Face families' groups take at
# most 224; GPT-OSS's residual stream, through its router and fused experts, took a million
# steps of about 35 µs each to reach a million indices (73 s for its two layers)
MAX_GROUP_STEPS = 50_000
MAX_SKIPPED_STEPS = 500_000
_BLOCKED = "_compressdrop_blocked"  # dependency-graph attribute: node → why it is blocked


def _in_torch_pruning(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and "torch_pruning" in frames[-1].filename.replace("\\", "/")


def _failed_in(e: BaseException, module_file: str) -> bool:
    return any(module_file in f.filename for f in traceback.extract_tb(e.__traceback__))


def _remap_node_by_node(dg) -> dict:
    """Torch-Pruning's index mapping, one node at a time: a node whose mapping fails is turned
    into a plain element-wise node (so later mappings skip it) and returned with the reason."""
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping as im

    updates = {
        ops.OPTYPE.CONCAT: "update_concat_index_mapping",
        ops.OPTYPE.SPLIT: "update_split_index_mapping",
        ops.OPTYPE.RESHAPE: "update_reshape_index_mapping",
        ops.OPTYPE.UNBIND: "update_unbind_index_mapping",
        ops.OPTYPE.EXPAND: "update_expand_index_mapping",
        ops.OPTYPE.SLICE: "update_slice_index_mapping",
    }
    blocked = {}
    for node in list(dg.module2node.values()):
        fn = getattr(im, updates.get(node.type, ""), None)
        if fn is None:
            continue
        try:
            fn(dg, node)
        except Exception as e:  # Torch-Pruning's heuristics: any failure blocks the node
            blocked[node] = _short(e)
            node.type = ops.OPTYPE.ELEMENTWISE
    return blocked


def build_graph(model: nn.Module, inputs: tuple) -> tuple[Any | None, str | None]:
    """Torch-Pruning's ``DependencyGraph`` of ``model`` traced on ``inputs``.

    Returns:
        ``(graph, None)``, where nodes whose index mapping failed are recorded as blocked (see
        :func:`blocked_reason`), or ``(None, error)`` where Torch-Pruning's tracing itself
        failed.

    Raises:
        Exception: whatever the model's own forward raises (a wrong input, ...).
    """
    import torch_pruning as tp

    dg = tp.DependencyGraph()
    routers = tuple_routers(model, inputs)  # (a Linear that answers a tuple: left out)
    try:
        with torch.enable_grad(), tracing(model), _all_params_traced(model), _out_of_place(model):
            dg.build_dependency(
                model,
                example_inputs=inputs,
                ignored_layers=routers,
                verbose=False,
                customized_pruners=customized_pruners(),
                output_transform=_traced_outputs,
            )
        setattr(dg, _BLOCKED, {})
        return dg, None
    except Exception as e:
        if not _in_torch_pruning(e):
            raise
        error = _short(e)
        if _failed_in(e, "index_mapping") and getattr(dg, "module2node", None):
            setattr(dg, _BLOCKED, _remap_node_by_node(dg))
            return dg, None
    return None, error


@contextmanager
def _all_params_traced(model: nn.Module) -> Iterator[None]:
    """Every floating-point parameter requires grad while the graph is traced (restored on exit).

    Torch-Pruning follows the autograd graph: a frozen layer (``requires_grad=False``) that no
    tensor requiring grad reaches, such as a frozen stem, would be missing from it, and its
    group cut without it (a frozen ResNet ``conv1`` or MobileNet stem made the slim model wrong
    or not run).
    """
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextmanager
def _out_of_place(model: nn.Module) -> Iterator[None]:
    """torch's in-place activations and dropouts run out of place while the graph is traced (the
    same values; restored on exit). In place on a view, a Linear's (B, T, U) output, one rewrites
    autograd's graph so that it no longer leads back to the Linear, which Torch-Pruning then does
    not see (an ``nn.SiLU(inplace=True)`` after it left it ungated)."""
    flipped = [
        m
        for m in model.modules()
        if type(m).__module__.startswith("torch.nn.modules.")
        and getattr(m, "inplace", None) is True
    ]
    for m in flipped:
        setattr(m, "inplace", False)  # noqa: B010 (typed as a tensor or module attribute)
    try:
        yield
    finally:
        for m in flipped:
            setattr(m, "inplace", True)  # noqa: B010


def _traced_outputs(out: Any) -> list[torch.Tensor]:
    """The output tensors Torch-Pruning traces back from: the floating-point leaves of any nesting
    of tuples, lists, dicts and registered containers (a Hugging Face ``ModelOutput``) that carry
    a graph, so that a decoder's key/value cache or an integer output is passed over."""
    from torch.utils._pytree import tree_leaves

    return [
        t
        for t in tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.grad_fn is not None
    ]


def _split_shapes(node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A reshape node's input and output shapes where it splits dimension 1 (channels of
    ``(N, C, ...)``, features of ``(N, F)``, the rows of a channels-last ``(N, H, W, C)``) into
    several dimensions, as a channel shuffle's ``view(N, g, C // g, H, W)`` and a window
    partition's ``view(N, H // w, w, W // w, w, C)`` do; else ``None``. Torch-Pruning maps
    indices only through flattening, reading dimension 1 as the units: its mapping is wrong
    there. A view that only inserts dimensions of size 1 before the last (BART's pooling of its
    end-of-sequence states, ``(N, F)`` viewed as ``(N, 1, F)``) splits nothing: every unit keeps
    its index in the last dimension, and where Torch-Pruning finds the same width on both sides
    (a Linear reads them) it maps each index to itself; where it maps them otherwise (a layer
    reads the new dimension of size 1 as its channels) the view stays a split."""
    fn = getattr(node, "grad_fn", None)
    before = getattr(fn, "_saved_self_sym_sizes", None)
    after = getattr(fn, "_input_metadata", None)  # the forward output's metadata (torch >= 2.1)
    if before is None or not after:
        return None
    before, after = tuple(before), tuple(after[0].shape)
    split = len(after) > len(before) >= 2 and after[0] == before[0] and after[1] != before[1]
    ones = [s for s in after if s != 1] == [s for s in before if s != 1] and after[-1] == before[-1]
    mapped = any(d.index_mapping[0] is not None for d in getattr(node, "dependencies", ()))
    return (before, after) if split and (mapped or not ones) else None


def _split_reason(shapes: tuple[tuple[int, ...], tuple[int, ...]], root: nn.Module) -> str:
    """What a splitting reshape (:func:`_split_shapes`) does to the units of a group whose root
    layer is ``root``: a linear layer's units (the last dimension) that the reshape keeps whole
    have their positions regrouped (a window partition: Swin's, MaxViT's); else the units are
    split themselves (a channel shuffle's ``view(N, g, C // g, H, W)``)."""
    before, after = shapes
    positions = len(before) >= 3  # (N, positions..., units)
    if isinstance(root, nn.Linear) and positions and before[-1] == after[-1] == root.out_features:
        was, now = (f"({', '.join(['N', *map(str, s[1:])])})" for s in shapes)
        return (
            f"its units (the last dimension) pass through a reshape that regroups their "
            f"positions into windows, {was} to {now} (a window partition, as in Swin or "
            "MaxViT), which Torch-Pruning's index mapping does not follow: it reads dimension 1 "
            "as the units"
        )
    return (
        "its units pass through a view that splits them into several dimensions (a "
        "channel shuffle?), which Torch-Pruning's index mapping does not follow"
    )


def untrusted_reason(dg, group) -> str | None:
    """Why Torch-Pruning's indices for ``group`` cannot be trusted (``None``: they can): it
    passes through a node whose index mapping failed, or through a view that splits its units."""
    blocked = getattr(dg, _BLOCKED, {})
    for dep, _ in group:
        why = blocked.get(dep.target)
        if why is not None:
            op = type(dep.target.module).__name__.strip("_").removesuffix("Op").lower()
            return f"its units pass through a {op} Torch-Pruning cannot map indices through ({why})"
        shapes = (
            _split_shapes(dep.target) if type(dep.target.module).__name__ == "_ReshapeOp" else None
        )
        if shapes is not None:
            return _split_reason(shapes, group[0][0].target.module)
    return None


class _OverBudget(Exception):
    """A group stopped before it was complete: over its budget, or ``why`` not."""

    def __init__(
        self, reached: list[nn.Module], spent: int, why: str | None = None, steps: int = 0
    ) -> None:
        super().__init__()
        self.reached, self.spent, self.why, self.steps = reached, spent, why, steps


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip(": ")[:200]


def _group_within(dg, module: nn.Module, budget: int):
    """``dg.get_pruning_group(module, <its out-channel pruner>, all its channels)``, stopped as
    soon as the group would hold more than ``budget`` indices (Torch-Pruning 1.6's algorithm,
    without its index-mapping refresh, done once by the caller)."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping
    from torch_pruning.pruner import function

    pruner = dg.get_pruner_of_module(module)
    fn = pruner.prune_out_channels
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1:
        fn = function.prune_depthwise_conv_out_channels
    n = pruner.get_out_channels(module)
    group = Group()
    root = dg.module2node[module]
    group.add_dep(
        Dependency(fn, fn, source=root, target=root),
        [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(n)],
    )
    total, stack = n, [group[0]]
    # (node, handler, indices) already in the group: Torch-Pruning's has_pruning_op scans the
    # whole group for each, quadratic in its size, which never ends on a LLaMA-style decoder
    # (rotary embeddings slice q and k into halves, and each half revisits the stream)
    held = {(id(root), fn, tuple(group[0][1]))}
    steps = 0
    while stack:
        steps += 1
        if steps > MAX_GROUP_STEPS:
            why = (
                f"its Torch-Pruning group takes more than {MAX_GROUP_STEPS:,} steps through the "
                "graph (the index mapping never closes, as around a mixture of experts' "
                "routing), skipped to bound time"
            )
            raise _OverBudget(_reached(dg, group), total, why, steps)
        dep, idxs = stack.pop()
        node, handler = dep.target, dep.handler
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(handler):
                continue
            new = idxs
            for mapping in new_dep.index_mapping:
                if mapping is None:
                    continue
                grows = isinstance(mapping, _FlattenIndexMapping) and not mapping.reverse
                if grows and total + len(new) * mapping._stride > budget:  # before it grows
                    raise _OverBudget(_reached(dg, group), total, steps=steps)
                try:
                    new = mapping(new)
                except Exception as e:  # Torch-Pruning's mapping heuristics (wrong split sizes)
                    op = type(new_dep.source.module).__name__.strip("_").removesuffix("Op")
                    why = f"Torch-Pruning cannot map its channels through {op} ({_short(e)})"
                    raise _OverBudget(_reached(dg, group), total, why, steps) from e
            key = (id(new_dep.target), new_dep.handler, tuple(new))
            if not new or key in held:
                continue
            held.add(key)
            total += len(new)
            if total > budget:
                raise _OverBudget(_reached(dg, group), total, steps=steps)
            group.add_dep(new_dep, new)
            stack.append((new_dep, new))
    merged = Group()
    for dep, idxs in group.items:
        if not isinstance(dep.target.module, nn.Parameter) or not any(
            dep.target.module is p for p in dg.ignored_params
        ):
            merged.add_and_merge(dep, idxs)
    merged._DG = dg
    for i in range(len(merged)):
        hybrid = merged[i].idxs
        merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
        merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return merged, total


def _reached(dg, group) -> list[nn.Module]:
    return [d.target.module for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)]


def bounded_groups(
    dg, root_types: Sequence[type], names: dict, skipped: list[str], heads: frozenset = frozenset()
) -> Iterator[Any]:
    """Torch-Pruning's ``get_all_groups(root_module_types=root_types)`` within index budgets.
    Layers in ``heads`` (the q/k/v projections of gated attention heads: their units are the
    heads) start no group; other layers' groups may still reach them.

    A group that would hold more than :data:`MAX_GROUP_INDICES` indices is skipped (with every
    layer reached before it stopped); once the groups kept hold :data:`MAX_TOTAL_INDICES` in all
    (memory), or the skipped ones took :data:`MAX_SKIPPED_INDICES` to find (time), the remaining
    layers are skipped. Each skip appends a sentence to ``skipped``.
    """
    from torch_pruning.dependency import index_mapping

    index_mapping.update_index_mapping(dg)  # blocked nodes are element-wise by now: no failure
    visited: set[nn.Module] = set()
    spent = wasted = wasted_steps = 0
    m: nn.Module
    for m in list(dg.module2node):
        if (
            not isinstance(m, tuple(root_types))
            or m in visited
            or m in dg.IGNORED_LAYERS_IN_TRACING
            or m in heads
        ):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        name = names.get(m, type(m).__name__)
        budget = min(MAX_GROUP_INDICES, MAX_TOTAL_INDICES - spent)
        if budget <= 0 or wasted >= MAX_SKIPPED_INDICES or wasted_steps >= MAX_SKIPPED_STEPS:
            why = (
                f"Torch-Pruning's groups reached {MAX_TOTAL_INDICES:,} channel indices in all "
                "(bounded to limit memory)"
                if spent >= MAX_TOTAL_INDICES
                else f"the groups skipped so far took {MAX_SKIPPED_INDICES:,} channel indices or "
                f"{MAX_SKIPPED_STEPS:,} steps to enumerate (bounded to limit time)"
            )
            skipped.append(f"layer {name!r} and the layers after it left ungated: {why}")
            return
        try:
            group, size = _group_within(dg, m, budget)
        except _OverBudget as over:
            visited.update(over.reached)
            visited.add(m)
            wasted, wasted_steps = wasted + over.spent, wasted_steps + over.steps
            skipped.append(
                f"layer {name!r} left ungated: "
                + (
                    over.why
                    or f"its Torch-Pruning group grows past {budget:,} channel indices (its "
                    "channels are reshaped into many positions, as in window attention, or the "
                    "index mapping never closes, as around rotary embeddings), skipped to bound "
                    "memory"
                )
            )
            continue
        spent += size
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        yield group
