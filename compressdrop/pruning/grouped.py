"""Removing channels a grouped convolution reads: each group keeps its own channels.

Torch-Pruning's ``ConvPruner.prune_in_channels`` slices a grouped conv's weight ``(out, in/g, ...)``
along its input dimension with block 0's kept positions for every block, which is right only when
each block keeps the same positions. compressdrop keeps the same *number* of units in every block
(:func:`compressdrop.gating.aligned.align_keep`) but not the same positions, so after Torch-Pruning
has cut the layer to its new shape, :func:`prune_group` fills the weight with each block's own
kept input channels.
"""

from __future__ import annotations

import torch

from ..gating.aligned import is_grouped_conv

__all__: list[str] = []  # internal to compressdrop.pruning


@torch.no_grad()
def prune_group(group) -> str | None:
    """``group.prune()``, then gather every grouped conv's kept input channels block by block.

    Args:
        group: a Torch-Pruning pruning group (indices to remove).

    Returns:
        ``None``, or why a grouped conv could not be cut (its blocks lose different numbers of
        channels): the model is then left in an unusable state.
    """
    saved = [
        (dep.target.module, dep.target.module.weight.detach().clone(), set(idxs))
        for dep, idxs in group
        if is_grouped_conv(dep.target.module) and dep.handler.__name__ == "prune_in_channels"
    ]
    group.prune()
    for conv, weight, removed in saved:
        g = conv.groups
        out, per = weight.shape[0], weight.shape[1]  # weight: (out, in/g, *kernel)
        keep = [[j for j in range(per) if b * per + j not in removed] for b in range(g)]
        if len({len(k) for k in keep}) != 1 or conv.weight.shape[0] != out:
            return (
                f"{type(conv).__name__} with {g} groups would keep {[len(k) for k in keep]} "
                "input channels per group; every group must keep as many"
            )
        index = torch.tensor(keep, device=weight.device)  # (g, kept per group)
        blocks = weight.reshape(g, out // g, per, -1)  # (g, out/g, in/g, kernel positions)
        index = index[:, None, :, None].expand(g, out // g, index.shape[1], blocks.shape[-1])
        conv.weight.copy_(blocks.gather(2, index).reshape(conv.weight.shape))
    return None
