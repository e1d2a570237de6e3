"""Grouped convolutions: units aligned to the conv's groups.

A convolution with ``G`` groups splits its input channels, and its output channels, into ``G``
equal blocks of consecutive channels; each block of outputs sees only its block of inputs. A
unit group that feeds such a conv (or that the conv produces) can lose channels only if every
block loses the same number: the slim conv must again have ``G`` equal blocks. So such a
:class:`~compressdrop.gating.UnitGroup` records ``blocks`` (the least common multiple of the
groups of every grouped conv it touches), and the keep rule (:func:`align_keep`) keeps the same
number of units in every block: in each block the units the threshold keeps, topped up with the
block's next best units by SNR up to the most any block keeps. Keeping a unit is always exact
(its E[θ] folds into the weights like any kept unit's), so the slim model still equals the masked
model; it only keeps some units whose SNR is below the threshold.

Torch-Pruning slices a grouped conv's input channels as if every block kept the same positions
(``ConvPruner.prune_in_channels`` keeps block 0's), so :mod:`compressdrop.pruning` gathers each
block's own kept channels afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__: list[str] = []  # internal to compressdrop

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_grouped_conv(m: object) -> bool:
    """Whether ``m`` is a convolution with groups that are not depthwise (one channel in, one
    out, which Torch-Pruning couples and slices itself)."""
    return (
        isinstance(m, _CONVS) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)
    )


def group_alignment(tp_group, num_units: int, names: dict) -> tuple[int, str | None]:
    """The number of equal blocks a Torch-Pruning group's units must be removed in.

    Args:
        tp_group: a group from Torch-Pruning's dependency graph, built with every unit.
        num_units: the units of the group (its root layer's output channels).
        names: module → name, for the message.

    Returns:
        ``(blocks, problem)``: ``blocks`` is 1 where no grouped conv is involved; ``problem`` says
        why the group cannot be aligned (``None``: it can).
    """
    blocks, convs = 1, []
    for item in tp_group.items:
        m = item.dep.target.module
        if not is_grouped_conv(m):
            continue
        name = names.get(m, type(m).__name__)
        out = item.dep.handler.__name__ == "prune_out_channels"
        if m.groups == m.out_channels:
            # one output per group: Torch-Pruning takes it for a depthwise conv and would cut its
            # inputs and outputs together
            return (
                blocks,
                f"its units reach {name!r}, a grouped convolution with one output per group",
            )
        channels = m.out_channels if out else m.in_channels
        root = getattr(item, "root_idxs", None) or item.idxs
        if channels != num_units or sorted(zip(item.idxs, root)) != [
            (i, i) for i in range(num_units)
        ]:
            # the channels reach the conv reordered or through a concatenation: the conv's blocks
            # are not consecutive blocks of the group's units
            return blocks, f"its units reach the grouped convolution {name!r} reordered"
        blocks = math.lcm(blocks, m.groups)
        convs.append(name)
        if blocks >= num_units:
            # one unit a block (a depthwise conv with a channel multiplier, say): every block
            # must keep its unit, so a gate here could never prune anything
            where = (
                f"{name!r}, a grouped convolution with one of them per group"
                if m.groups >= num_units
                else f"the grouped convolutions {', '.join(map(repr, convs))}, whose groups "
                "together leave one of them per block"
            )
            return blocks, f"its units reach {where}, and every group must keep its channel"
    return blocks, None


def round_up(k: int, multiple: int, most: int) -> int:
    """``k`` rounded up to a multiple of ``multiple``, but at most ``most``."""
    return min(most, -(-k // multiple) * multiple)


def align_keep(
    keep: torch.Tensor, snr: torch.Tensor, blocks: int, multiple: int = 1
) -> torch.Tensor:
    """The kept units when every one of ``blocks`` consecutive blocks must keep as many.

    Args:
        keep: the units the threshold keeps, shape ``(num_units,)``, boolean.
        snr: the units' SNR, shape ``(num_units,)``.
        blocks: equal blocks of consecutive units (``num_units % blocks == 0``).
        multiple: every block keeps a multiple of this many units, or all of its units.

    Returns:
        ``keep`` with, in each block, the next highest-SNR units added until the block keeps as
        many as the block that keeps most (and at least one unit in every block), rounded up
        to ``multiple``.
    """
    if blocks <= 1 and multiple <= 1:
        return keep
    per = keep.numel() // blocks
    kept = keep.reshape(blocks, per)  # (blocks, per)
    k = round_up(max(1, int(kept.sum(dim=1).max())), multiple, per)
    # rank the threshold's kept units first, then by SNR (NaN last), within each block
    score = torch.nan_to_num(snr.detach().double(), nan=-math.inf).reshape(blocks, per)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~kept).gather(1, order).int(), dim=1, stable=True).indices)
    out = torch.zeros_like(kept)
    out.scatter_(1, order[:, :k], True)
    return out.reshape(-1)
