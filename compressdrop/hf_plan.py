"""Before a plain model is trained for a Hugging Face folder: refuse the plans whose slim model
no config could describe, which :func:`~compressdrop.hf_folder.save_hf_folder` would refuse only
after the whole training.

Two refusals come from the plan alone: layers free to keep different widths, and heads gated where
the library derives the head size from the head count (GPT-2, BERT, BLOOM, Falcon, StableLM, ...).
Every other one comes from a dry run that knows no family: the model's modules are copied with their
weights on the ``meta`` device (no memory, nothing read), the smallest cut the prune could make (one
unit, or one head per key/value head, one aligned block) is made in every group attach would gate,
one kind of unit at a time, and :func:`~compressdrop.hf_folder.folder_problem`, the check
``save_hf_folder`` runs, is asked whether the config can describe the result. The families whose
tiny configs (transformers 5.25) are refused, and what their config cannot say: the heads of Phi-3
(``qkv_proj``), GPT-NeoX and Persimmon (``query_key_value``), GPT-BigCode, GPT-J, XGLM and OPT,
BLOOM (its MLP width is 4 · ``hidden_size``). The MLP width of Phi-3, GPT-NeoX, Persimmon, GPT-J,
CodeGen, GPT-BigCode, OPT and XGLM is a field the config follows
(:data:`~compressdrop._families.MLP_WIDTHS`): their uniform MLP prune passes (Phi-3's packed
``gate_up_proj`` is gated per neuron, :mod:`compressdrop.gating.packed_mlp`, so every layer keeps as
many). The meta copy is bfloat16 (meta tensors hold no data, so the dtype costs nothing): fused
experts run ``grouped_mm``, whose meta kernel takes bfloat16 alone (torch 2.13; float32 and
float16 are refused), and a mixture of experts must be traced to cut the dense layers beside its
experts through Torch-Pruning's graph (Qwen2-MoE's shared expert).
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressDropError, InputError
from .gating.experts import is_experts, remove_expert_units_
from .gating.heads import remove_heads_
from .gating.known import DIFFERENT_WIDTHS, heads_fixed_by_config
from .gating.packed_mlp import is_packed_mlp, remove_packed_units_
from .gating.tpgraph import build_graph
from .gating.units import UnitGroup
from .hf_folder import folder_problem
from .pruning.grouped import prune_group

__all__ = ["check_folder_plan"]


def check_folder_plan(
    out: str | Path,
    model: nn.Module,
    gates: Mapping[str, Any],
    uniform: bool,
    example_inputs: Any,
) -> None:
    """Refuse, before training, a plan whose slim folder ``out`` no config could describe.
    ``gates`` are :func:`compressdrop.attach`'s keyword arguments, ``uniform`` the prune
    setting; ``model`` is traced and copied to the meta device, never changed.

    Raises:
        InputError: the layers may keep different widths (``uniform`` is false and several
            layers' units of a kind are gated); heads would be gated where the library derives
            the head size from the head count; or cutting one step of a kind of unit gives a
            model whose config cannot describe it (the message is ``save_hf_folder``'s, with
            the ``exclude`` pattern that leaves those units alone).
    """
    from .gating.groups import find_groups

    try:  # the groups attach would gate (the model is traced, not changed)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run's own attach says them
            groups = find_groups(
                model, example_inputs, gates.get("granularity", "auto"),
                gates.get("include") or None, gates.get("exclude") or None, warn=False,
            )  # fmt: skip
    except CompressDropError:
        return  # the run's check names the problem
    kinds = [g.kind for g in groups]
    if not uniform and any(kinds.count(k) > 1 for k in set(kinds)):
        raise InputError(
            f"{out}: a Hugging Face folder needs every layer to keep as many units, which a free "
            "prune of several layers does not give: pass --uniform (uniform=True; or "
            "prune.uniform: true in the recipe), or write .pt2, .onnx or .pt"
        )
    fixed = heads_fixed_by_config(model)
    if fixed is not None and "head" in kinds:
        derived, attention = fixed
        raise InputError(
            f"{out}: the recipe gates attention heads, and a {type(model.config).__name__} "
            f"derives their size from {derived}, so a folder cannot hold fewer of them: leave "
            f"the heads ungated (gates.exclude: [{attention}] in the recipe) or write .pt2, "
            ".onnx or .pt"
        )
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        return  # (why_no_folder refused it already)
    cuts = _by_exclude_pattern(model, groups)
    problems = {
        pattern: problem
        for pattern, cut in cuts.items()
        if (slim := _cut(model, cut, example_inputs)) is not None
        and (problem := folder_problem(slim)) is not None
    }
    partial = {p: why for p, why in problems.items() if why.startswith(DIFFERENT_WIDTHS)}
    if partial:  # each gated group was cut alike: the layers that kept their width have no gates
        pattern, why = next(iter(partial.items()))
        sizes = why.removeprefix(DIFFERENT_WIDTHS).split(", which")[0].strip()
        raise InputError(
            f"{out}: cannot write a Hugging Face folder: the units that match {pattern!r} are "
            f"gated in {len(cuts[pattern])} of the layers, and cutting them leaves the layers "
            f"at different widths {sizes}; a config gives every layer one width, which a uniform "
            "prune keeps only among the gated layers: gate those units in every layer (the "
            "recipe's gates.include and gates.exclude leave the others out) or in none "
            f"(gates.exclude: [{pattern!r}]), or write .pt2, .onnx or .pt. Refused before "
            "training: a dry run on the meta device cut one step of each kind of unit"
        )
    if problems:
        patterns = ", ".join(repr(p) for p in problems)
        raise InputError(
            f"{out}: cannot write a Hugging Face folder: {next(iter(problems.values()))}; or "
            f"leave those units ungated (gates.exclude: [{patterns}] in the recipe). Refused "
            "before training: a dry run on the meta device cut one step of each kind of unit"
        )


def _by_exclude_pattern(model: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, list]:
    """The groups by what attach's ``exclude`` would name to leave them alone: an attention's
    class for its heads, else the first producer's name with its layer numbers as ``*``."""
    out: dict[str, list] = {}
    for g in groups:
        if g.kind == "head":
            pattern = type(model.get_submodule(g.sites[0].attention or g.name)).__name__
        else:
            pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", g.producers[0])
        out.setdefault(pattern, []).append(g)
    return out


def _step(g: UnitGroup) -> list[int]:
    """The smallest cut the prune could make of ``g``, the same in each of its blocks (one query
    head per key/value head): one unit, or down to the next ``multiple`` (fused experts' aligned
    rows); none where a block could keep no fewer."""
    per = g.num_units // max(g.blocks, 1)
    n = per % g.multiple or g.multiple
    if per - n < 1:
        return []
    return [b * per + j for b in range(g.blocks) for j in range(n)]


#: the meta copy's floating dtype: ``grouped_mm`` (fused experts) has a meta kernel for it alone
_META_DTYPE = torch.bfloat16


def _meta(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape on the meta device, floating tensors as :data:`_META_DTYPE`."""
    dtype = _META_DTYPE if t.is_floating_point() else t.dtype
    return torch.empty_like(t, device="meta", dtype=dtype)


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: their shapes,
    no memory (the real tensors are neither read nor copied); floating ones bfloat16, which
    every kernel the dry run traces has on meta (float32 lacks ``grouped_mm``'s)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = _meta(t)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _cut(model: nn.Module, groups: Sequence[UnitGroup], example: Any) -> nn.Module | None:
    """A meta copy of ``model`` with one :func:`_step` cut from each of ``groups``, the way
    :func:`compressdrop.pruning.prune` cuts: heads, fused experts and packed MLPs by their own
    surgery, the rest through Torch-Pruning's dependency graph traced on the meta copy (in
    bfloat16, :func:`_on_meta`, with floating inputs to match); ``None`` where the meta copy
    cannot be cut or traced, which leaves the question to ``save_hf_folder``'s own check."""
    work = _on_meta(model)
    rest = []
    try:
        for g in groups:
            idxs, site = _step(g), g.sites[0]
            if not idxs:
                continue
            if site.head_dim:
                remove_heads_(work, site.attention, idxs)
            elif is_experts(work.get_submodule(site.name)):
                remove_expert_units_(work, site.name, idxs)
            elif is_packed_mlp(work.get_submodule(site.name)):  # Phi-3's gate_up_proj
                remove_packed_units_(work, site.name, idxs)
            else:
                rest.append((site.name, idxs))
        if not rest:
            return work
        inputs = example if isinstance(example, tuple) else (example,)
        dg, _ = build_graph(work, tuple(_meta(t) for t in inputs))
        if dg is None:
            return None
        for name, idxs in rest:
            module = work.get_submodule(name)
            pruner = dg.get_pruner_of_module(module)
            prune_group(dg.get_pruning_group(module, pruner.prune_out_channels, idxs=idxs))
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
        return None
    return work
