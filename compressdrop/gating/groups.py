"""Finding where gates go: coupled unit groups from Torch-Pruning's dependency graph.

A *group* is a set of units that must be removed together (a conv's output channels, the BatchNorm
after it, the input channels of every consumer, and, through residual additions, every other layer
that writes into the same stream). Each group gets one gate, applied at one or more *sites*: the
outputs of the group's producers (a conv or linear layer, or the BatchNorm that directly follows
it). A pruned unit then reaches every consumer as an exact zero, which is what makes removal exact,
provided every operation between a site and a consumer maps 0 to 0. That is checked here: groups
whose channels pass through an operation that does not (a sigmoid, a norm over channels, a
BatchNorm after the residual addition) or that reach the model's output are left ungated, with a
warning that names the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..dropout.recurrent import tracing
from ..errors import InputError
from .aligned import group_alignment
from .experts import find_experts
from .head_groups import find_heads, projections_of, record_calls
from .inputs import run_example
from .known import register_for, traced_as_known
from .packed_mlp import find_packed_mlps
from .paths import _is_producer, _walk
from .registry import has_role, registered_types, spec_of
from .shuffle import stream_groups
from .tpgraph import bounded_groups, build_graph, untrusted_reason
from .units import GatingWarning, Site, UnitGroup, _matches, unit_count_problem

__all__ = ["GRANULARITIES", "GatingWarning", "Site", "UnitGroup", "find_groups"]

GRANULARITIES = ("auto", "channel", "neuron", "head")


def _unit_costs(
    group, num_units: int, names: dict, positions: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters and multiply-adds that each unit of a TP group controls (uniform within a group),
    summed over the group's layers from their specs."""
    params = macs = 0.0
    for dep, idxs in group:
        m = dep.target.module
        spec = spec_of(m) if isinstance(m, nn.Module) and m in names else None
        if spec is None:
            continue
        share = len(idxs) / num_units  # > 1 where flatten maps one channel to many features
        p, mac = spec.unit_costs(m, dep.handler.__name__ == "prune_out_channels")
        params += share * p
        macs += share * mac * positions.get(m, 1)
    return torch.full((num_units,), params), torch.full((num_units,), macs)


def _cut_off(dg, ran: dict, names: dict, refused: set, granularity: str, include, exclude) -> str:
    """A sentence naming the selected layers that ran in the traced forward pass but that the
    autograd graph does not connect to the output (run under ``torch.no_grad()``, their output
    detached, or changed in place through a view by a functional in-place op; torch's in-place
    modules run out of place while tracing): Torch-Pruning cannot follow them, so they stay
    ungated; "" if none. A layer inside a module that Torch-Pruning traced as one node (a type
    with a pruner of its own: compressdrop's ``MultiheadAttention`` and its ``out_proj``) is not
    cut off."""
    # the names of the graph's modules: their submodules are inside one node, not missing
    traced = {names[m] for m in dg.module2node if isinstance(m, nn.Module) and m in names}
    # left out of the trace on purpose: routers that answer a tuple (experts.tuple_routers)
    ignored = set(getattr(dg, "IGNORED_LAYERS_IN_TRACING", ()))

    def inside_traced(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in traced for i in range(len(parts)))

    cut = [
        names[m] for m, spec in ((m, spec_of(m)) for m in ran)
        if m not in dg.module2node and m not in refused and m not in ignored and m in names
        and spec is not None
        and not inside_traced(names[m])
        and _selected(spec.kind, [m], names, granularity, include, exclude)
    ]  # fmt: skip
    if not cut:
        return ""
    many = len(cut) > 1
    shown = ", ".join(repr(n) for n in cut[:8]) + (
        f" and {len(cut) - 8} more" if len(cut) > 8 else ""
    )
    return (
        f"layer{'s' if many else ''} {shown} left ungated: {'they' if many else 'it'} ran in the "
        f"example forward pass, but autograd's graph does not lead back to {'them' if many else 'it'} "
        "from the model's output (run under torch.no_grad(), detached, or an output changed in "
        "place through a view, as F.relu(x, inplace=True) on a Linear's 3-d output does?), and "
        "the pruning graph follows autograd's"
    )


