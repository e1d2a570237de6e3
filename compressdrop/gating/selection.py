"""What attach's ``include``, ``exclude``, ``granularity`` and ``kl_scale`` select in a model, and,
when nothing is gated, why: in words that name the pattern or the granularity that selected
nothing, not only the layers that could not be gated."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from torch import fx, nn

from ..errors import InputError
from .costs import UNIT_KINDS
from .heads import head_spec_of
from .registry import has_role, registered_types, spec_of
from .units import UnitGroup, _matches

__all__: list[str] = []  # internal to compressdrop.gating

# layer names listed in a message, at most
SHOWN = 8


def gateable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every layer whose units attach may gate: the producers
    (``"channel"`` or ``"neuron"``, their spec's kind) and the attentions (``"head"``)."""
    out = []
    for name, m in model.named_modules():
        spec = spec_of(m) if has_role(m, "producer") else None
        if spec is not None:
            out.append((name, m, spec.kind))
        elif name and head_spec_of(m) is not None:
            out.append((name, m, "head"))
    return out


def shown_names(names: Sequence[str]) -> str:
    """``names`` quoted, the first :data:`SHOWN` of them, and how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(repr(n) for n in names[:SHOWN]) + more


def _listing(layers: Sequence[tuple[str, nn.Module, str]]) -> str:
    shown = [f"{name!r} ({type(m).__name__})" for name, m, _ in layers[:SHOWN]]
    more = f" and {len(layers) - SHOWN} more" if len(layers) > SHOWN else ""
    return ", ".join(shown) + more


def unmatched(
    layers: Sequence[tuple[str, nn.Module, str]], patterns: Iterable[str | type] | None
) -> list[str | type]:
    """The patterns among ``patterns`` that match none of ``layers``."""
    return [p for p in patterns or () if not any(_matches(n, m, [p]) for n, m, _ in layers)]


def _pattern_text(pattern: str | type) -> str:
    return repr(pattern) if isinstance(pattern, str) else pattern.__name__


def unmatched_include(
    model: nn.Module, include: Sequence[str | type] | None, option: str = "include"
) -> str | None:
    """A sentence on the ``include`` (``option``'s) patterns that match no gateable layer of
    ``model``, or ``None`` where each matches one. An ``exclude`` pattern that matches none
    excludes nothing: one that names a block holding layers (``'BertLayer'``, a container's
    name) rather than the layers themselves."""
    layers = gateable_layers(model)
    missed = unmatched(layers, include)
    if not missed or not layers:
        return None
    which = ", ".join(_pattern_text(p) for p in missed)
    return (
        f"{option} pattern{'s' if len(missed) > 1 else ''} {which} "
        f"match{'' if len(missed) > 1 else 'es'} none of the model's gateable layers "
        f"({_listing(layers)}){', so it excludes nothing' if option == 'exclude' else ''}; a "
        "pattern is a module-name glob ('features.*') or a layer type, of the layer whose units "
        "are gated (or of the attention whose heads are)"
    )


def nothing_to_gate(
    model: nn.Module,
    granularity: str,
    include: Sequence[str | type] | None,
    exclude: Sequence[str | type] | None,
) -> str:
    """Why attach found no group, in words that hold whether or not warnings were shown: an
    ``include`` pattern that matches no layer, an ``exclude`` that takes every layer, a
    ``granularity`` with no layer of its kind, or the layers' own reasons."""
    layers = gateable_layers(model)
    if not layers:
        known = ", ".join(t.__name__ for t in registered_types("producer"))
        return (
            f"no gateable layer found: the model has no layer of a type compressdrop gates "
            f"({known}; register_layer() adds one)"
        )
    why = unmatched_include(model, include)
    if why is not None:
        return f"nothing to gate: {why}"
    included = [(n, m, k) for n, m, k in layers if not include or _matches(n, m, include)]
    chosen = [(n, m, k) for n, m, k in included if not _matches(n, m, exclude)]
    if not chosen:
        which = ", ".join(_pattern_text(p) for p in exclude or ())
        return (
            f"nothing to gate: exclude {which} takes every gateable layer"
            f"{' that include selects' if include else ''} ({_listing(included)})"
        )
    if granularity != "auto" and not any(k == granularity for _, _, k in chosen):
        kinds = " and ".join(sorted({k for _, _, k in chosen}))
        return (
            f"nothing to gate: granularity {granularity!r} asks for {granularity} units, and the "
            f"model's {'selected ' if include or exclude else ''}gateable layers have {kinds} "
            f"units only ({_listing(chosen)}); granularity 'auto' gates every kind"
        )
    if granularity != "auto":  # the layers of other kinds were never candidates
        chosen = [(n, m, k) for n, m, k in chosen if k == granularity]
    producers = [type(m).__name__ for _, m, _ in chosen]
    kind = "" if granularity == "auto" else f"{granularity} "
    return (
        f"no gateable layer found among its {len(producers)} {kind}layer"
        f"{'' if len(producers) == 1 else 's'} "
        f"({', '.join(sorted(set(producers)))}): the units of each reach the model's output "
        "(the output layer is never gated) or pass through an operation that keeps removal from "
        "being exact (any GatingWarning above names it)"
        + _unknown_weights(model)
        + _program_recurrence(model)
    )


def _unknown_weights(model: nn.Module) -> str:
    """A sentence on the layer types without a layer spec whose own weights (a matrix or more,
    embeddings aside) hold a quarter or more of ``model``'s parameters (JetMoE's experts and
    attention experts, ``JetMoeParallelExperts``): none of their units can be gated, whatever
    the layers around them allow; "" where there are none."""
    total = sum(p.numel() for p in model.parameters())
    counts: dict[str, tuple[int, int]] = {}  # type name → (modules, parameters)
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if spec_of(m) is not None or isinstance(m, nn.Embedding | nn.EmbeddingBag):
            continue
        if head_spec_of(m) is not None or not any(p.dim() >= 2 for p in own):
            continue
        n, size = counts.get(type(m).__name__, (0, 0))
        counts[type(m).__name__] = n + 1, size + sum(p.numel() for p in own)
    held = sum(size for _, size in counts.values())
    if not total or held < total / 4:
        return ""
    types = ", ".join(f"{t} ({n})" for t, (n, _) in sorted(counts.items()))
    return (
        f"; {held / total:.0%} of its parameters are weights of layer types compressdrop has no "
        f"layer spec for, {types}, whose units cannot be gated (register_layer() describes a "
        "type)"
    )


_RECURRENT = {"lstm", "gru", "rnn_tanh", "rnn_relu"}


def _program_recurrence(model: nn.Module) -> str:
    """A sentence on the recurrent layers a program (a ``.pt2``'s graph) runs: their units are
    gated in a module only (``compressdrop.dropout.LSTM``), and a program keeps none."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return ""
    ops: set[str] = {
        str(getattr(n.target, "_opname", None) or getattr(n.target, "__name__", ""))
        for n in graph.nodes
        if n.op == "call_function"
    }
    found = sorted(ops & _RECURRENT)
    if not found:
        return ""
    return (
        f"; its program runs {' and '.join(found)} layers, whose hidden units are gated only in a "
        "module (compressdrop.dropout.LSTM), which a program does not keep: give a state_dict "
        "with --arch naming a function that builds the model with compressdrop.dropout.LSTM"
    )


def unused_kl_scale(groups: Sequence[UnitGroup], kl_scale: dict[str, float]) -> list[str]:
    """A sentence for each ``kl_scale`` kind that no gated group has (the factor does nothing;
    a layer-name glob that matches nothing is an error, :func:`.costs.group_factors`)."""
    kinds = sorted({g.kind for g in groups})
    return [
        f"kl_scale[{kind!r}] matches no gated unit (the gates are on {' and '.join(kinds)} "
        "units only): the factor has no effect"
        for kind in kl_scale
        if kind in UNIT_KINDS and kind not in kinds
    ]


def pattern_names(patterns: Sequence[str | type] | None) -> list[str]:
    """Patterns as plain data: a type by its class name (what attach's record keeps)."""
    return [p if isinstance(p, str) else p.__name__ for p in (patterns or ())]


def only_sites_of(groups: Sequence[UnitGroup], layers: Collection[str]) -> list[UnitGroup]:
    """The groups with a gate on one of ``layers`` (attach's ``only_sites``), compared as names,
    not as globs (a layer's name may hold ``[`` or ``*``).

    Raises:
        InputError: none of the groups has.
    """
    wanted = set(layers)
    kept = [g for g in groups if any(s.name in wanted for s in g.sites)]
    if not kept:
        shown = shown_names(sorted(wanted))
        raise InputError(f"none of the layers of only_sites ({shown}) can be gated")
    return kept
