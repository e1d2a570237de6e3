"""Finding an attention's heads as a unit group: record how each attention is called while
tracing, check on that call that removing a head equals zeroing it, and cost a head."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .experts import is_experts
from .heads import (
    HeadSpec,
    _pruner,
    _remove,
    _width,
    head_blocks,
    head_count,
    head_dim_of,
    head_features,
    head_spec_of,
)
from .inputs import in_float32
from .packed_mlp import is_packed_mlp
from .registry import spec_of
from .units import Site, UnitGroup, _matches

__all__: list[str] = []  # internal to compressdrop.gating


def _without_caches(kwargs: dict) -> dict:
    """An attention call's keywords with any key/value cache (a Hugging Face ``Cache``: it has
    ``update`` and ``get_seq_length``) replaced by ``None``. Every call appends to a cache, so the
    check's two calls would see each other's keys; without one, a head's output on the recorded
    inputs is the same computation."""
    return {
        k: None if hasattr(v, "update") and hasattr(v, "get_seq_length") else v
        for k, v in kwargs.items()
    }


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def _check(m: nn.Module, spec: HeadSpec, call: tuple[tuple, dict]) -> tuple[str | None, int]:
    """Whether removing head 0 of ``m`` (of each block, see :attr:`HeadSpec.blocks`) gives
    exactly the output of zeroing its slice of the output projection's input, on the recorded
    ``call``; and the positions per example that the
    projection saw (the MACs multiplier). Returns ``(reason it is not exact or None, positions)``.
    A bfloat16 or float16 attention is checked in float32: the check is of its structure, and
    bfloat16's rounding (8 bits of mantissa) put a LLaMA's 16 heads of 64 at a relative error of
    8e-5 to 7e-4, above the tolerance: its heads were kept, and its gated checkpoint did not
    load back (the reload's plan had gated them)."""
    m, (args, kwargs) = in_float32(m, call)
    zeroed, removed = copy.deepcopy(m).eval(), copy.deepcopy(m).eval()
    D, seen = head_dim_of(m, spec), []
    per = head_count(m, spec) // head_blocks(m, spec)
    first = list(range(0, head_count(m, spec), per))  # head 0 of each block: blocks stay equal
    o_spec = spec_of(zeroed.get_submodule(spec.o))
    if o_spec is None or o_spec.fold_in is None:
        return "its output projection cannot fold a gate on its input", 1
    scale = torch.ones(_width(m, spec), device=next(m.parameters()).device)
    scale[head_features(first, D)] = 0
    o_spec.fold_in(zeroed.get_submodule(spec.o), scale)
    hook = zeroed.get_submodule(spec.o).register_forward_pre_hook(
        lambda _m, a: seen.append(tuple(a[0].shape))
    )
    try:
        want = _leaves(zeroed(*args, **kwargs))
        got = _leaves(_remove(removed, spec, first)(*args, **kwargs))
    except Exception as e:
        return f"removing a head breaks its forward ({type(e).__name__}: {e})", 1
    finally:
        hook.remove()
    if len(seen) != 1 or seen[0][-1] != _width(m, spec):
        return "its output projection is not called once on the concatenated heads", 1
    want = [_kept_heads(w, g, head_count(m, spec), first) for w, g in zip(want, got)]
    if [t.shape for t in got] != [t.shape for t in want] or not want:
        return "removing a head changes the shape of its output", 1
    err = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, want)
    )
    if not err <= 1e-5:
        return f"removing a head is not the same as zeroing it (relative error {err:.2g})", 1
    positions = 1
    for s in seen[0][1:-1]:
        positions *= s
    return None, positions


def _kept_heads(
    want: torch.Tensor, got: torch.Tensor, heads: int, removed: list[int]
) -> torch.Tensor:
    """A per-head output of the zeroed attention (its attention weights, ``(B, heads, T, S)``,
    which an eager Hugging Face attention returns beside its output) without the removed heads'
    slices, where ``got`` has one dimension of ``heads - len(removed)`` in its place and all
    others alike: the slim attention returns the kept heads' weights. Else ``want`` as it is."""
    if want.dim() != got.dim():
        return want
    differ = [d for d in range(want.dim()) if want.shape[d] != got.shape[d]]
    if len(differ) != 1 or want.shape[differ[0]] != heads:
        return want
    if got.shape[differ[0]] != heads - len(removed):
        return want
    kept = [h for h in range(heads) if h not in removed]
    return want.index_select(differ[0], torch.tensor(kept, device=want.device))