def find_groups(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    granularity: str = "auto",
    include: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] | None = None,
    warn: bool = True,
) -> list[UnitGroup]:
    """Trace ``model`` on ``example_inputs`` and return the gateable unit groups.

    Args:
        model: a plain model (no gates attached).
        example_inputs: one input batch, or a tuple of positional inputs.
        granularity: ``"auto"`` (every producer's units and every attention's heads),
            ``"channel"`` (conv channels only), ``"neuron"`` (Linear and LSTM units only): the
            ``kind`` of the layers' :class:`~compressdrop.gating.registry.LayerSpec`; or
            ``"head"`` (attention heads only, see :mod:`compressdrop.gating.heads`).
        include: module-name glob patterns or module types; a group is gated only if one of its
            producers matches (``None``: every group).
        exclude: patterns or types; a group with a matching producer is not gated.
        warn: emit a :class:`GatingWarning` for each group that cannot be gated.

    Returns:
        The groups that can be gated exactly, in the dependency graph's order.

    Raises:
        InputError: an unknown ``granularity``.
    """
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    register_for(model)  # head specs of the libraries the model comes from (transformers)
    names = {m: n for n, m in model.named_modules()}
    by_name = {n: m for m, n in names.items()}
    producers_types = registered_types("producer")
    positions: dict[nn.Module, int] = {}  # output positions per example, the MACs multiplier
    shapes: dict[nn.Module, tuple[int, ...]] = {}  # each producer's output shape, to size gates

    def record(m, _inp, out):
        spec = spec_of(m)
        if spec is not None:
            positions[m] = spec.output_positions(m, out)
            if isinstance(out, torch.Tensor):
                shapes[m] = tuple(out.shape)

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    hooks = [m.register_forward_hook(record) for m in model.modules() if _is_producer(m)]
    calls, unhook_calls = record_calls(model)  # each attention's inputs, to check its heads
    refused = set()  # layers whose spec says they cannot be gated: warned about once, here
    for name, m in model.named_modules():
        spec = spec_of(m)
        why = spec.why_not(m) if spec is not None else None
        if spec is None or why is None:
            continue
        refused.add(m)
        wanted = (
            (granularity == "auto" or spec.kind == granularity)
            and (not include or _matches(name, m, include))
            and not _matches(name, m, exclude)
            and not _in_excluded(name, by_name, exclude)
        )
        if warn and wanted:
            warnings.warn(
                f"compressdrop: layer {name!r} left ungated: {why}", GatingWarning, stacklevel=3
            )
    try:
        with traced_as_known(model):
            dg, error = build_graph(model, inputs)
    except Exception:
        with tracing(model):  # Torch-Pruning's retry hides a wrong input's error: name it
            run_example(model, inputs)
        raise
    finally:
        for h in hooks:
            h.remove()
        unhook_calls()
        model.train(was_training)
    if dg is None:
        if warn:
            warnings.warn(
                f"compressdrop: Torch-Pruning could not trace the model ({error}); nothing gated",
                GatingWarning,
                stacklevel=3,
            )
        return []

    if warn and (cut := _cut_off(dg, positions, names, refused, granularity, include, exclude)):
        warnings.warn(f"compressdrop: {cut}", GatingWarning, stacklevel=3)
    heads: list[UnitGroup] = []
    experts: list[UnitGroup] = []
    packed: list[UnitGroup] = []
    unpacked: dict[str, str] = {}
    if granularity in ("auto", "head"):
        heads, problems = find_heads(model, calls, include, exclude)
        for message in problems if warn else ():
            warnings.warn(f"compressdrop: {message}", GatingWarning, stacklevel=3)
    if granularity in ("auto", "neuron"):  # fused experts' neurons (gating/experts.py)
        batch = inputs[0].shape[0] if isinstance(inputs[0], torch.Tensor) else 1
        experts, problems = find_experts(model, calls, include, exclude, batch)
        for message in problems if warn else ():
            warnings.warn(f"compressdrop: {message}", GatingWarning, stacklevel=3)
        # Phi-3's packed gate_up_proj: a gate per neuron, not per row (gating/packed_mlp.py)
        packed, unpacked = find_packed_mlps(model, calls, include, exclude, batch)
        for message in unpacked.values() if warn else ():
            warnings.warn(f"compressdrop: {message}", GatingWarning, stacklevel=3)
    claimed = projections_of(model, heads)  # q/k/v layers: their units are the heads
    claimed |= {p for g in packed for p in g.producers}  # rows of the packed MLPs' neurons
    claimed |= set(unpacked)  # packed by name, not by layout: left ungated (warned above)
    # ShuffleNetV2's shuffled channels: groups of their own (gating/shuffle.py), not Torch-Pruning's
    streams = stream_groups(model, names, positions)
    streamed = {p for s in streams for p in s.producers}
    groups: list[UnitGroup] = []
    seen: set[nn.Module] = set()
    skipped: list[str] = []  # groups over Torch-Pruning's index budget, warned about at the end
    heads_own = frozenset(by_name[n] for n in claimed if n in by_name)
    for g in bounded_groups(dg, producers_types, names, skipped, heads_own):
        out_deps = [
            d
            for d, _ in g
            if d.handler.__name__ == "prune_out_channels" and d.target.module in names
        ]
        producers = [d.target.module for d in out_deps if _is_producer(d.target.module)]
        if not producers or any(p in seen for p in producers):
            continue
        if any(p in refused for p in producers):
            continue  # warned about above
        if all(names[p] in claimed for p in producers) or any(
            names[p] in streamed for p in producers
        ):
            continue
        seen.update(producers)
        kinds = {spec.kind for p in producers if (spec := spec_of(p)) is not None}
        kind = "neuron" if kinds == {"neuron"} else "channel"
        pnames = [names[p] for p in producers]
        label = pnames[0]
        if not _selected(kind, producers, names, granularity, include, exclude):
            continue
        num_units = dg.get_out_channels(producers[0])
        problem, sites = _plan_sites(dg, g, producers, names)
        writers = [d.target.module for d in out_deps if isinstance(d.target.module, _EMBEDDINGS)]
        if problem is None and writers:
            # a transformer's residual stream: the token embedding writes the same units, and
            # nothing gates it, so a pruned unit would not be zero
            problem = (
                f"its units are summed with embedding {names[writers[0]]!r}, which has no gate "
                "(a pruned unit would not be zero)"
            )
        concat_unmapped = any(
            type(d.target.module).__name__ == "_ConcatOp" and d.target.module.offsets is None
            for d, _ in g
        )
        if problem is None and (
            concat_unmapped or any(dg.get_out_channels(p) != num_units for p in producers)
        ):
            # Torch-Pruning could not map indices through a concatenation and coupled layers of
            # different widths; pruning such a group would cut the wrong channels.
            problem = "its channels pass through a concatenation that Torch-Pruning cannot index"
        blocks, misaligned = group_alignment(g, num_units, names)  # grouped convs
        problem = untrusted_reason(dg, g) or problem or misaligned
        problem = problem or unit_count_problem(producers, num_units, shapes)
        if problem is not None:
            if warn and problem != "output" and not _in_excluded(label, by_name, exclude):
                warnings.warn(
                    f"compressdrop: layer {label!r} left ungated: {problem}",
                    GatingWarning,
                    stacklevel=3,
                )
            continue
        params, macs = _unit_costs(g, num_units, names, positions)
        groups.append(UnitGroup(label, num_units, kind, pnames, sites, params, macs, blocks))
    for why in skipped if warn else ():
        warnings.warn(f"compressdrop: {why}", GatingWarning, stacklevel=3)
    streams = [
        s
        for s in streams
        if _selected(
            s.kind, [by_name[p] for p in s.producers], names, granularity, include, exclude
        )
    ]
    return groups + streams + heads + experts + packed


