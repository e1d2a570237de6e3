"""The modules whose units are removed by their own surgery, not Torch-Pruning's: fused experts
(:mod:`compressdrop.gating.experts`) and packed gate/up MLPs
(:mod:`compressdrop.gating.packed_mlp`), whose neurons are rows of a 3-D tensor or two rows of one
Linear that Torch-Pruning's graph does not index as one unit. :func:`~compressdrop.pruning.prune`
and :func:`~compressdrop.pruning.replay` both look the surgery up here, by the history's mark."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..gating.experts import remove_expert_units_
from ..gating.experts_gated import ExpertsGated
from ..gating.packed_mlp import remove_packed_units_
from ..gating.packed_mlp_gated import PackedMLPGated
from .report import EXPERTS, PACKED

__all__: list[str] = []  # internal to compressdrop.pruning

#: the gated wrapper of such a module → the pruning history's mark of its removed units
MARK_OF: dict[type[nn.Module], str] = {ExpertsGated: EXPERTS, PackedMLPGated: PACKED}
#: the mark → the surgery ``(root, module name, units) → None`` that removes them, in place
SURGERY: dict[str, Callable[[nn.Module, str, list[int]], None]] = {
    EXPERTS: remove_expert_units_,
    PACKED: remove_packed_units_,
}
