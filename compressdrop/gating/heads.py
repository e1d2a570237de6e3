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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .attention import MultiheadAttention, leaf_pruner, nested_off, to_prunable, why_not_heads
from .registry import customized_pruners, has_role, register_pruner

__all__ = ["HeadSpec", "head_spec_of", "register_attention", "remove_heads_"]  # + helpers


@dataclass(frozen=True)
class HeadSpec:
    """Where an attention module's heads are, by the paths of its parts.

    Attributes:
        o: path (from the attention module) of the output projection, a layer called once on the
            concatenated heads (``(..., heads · head_dim)``) whose layer spec has ``fold_in``.
        q, k, v: paths of separate query, key and value projections: rows ``h·D … (h+1)·D − 1``
            belong to head ``h``.
        qkv: path of one packed projection whose rows are ``[q; k; v]`` (instead of q, k, v).
        shared: paths of key/value projections that a block of query heads shares
            (grouped-query attention; ``remove`` cuts them where each serves one head): like q, k
            and v they start no unit group of their own.
        heads: the attribute holding the head count, or a function of the module giving it (then
            ``remove`` keeps the module's own record).
        widths: attributes equal to ``heads · head_dim``, set anew after removal.
        blocks: ``module → B``: the heads form ``B`` equal blocks of consecutive heads that must
            each keep as many (grouped-query attention: one block per key/value head). ``None``:
            one block.
        remove: ``(module, kept_heads) → None``: the module's own surgery, instead of slicing
            the projections (``nn.MultiheadAttention``'s packed ``in_proj_weight``).
        prepare: ``module → module``: what the module becomes before its heads are gated (a
            stock ``nn.MultiheadAttention`` becomes compressdrop's subclass).
        why_not: ``module → reason``: why its heads cannot be gated (``None``: they can).
        tables: ``(module, kept_heads) → None``: cut per-head tables after the projections
            (Swin's relative position bias).
    """

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    shared: tuple[str, ...] = ()
    heads: str | Callable[[nn.Module], int] = "num_heads"
    widths: tuple[str, ...] = ()
    blocks: Callable[[nn.Module], int] | None = None
    remove: Callable[[nn.Module, torch.Tensor], None] | None = None
    prepare: Callable[[nn.Module], nn.Module] | None = None
    why_not: Callable[[nn.Module], str | None] | None = None
    tables: Callable[[nn.Module, torch.Tensor], None] | None = None


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


def register_attention_at(module: str, name: str, spec: HeadSpec) -> None:
    """:func:`register_attention` for the class ``name`` of ``module`` (a dotted path, such as
    ``transformers.models.falcon.modeling_falcon``), where it can be imported: a version of the
    library without the module or the class registers nothing."""
    import importlib

    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return
    if found is not None:
        register_attention(found, spec)


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


def head_count(m: nn.Module, spec: HeadSpec) -> int:
    """The module's number of heads."""
    return int(spec.heads(m) if callable(spec.heads) else attr_at(m, spec.heads))


def head_blocks(m: nn.Module, spec: HeadSpec) -> int:
    """The equal blocks of consecutive heads that must each keep as many (1: no constraint)."""
    return int(spec.blocks(m)) if spec.blocks is not None else 1


def head_dim_of(m: nn.Module, spec: HeadSpec) -> int:
    """Features per head."""
    return _width(m, spec) // head_count(m, spec)


def cut_features(layer: nn.Module, idxs: Sequence[int], out: bool) -> None:
    """Remove output (``out``) or input features ``idxs`` of a projection, in place."""
    pruner = _pruner(layer)
    (pruner.prune_out_channels if out else pruner.prune_in_channels)(layer, list(idxs))


def head_features(heads: Sequence[int], step: int) -> list[int]:
    """Features ``step·h … step·(h+1) − 1`` of each of ``heads``: a head's ``head_dim`` outputs,
    or, with ``step`` = 3·``head_dim``, its q, k and v rows where a projection keeps them
    together."""
    return [h * step + i for h in heads for i in range(step)]


def _remove(m: nn.Module, spec: HeadSpec, pruned: Sequence[int]) -> nn.Module:
    """``m`` without heads ``pruned`` (``m`` itself, or what ``spec.prepare`` made of it)."""
    if spec.prepare is not None:
        m = spec.prepare(m)
    H = head_count(m, spec)
    keep = torch.tensor([h for h in range(H) if h not in set(pruned)], dtype=torch.long)
    if spec.remove is not None:
        spec.remove(m, keep)
        return m
    D = head_dim_of(m, spec)
    width = H * D
    cut = head_features(sorted(set(pruned)), D)
    for path in (spec.q, spec.k, spec.v):
        if path is not None:
            layer = m.get_submodule(path)
            _pruner(layer).prune_out_channels(layer, cut)
    if spec.qkv is not None:
        layer = m.get_submodule(spec.qkv)
        _pruner(layer).prune_out_channels(layer, [s * width + i for s in range(3) for i in cut])
    o = m.get_submodule(spec.o)
    _pruner(o).prune_in_channels(o, cut)
    if isinstance(spec.heads, str):
        set_attr_at(m, spec.heads, len(keep))
    for attr in spec.widths:
        set_attr_at(m, attr, len(keep) * D)
    if spec.tables is not None:
        spec.tables(m, keep)
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
