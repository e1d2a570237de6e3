"""Attention heads as units: one gate per head, on the head's output, removed exactly.

A head's output reaches the rest of the model only through the attention's output projection, as
its own slice of ``head_dim`` input features. A gate on that slice (the projection's input split
into heads) makes a pruned head contribute an exact zero; surgery then removes the head's query,
key and value rows and the projection's columns, and updates the module's own head count (and the
widths that depend on it), so that nothing needs patching by hand.

Which modules are attentions:

* a type registered with :func:`register_attention` (PyTorch's ``nn.MultiheadAttention`` is, via
  compressdrop's :class:`~compressdrop.gating.attention.MultiheadAttention`, which it becomes when
  its heads are gated);
* any other module found by the names of its parts: a head count attribute (``num_heads``,
  ``n_heads``, ``num_attention_heads``, ``n_head``) and Linear projections named like
  ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``query``/``key``/``value``/``out``, or a packed
  ``qkv`` with ``proj``. Such a module is gated only after a check, on the inputs it was called
  with while tracing, that removing a head gives exactly the output of zeroing it.

Example: an attention whose parts have other names::

    register_attention(MyAttention, HeadSpec(o="wo", q="wq", k="wk", v="wv", heads="n"))
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .attention import MultiheadAttention, leaf_pruner, nested_off, to_prunable, why_not_heads
from .registry import customized_pruners, has_role, register_pruner, spec_of
from .units import Site, UnitGroup, _matches

__all__ = ["HeadSpec", "head_spec_of", "register_attention", "remove_heads_"]


@dataclass(frozen=True)
class HeadSpec:
    """Where an attention module's heads are, by the paths of its parts.

    Attributes:
        o: path (from the attention module) of the output projection, a layer called once on the
            concatenated heads (``(..., heads · head_dim)``) whose layer spec has ``fold_in``.
        q, k, v: paths of separate query, key and value projections: rows ``h·D … (h+1)·D − 1``
            belong to head ``h``.
        qkv: path of one packed projection whose rows are ``[q; k; v]`` (instead of q, k, v).
        heads: the attribute holding the head count.
        widths: attributes equal to ``heads · head_dim``, set anew after removal.
        remove: ``(module, kept_heads) → None``: the module's own surgery, instead of slicing
            the projections (``nn.MultiheadAttention``'s packed ``in_proj_weight``).
        prepare: ``module → module``: what the module becomes before its heads are gated (a
            stock ``nn.MultiheadAttention`` becomes compressdrop's subclass).
        why_not: ``module → reason``: why its heads cannot be gated (``None``: they can).
    """

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    heads: str = "num_heads"
    widths: tuple[str, ...] = ()
    remove: Callable[[nn.Module, torch.Tensor], None] | None = None
    prepare: Callable[[nn.Module], nn.Module] | None = None
    why_not: Callable[[nn.Module], str | None] | None = None


_SPECS: dict[type, HeadSpec] = {}


def register_attention(types: type | tuple[type, ...], spec: HeadSpec) -> None:
    """Tell compressdrop where the heads of attention modules of ``types`` are.

    Raises:
        InputError: ``types`` are not ``nn.Module`` subclasses.
    """
    for t in types if isinstance(types, tuple) else (types,):
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise InputError(f"register_attention: {t!r} is not an nn.Module subclass")
        _SPECS[t] = spec


_HEAD_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head")
_SEPARATE = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("query", "key", "value", "out"),
    ("query", "key", "value", "out_proj"),
    ("q", "k", "v", "o"),
    ("q", "k", "v", "proj"),
    ("wq", "wk", "wv", "wo"),
    ("to_q", "to_k", "to_v", "to_out"),
)
_PACKED = (("qkv", "proj"), ("qkv", "out_proj"), ("qkv", "o_proj"), ("qkv", "out"))


def _is_layer(m: nn.Module, path: str, role: str = "producer") -> bool:
    try:
        sub = m.get_submodule(path)
    except AttributeError:
        return False
    return has_role(sub, role)


def head_spec_of(m: nn.Module) -> tuple[HeadSpec, bool] | None:
    """The head spec of ``m`` and whether it was registered (``False``: found by its parts'
    names, to be checked), or ``None``: ``m`` is not an attention compressdrop knows."""
    for base in type(m).__mro__:
        if base in _SPECS:
            return _SPECS[base], True
    heads = next((a for a in _HEAD_ATTRS if isinstance(getattr(m, a, None), int)), None)
    if heads is None:
        return None
    for q, k, v, o in _SEPARATE:
        if all(_is_layer(m, p) for p in (q, k, v, o)):
            return HeadSpec(o=o, q=q, k=k, v=v, heads=heads), False
    for qkv, o in _PACKED:
        if _is_layer(m, qkv) and _is_layer(m, o):
            return HeadSpec(o=o, qkv=qkv, heads=heads), False
    return None


def _pruner(layer: nn.Module) -> Any:
    import torch_pruning as tp

    p = customized_pruners().get(type(layer))
    if p is None:
        p = tp.pruner.function.PrunerBox.get(tp.ops.module2type(layer))
    if p is None:
        raise InputError(f"no Torch-Pruning pruner slices a {type(layer).__name__}")
    return p


def attr_at(m: nn.Module, path: str) -> Any:
    """``m``'s attribute at a dotted ``path`` (``"self.num_attention_heads"``)."""
    return functools.reduce(getattr, path.split("."), m)


def set_attr_at(m: nn.Module, path: str, value: Any) -> None:
    """Set ``m``'s attribute at a dotted ``path``."""
    *owner, last = path.split(".")
    setattr(functools.reduce(getattr, owner, m), last, value)


def _width(m: nn.Module, spec: HeadSpec) -> int:
    """Features of the concatenated heads: the output projection's inputs."""
    o = m.get_submodule(spec.o)
    return int(_pruner(o).get_in_channels(o))


def head_dim_of(m: nn.Module, spec: HeadSpec) -> int:
    """Features per head."""
    return _width(m, spec) // int(attr_at(m, spec.heads))


def _features(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + i for h in heads for i in range(head_dim)]


def _remove(m: nn.Module, spec: HeadSpec, pruned: Sequence[int]) -> nn.Module:
    """``m`` without heads ``pruned`` (``m`` itself, or what ``spec.prepare`` made of it)."""
    if spec.prepare is not None:
        m = spec.prepare(m)
    H = int(attr_at(m, spec.heads))
    keep = torch.tensor([h for h in range(H) if h not in set(pruned)], dtype=torch.long)
    if spec.remove is not None:
        spec.remove(m, keep)
        return m
    D = head_dim_of(m, spec)
    width = H * D
    cut = _features(sorted(set(pruned)), D)
    for path in (spec.q, spec.k, spec.v):
        if path is not None:
            layer = m.get_submodule(path)
            _pruner(layer).prune_out_channels(layer, cut)
    if spec.qkv is not None:
        layer = m.get_submodule(spec.qkv)
        _pruner(layer).prune_out_channels(layer, [s * width + i for s in range(3) for i in cut])
    o = m.get_submodule(spec.o)
    _pruner(o).prune_in_channels(o, cut)
    set_attr_at(m, spec.heads, len(keep))
    for attr in spec.widths:
        set_attr_at(m, attr, len(keep) * D)
    return m


def remove_heads_(root: nn.Module, name: str, pruned: Sequence[int]) -> None:
    """Remove heads ``pruned`` of the attention ``name`` of ``root``, in place.

    Raises:
        InputError: ``name`` is not an attention compressdrop knows.
    """
    m = root.get_submodule(name)
    found = head_spec_of(m)
    if found is None:
        raise InputError(f"{name!r} ({type(m).__name__}) is not an attention module")
    new = _remove(m, found[0], pruned)
    if new is not m:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, new)
        nested_off(root)


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
    """Whether removing head 0 of ``m`` gives exactly the output of zeroing its slice of the
    output projection's input, on the recorded ``call``; and the positions per example that the
    projection saw (the MACs multiplier). Returns ``(reason it is not exact or None, positions)``."""
    args, kwargs = call
    zeroed, removed = copy.deepcopy(m).eval(), copy.deepcopy(m).eval()
    D, seen = head_dim_of(m, spec), []
    o_spec = spec_of(zeroed.get_submodule(spec.o))
    if o_spec is None or o_spec.fold_in is None:
        return "its output projection cannot fold a gate on its input", 1
    scale = torch.ones(_width(m, spec), device=next(m.parameters()).device)
    scale[:D] = 0
    o_spec.fold_in(zeroed.get_submodule(spec.o), scale)
    hook = zeroed.get_submodule(spec.o).register_forward_pre_hook(
        lambda _m, a: seen.append(tuple(a[0].shape))
    )
    try:
        want = _leaves(zeroed(*args, **kwargs))
        got = _leaves(_remove(removed, spec, [0])(*args, **kwargs))
    except Exception as e:
        return f"removing a head breaks its forward ({type(e).__name__}: {e})", 1
    finally:
        hook.remove()
    if len(seen) != 1 or seen[0][-1] != _width(m, spec):
        return "its output projection is not called once on the concatenated heads", 1
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
            rows = 3 if path == spec.qkv else 1
            params, macs = params + rows * D * p, macs + rows * D * mac * positions
    if isinstance(m, nn.MultiheadAttention):  # the packed in_proj, not a submodule
        E, bias = m.embed_dim, 0 if m.in_proj_bias is None else 1
        params += D * (E + m.kdim + m.vdim + 3 * bias)
        macs += D * (E + m.kdim + m.vdim) * positions
    return params, macs


def _query_positions(m: nn.Module, query: Any) -> int:
    """Query positions per example of an ``nn.MultiheadAttention`` call."""
    if not isinstance(query, torch.Tensor) or query.dim() < 3:
        return 1
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
        H = int(attr_at(m, spec.heads))
        if why is None and H < 2:
            why = "it has a single head"
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
                name, H, "head", [name], [site], torch.full((H,), params), torch.full((H,), macs)
            )
        )
    return groups, problems