def _head_costs(m: nn.Module, spec: HeadSpec, positions: int) -> tuple[float, float]:
    """Parameters and multiply-adds per example that one head controls (its projections)."""
    D = head_dim_of(m, spec)
    params = macs = 0.0
    parts = [(p, True) for p in (spec.q, spec.k, spec.v, spec.qkv) if p is not None]
    for path, out in [*parts, (spec.o, False)]:
        layer = m.get_submodule(path)
        layer_spec = spec_of(layer)
        if layer_spec is not None:
            p, mac = layer_spec.unit_costs(layer, out)
            rows = _qkv_rows(m, spec, layer, D) if path == spec.qkv else 1
            params, macs = params + rows * D * p, macs + rows * D * mac * positions
    if isinstance(m, nn.MultiheadAttention):  # the packed in_proj, not a submodule
        E, bias = m.embed_dim, 0 if m.in_proj_bias is None else 1
        params += D * (E + m.kdim + m.vdim + 3 * bias)
        macs += D * (E + m.kdim + m.vdim) * positions
    return params, macs


def _qkv_rows(m: nn.Module, spec: HeadSpec, layer: nn.Module, D: int) -> int:
    """Rows of a packed projection that go with one head, in units of ``D``: its q, k and v
    (3) where the projection holds ``3 · heads · D`` rows; its query alone (1) where fewer, the
    keys and values being shared by groups of heads (grouped or multi-query attention: Phi-3,
    Falcon, GPT-BigCode)."""
    rows = int(_pruner(layer).get_out_channels(layer))
    return 3 if rows == 3 * head_count(m, spec) * D else 1


def _query_positions(m: nn.Module, query: Any) -> int:
    """Query positions per example of an ``nn.MultiheadAttention`` call."""
    if not isinstance(query, torch.Tensor) or query.dim() < 3:
        return 1
    if query.dim() == 4:  # channels-last windows (Swin): every position of the map
        return int(query.shape[1] * query.shape[2])
    return int(query.shape[1] if getattr(m, "batch_first", False) else query.shape[0])


def find_heads(
    model: nn.Module,
    calls: dict[str, tuple[tuple, dict]],
    include: Sequence[str | type] | None,
    exclude: Sequence[str | type] | None,
) -> tuple[list[UnitGroup], list[str]]:
    """The head groups of ``model``'s attentions, from the ``calls`` recorded while tracing.

    Returns:
        The groups, and for each attention whose heads cannot be gated a sentence saying why.
    """
    groups, problems = [], []
    for name, m in model.named_modules():
        found = head_spec_of(m)
        if found is None or name not in calls:
            continue
        if (include and not _matches(name, m, include)) or _matches(name, m, exclude):
            continue
        spec = found[0]
        why = spec.why_not(m) if spec.why_not is not None else None
        H, blocks = head_count(m, spec), head_blocks(m, spec)
        if why is None and H < 2:
            why = "it has a single head"
        elif why is None and H // blocks < 2:
            why = f"each of its {blocks} key/value heads serves a single query head"
        positions = 1
        if why is None and spec.prepare is None:
            why, positions = _check(m, spec, calls[name])
        elif why is None:
            positions = _query_positions(m, calls[name][0][0])
        if why is not None:
            problems.append(f"attention {name!r} keeps all its heads: {why}")
            continue
        params, macs = _head_costs(m, spec, positions)
        site = Site(f"{name}.{spec.o}", -2, head_dim=head_dim_of(m, spec), attention=name)
        groups.append(
            UnitGroup(
                name,
                H,
                "head",
                [name],
                [site],
                torch.full((H,), params),
                torch.full((H,), macs),
                blocks,
            )
        )
    return groups, problems


def record_calls(model: nn.Module) -> tuple[dict[str, tuple[tuple, dict]], Callable[[], None]]:
    """Hooks that record the first call of every attention, fused experts module and packed MLP in
    ``model``; returns the record and the function that removes the hooks."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def hook(name: str) -> Callable:
        def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in calls:
                detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                calls[name] = detached, _without_caches(kwargs)

        return record

    handles = [
        m.register_forward_pre_hook(hook(n), with_kwargs=True)
        for n, m in model.named_modules()
        if head_spec_of(m) is not None or is_experts(m) or is_packed_mlp(m)
    ]

    def unhook() -> None:
        for h in handles:
            h.remove()

    return calls, unhook


def projections_of(model: nn.Module, groups: Sequence[UnitGroup]) -> set[str]:
    """Names of the q/k/v projections whose units are heads, so that their own groups are not
    gated: those of the gated attentions, and those of every registered attention whatever
    became of its heads (refused with the reason said, left out by ``granularity`` or
    ``exclude``). A registered attention's projections reach its heads only through its
    reshape: as neurons they would be refused at the end of a walk through the whole attention,
    and with one warning each (a LLaMA of 8 layers pruned by neurons: 16 of them, and the walks
    took 12 s against 4 s). An attention found by its parts' names, not registered, keeps its
    projections' groups where its heads are not gated."""
    out: set[str] = set()
    gated = {g.name for g in groups if g.kind == "head"}
    for name, m in model.named_modules():
        found = head_spec_of(m)
        if found is None or not (found[1] or name in gated):
            continue
        spec = found[0]
        paths = (spec.q, spec.k, spec.v, spec.qkv, *spec.shared)
        out.update(f"{name}.{p}" for p in paths if p is not None)
    return out
