"""One shape for every repeated block: the same number of units kept in each layer of a stack.

A transformer's layers are copies of one block, and a library's config describes them with one
number per kind of unit (``num_attention_heads``, ``intermediate_size``). Pruning each layer by its
own gates gives each its own width, which no such config can express. The uniform rule keeps a
standard shape: gates of the same place in each block (their names equal once the layer index is
blanked out, the same number of units and blocks) form a family; the family keeps, in every member,
as many units as its members keep on average under the threshold (rounded, at least one per
block; for a fused experts module rounded up to its multiple, see
:mod:`compressdrop.gating.experts`), each member its own highest-SNR units.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from ..gates import Gate
from ..gating.aligned import round_up

__all__ = ["family_key", "repeats", "uniform_keep"]


def family_key(name: str, gate: Gate) -> tuple[str, int, int]:
    """The family of a gate: its name with every number blanked (``layers.#.mlp.up_proj``), its
    units and its blocks."""
    return re.sub(r"\d+", "#", name), gate.num_units, int(getattr(gate, "unit_blocks", 1))


def repeats(gates: list[tuple[str, Gate]]) -> bool:
    """Whether any two gates are of one family (the same place in repeated blocks): else the
    uniform rule changes nothing."""
    keys = [family_key(name, g) for name, g in gates]
    return len(set(keys)) < len(keys)


def _top(snr: torch.Tensor, per_block: int, blocks: int) -> torch.Tensor:
    """Keep the ``per_block`` highest-SNR units of each of ``blocks`` consecutive blocks."""
    score = torch.nan_to_num(snr.detach().double(), nan=-float("inf")).reshape(blocks, -1)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(per_block, dim=1).indices, True)
    return keep.flatten()


def uniform_keep(
    gates: list[tuple[str, Gate]], keeps: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """The keep masks under the uniform rule (see the module docstring).

    Args:
        gates: ``(name, gate)`` pairs, as :func:`~compressdrop.gating.named_gates` gives them.
        keeps: each gate's keep mask under its threshold, by ``id(gate)``.

    Returns:
        New keep masks by ``id(gate)``: every member of a family of two or more gates keeps the
        same number of units (per block); a gate alone in its family keeps its mask.
    """
    families: dict[tuple[str, int, int], list[Gate]] = defaultdict(list)
    for name, g in gates:
        families[family_key(name, g)].append(g)
    out = dict(keeps)
    for (_, units, blocks), members in families.items():
        if len(members) < 2:
            continue
        mean = sum(int(keeps[id(g)].sum()) for g in members) / len(members)
        multiple = int(getattr(members[0], "unit_multiple", 1))
        per_block = round_up(max(1, round(mean / blocks)), multiple, units // blocks)
        for g in members:
            out[id(g)] = _top(g.snr(), per_block, blocks)
    return out