def _in_excluded(name: str, by_name: dict, exclude: Sequence[str | type] | None) -> bool:
    """Whether a module that holds layer ``name`` matches ``exclude`` (GPT-2's ``c_attn`` in an
    excluded ``GPT2Attention``: the user left that block alone, so its layers are not warned
    about)."""
    if not exclude:
        return False
    parts = name.split(".")
    for i in range(1, len(parts)):
        outer = ".".join(parts[:i])
        if outer in by_name and _matches(outer, by_name[outer], exclude):
            return True
    return False


def _selected(
    kind: str,
    producers: Sequence[nn.Module],
    names: dict,
    granularity: str,
    include: Sequence[str | type] | None,
    exclude: Sequence[str | type] | None,
) -> bool:
    """Whether a group of ``kind`` made by ``producers`` is asked for: its kind matches
    ``granularity`` and one of its producers ``include``, none ``exclude``."""
    return (
        (granularity == "auto" or kind == granularity)
        and (not include or any(_matches(names[p], p, include) for p in producers))
        and not (exclude and any(_matches(names[p], p, exclude) for p in producers))
    )


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _plan_sites(
    dg, group, producers: Iterable[nn.Module], names: dict
) -> tuple[str | None, list[Site]]:
    """Choose the sites of a group, or say why the group cannot be gated exactly."""
    members = {d.target.module for d, _ in group}
    sites: list[Site] = []
    factors: list[dict[int, bool]] = []  # per site: the products its units reach unsummed
    for p in producers:
        node = dg.module2node[p]
        site_node = node
        outs = node.outputs
        if len(outs) == 1 and has_role(outs[0].module, "norm") and outs[0].module in members:
            if not outs[0].module.affine:
                return f"BatchNorm {names[outs[0].module]!r} after it has affine=False", []
            site_node = outs[0]
        products: dict[int, bool] = {}
        m = site_node.module
        spec = spec_of(m)
        assert spec is not None  # a producer or a norm
        verdict = _walk(site_node, members, names, products, spec.unit_dim)
        if verdict == "output":
            return "output", []
        if verdict not in ("consumed", "covered"):
            return verdict, []
        if verdict == "consumed":
            sites.append(Site(names[m], spec.unit_dim))
            factors.append(products)
    if not sites:
        return "no consumer of its units found", []
    return None, _one_gate_per_product(sites, factors)


def _one_gate_per_product(sites: list[Site], factors: list[dict[int, bool]]) -> list[Site]:
    """Keep one site among those whose units are multiplied together before any sum.

    Sites that are summed (a residual stream) each need the same θ, so that the sum carries θ
    once. Sites that are factors of one product (``act(gate(x)) * up(x)``, SwiGLU) need it on one
    factor only: a zero factor zeroes the unit, and θ on both would apply it twice (θ² on the
    unit). The site kept is the one that enters the product linearly (``up``: the unit is
    θ·act(gate)·up), else the first.
    """
    keep = list(range(len(sites)))
    for i in range(len(sites)):
        if i not in keep:
            continue
        partners = [j for j in keep if j != i and factors[i].keys() & factors[j].keys()]
        if not partners:
            continue
        coupled = [i, *partners]
        products = set(factors[i]).intersection(*(factors[j] for j in partners))
        linear = [k for k in coupled if any(factors[k][n] for n in products)]
        chosen = linear[0] if linear else i
        keep = [k for k in keep if k not in coupled or k == chosen]
    return [sites[k] for k in keep]