def record_calls(model: nn.Module) -> tuple[dict[str, tuple[tuple, dict]], Callable[[], None]]:
    """Hooks that record the first call of every attention in ``model``; returns the record and
    the function that removes the hooks."""
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
        if head_spec_of(m) is not None
    ]

    def unhook() -> None:
        for h in handles:
            h.remove()

    return calls, unhook


def projections_of(model: nn.Module, groups: Sequence[UnitGroup]) -> set[str]:
    """Names of the q/k/v projections of the gated attentions (their own groups are not gated:
    their units are the heads)."""
    out: set[str] = set()
    for g in groups:
        if g.kind != "head":
            continue
        found = head_spec_of(model.get_submodule(g.name))
        assert found is not None
        spec = found[0]
        out.update(f"{g.name}.{p}" for p in (spec.q, spec.k, spec.v, spec.qkv) if p is not None)
    return out


# -- PyTorch's nn.MultiheadAttention --------------------------------------------------------------
def _remove_mha(m: nn.Module, keep: torch.Tensor) -> None:
    assert isinstance(m, MultiheadAttention)
    m.remove_heads_(keep)


def _prepare_mha(m: nn.Module) -> nn.Module:
    assert isinstance(m, nn.MultiheadAttention)
    return to_prunable(m)


def _why_not_mha(m: nn.Module) -> str | None:
    assert isinstance(m, nn.MultiheadAttention)
    return why_not_heads(m)


register_attention(
    nn.MultiheadAttention,
    HeadSpec(o="out_proj", remove=_remove_mha, prepare=_prepare_mha, why_not=_why_not_mha),
)
register_pruner(MultiheadAttention, leaf_pruner)
