"""ShuffleNetV2's shuffled stream channels as units (torchvision's ``InvertedResidual``).

A ShuffleNetV2 block splits its input channels in two halves (stride 1: the first half passes
through, the second feeds the branch; stride 2: both branches read all of them), concatenates
and *shuffles* the result: output channel ``2i`` is the concatenation's channel ``i``, ``2i + 1``
its channel ``n/2 + i``. The interleave depends on the channel count, so removing one channel
would move every other channel's route, and Torch-Pruning's index mapping cannot follow it.

Here each block becomes a subclass (:func:`prepare_shufflenets`) whose forward does the same with
explicit index buffers: ``pass_idx`` and ``branch_idx`` (the input channels that pass and that
feed ``branch2``) and ``order`` (the shuffle as a permutation of the concatenation), so the
outputs are the same to the bit. The units are the channels each block *makes*: the outputs of its
branches' last conv → BatchNorm → ReLU. A gate sits on that BatchNorm; a pruned unit is then an
exact zero wherever it goes: through later blocks' passing halves (index bookkeeping only) to the
layer that reads it: a later block's ``branch2`` 1×1 conv (its input column is removed), the next
stage's first block (``branch2``'s column; ``branch1``'s depthwise channel, whose BatchNorm turns
the zero into a constant that the following 1×1 conv carries into the next BatchNorm's running
mean, and the 1×1 conv's column) or ``conv5`` (its column). :func:`remove_units_` does that
surgery; the slim blocks stay this subclass, and their torch.export program and ONNX graph (one
Gather per index buffer) need no compressdrop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .registry import spec_of
from .units import Site, UnitGroup

__all__: list[str] = []  # internal to compressdrop.gating

_CLASSES: dict[type, type] = {}
# a block (torchvision InvertedResidual) or conv5: attributes read by name, untyped in torch
Block = Any
_PRODUCED = {"branch1": (2, 3), "branch2": (5, 6)}  # branch → (its last conv, its BatchNorm)


class _Shuffled:
    """The forward of a prunable ``InvertedResidual`` (mixed into a subclass of it)."""

    stride: int
    branch1: nn.Module
    branch2: nn.Module
    pass_idx: torch.Tensor
    branch_idx: torch.Tensor
    order: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: both halves (or branches) concatenated, in ``order``."""
        if self.stride == 1:
            made = self.branch2(x.index_select(1, self.branch_idx))
            out = torch.cat((x.index_select(1, self.pass_idx), made), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return out.index_select(1, self.order)


def _subclass(base: type) -> type:
    if base not in _CLASSES:
        name = f"Prunable{base.__name__}"
        _CLASSES[base] = type(
            name, (_Shuffled, base), {"__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[base]


def __getattr__(name: str) -> type:
    """The prunable block class by name, so that a pickled slim model loads in a new process."""
    if name == "PrunableInvertedResidual":
        from torchvision.models.shufflenetv2 import InvertedResidual

        return _subclass(InvertedResidual)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_prepared(block: nn.Module) -> bool:
    return isinstance(block, _Shuffled)


def _layers(seq: nn.Module, kinds: Sequence[type]) -> bool:
    return (
        isinstance(seq, nn.Sequential)
        and len(seq) == len(kinds)
        and all(isinstance(m, k) for m, k in zip(seq, kinds))
    )


_C, _B, _R = nn.Conv2d, nn.BatchNorm2d, nn.ReLU


def _why_not(block: Block, first: bool) -> str | None:
    """Why ``block`` (the ``first`` of its stage or not) does not have torchvision's layout."""
    if not hasattr(block, "branch2") or getattr(block, "stride", 0) != (2 if first else 1):
        return "the block is not an InvertedResidual of stride 2 first in its stage, 1 after"
    if not _layers(block.branch2, (_C, _B, _R, _C, _B, _C, _B, _R)):
        return "branch2 is not 1×1 conv, BN, ReLU, depthwise conv, BN, 1×1 conv, BN, ReLU"
    if block.stride > 1 and not _layers(block.branch1, (_C, _B, _C, _B, _R)):
        return "branch1 is not depthwise conv, BN, 1×1 conv, BN, ReLU"
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    pointwise = [block.branch2[0], block.branch2[5]] + (
        [block.branch1[2]] if block.stride > 1 else []
    )
    if any(c.kernel_size != (1, 1) or c.padding != (0, 0) or c.groups != 1 for c in pointwise):
        return "a conv that should be 1×1 (unpadded, ungrouped) is not"
    if any(c.padding_mode != "zeros" for c in convs):
        return "a conv pads with other than zeros"
    if any(not n.affine or n.running_mean is None for n in norms):
        return "a BatchNorm without affine parameters or running statistics"
    return None


def _networks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, net)`` for each torchvision ``ShuffleNetV2`` in ``model`` (its own class only: a
    subclass may read its stages in another order)."""
    if "torchvision" not in {type(m).__module__.split(".")[0] for m in model.modules()}:
        return
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    for name, m in model.named_modules():
        if type(m) is ShuffleNetV2:
            yield name, m


def _stages(net: Block) -> list[list[Block]]:
    return [list(getattr(net, f"stage{i}")) for i in (2, 3, 4)]


def prepare_shufflenets(model: nn.Module) -> list[str]:
    """Make the blocks of every torchvision ShuffleNetV2 in ``model`` prunable, in place (the same
    outputs); returns why a network was left as it was, per network that was."""
    problems = []
    for name, net in _networks(model):
        blocks = [(b, i == 0) for stage in _stages(net) for i, b in enumerate(stage)]
        names = {b: n for n, b in net.named_modules()}
        why = next(
            (f"in block {names[b]!r}, {w}" for b, f in blocks if (w := _why_not(b, f))), None
        )
        conv5 = getattr(net, "conv5", None)
        if why is None and not (
            isinstance(conv5, nn.Sequential) and isinstance(conv5[0], nn.Conv2d)
        ):
            why = "its conv5 is not a Sequential that starts with a Conv2d"
        if why is not None:
            problems.append(
                f"ShuffleNetV2 {name or 'model'!r} keeps its shuffle (its blocks' channels stay "
                f"ungated): {why}"
            )
            continue
        for b, _ in blocks:
            if _is_prepared(b):
                continue
            dev = next(b.parameters()).device
            half = b.branch2[5].out_channels
            n = 2 * half  # the concatenation's channels
            b.__class__ = _subclass(type(b))
            b.register_buffer("pass_idx", torch.arange(half, device=dev))
            b.register_buffer("branch_idx", torch.arange(half, n, device=dev))
            b.register_buffer("order", torch.arange(n, device=dev).view(2, half).t().reshape(-1))
    return problems


# -- where a block's output channels go --------------------------------------------------------
def _chains(net: Block) -> list[list[Block]]:
    """Per stage: its blocks, then the layer that reads its output whole (the next stage's
    first block, or ``conv5``'s conv)."""
    stages = _stages(net)
    readers = [stages[1][0], stages[2][0], net.get_submodule("conv5")[0]]
    return [s + [r] for s, r in zip(stages, readers)]


def _route(chain: list[Block], k: int, p: int) -> list[tuple[int, int]]:
    """``(j, input channel)`` for each layer of ``chain`` after ``k`` that output channel ``p`` of
    ``chain[k]`` enters, up to the one that reads it (the last)."""
    visits = []
    for j in range(k + 1, len(chain)):
        visits.append((j, p))
        block = chain[j]
        if not (_is_prepared(block) and block.stride == 1):
            break
        hit = (block.pass_idx == p).nonzero().flatten()
        if hit.numel() == 0:
            break  # it feeds branch2
        p = int((block.order == int(hit[0])).nonzero()[0, 0])
    return visits


def _offset(block: Block, branch: str) -> int:
    """Where ``branch``'s outputs start in ``block``'s concatenation."""
    if branch == "branch1":
        return 0
    return int(block.pass_idx.numel()) if block.stride == 1 else block.branch1[2].out_channels


def _out_position(block: Block, cat_pos: int) -> int:
    return int((block.order == cat_pos).nonzero()[0, 0])


def _find(root: nn.Module, norm: str) -> tuple[list[Block], int, str]:
    """``(chain, k, branch)`` of the BatchNorm named ``norm``: block ``chain[k]``'s ``branch``."""
    target = root.get_submodule(norm)
    for _, net in _networks(root):
        for chain in _chains(net):
            for k, block in enumerate(chain[:-1]):
                for branch, (_, bn) in _PRODUCED.items():
                    seq = getattr(block, branch, ())
                    if len(seq) > bn and seq[bn] is target:
                        return chain, k, branch
    raise InputError(f"{norm!r} is not the BatchNorm of a ShuffleNetV2 block's branch")


# -- groups -----------------------------------------------------------------------------------------
def _costs(m: nn.Module, out: bool, positions: dict) -> tuple[float, float]:
    spec = spec_of(m)
    assert spec is not None
    params, macs = spec.unit_costs(m, out)
    return params, macs * positions.get(m, 1)


def _reader_costs(reader: Block, p: int, positions: dict) -> tuple[float, float]:
    """Parameters and multiply-adds that input channel ``p`` of ``reader`` takes with it."""
    if isinstance(reader, nn.Conv2d):  # conv5
        return _costs(reader, False, positions)
    if reader.stride == 1:
        return _costs(reader.branch2[0], False, positions)
    layers = [(reader.branch1[0], True), (reader.branch1[1], True), (reader.branch1[2], False)]
    cost = [_costs(m, out, positions) for m, out in layers + [(reader.branch2[0], False)]]
    return sum(c[0] for c in cost), sum(c[1] for c in cost)


def stream_groups(model: nn.Module, names: dict, positions: dict) -> list[UnitGroup]:
    """One group per branch of each prepared ShuffleNetV2 block: the channels it makes, gated on
    its last BatchNorm, with the parameters and multiply-adds of each one's route."""
    groups = []
    for _, net in _networks(model):
        for chain in _chains(net):
            for k, block in enumerate(chain[:-1]):
                if not _is_prepared(block):
                    continue
                for branch, (conv_at, bn_at) in _PRODUCED.items():
                    if block.stride == 1 and branch == "branch1":
                        continue
                    seq = getattr(block, branch)
                    conv, bn = seq[conv_at], seq[bn_at]
                    params, macs = [], []
                    base = _costs(conv, True, positions)
                    for u in range(conv.out_channels):
                        p = _out_position(block, _offset(block, branch) + u)
                        j, q = _route(chain, k, p)[-1]
                        extra = _reader_costs(chain[j], q, positions)
                        params.append(base[0] + 2 + extra[0])
                        macs.append(base[1] + extra[1])
                    groups.append(
                        UnitGroup(
                            names[conv],
                            conv.out_channels,
                            "channel",
                            [names[conv]],
                            [Site(names[bn], 1)],
                            torch.tensor(params),
                            torch.tensor(macs),
                        )
                    )
    return groups


def stream_norms(model: nn.Module) -> set[str]:
    """Names of the BatchNorms that host the gates of :func:`stream_groups`."""
    names = {m: n for n, m in model.named_modules()}
    out: set[str] = set()
    for _, net in _networks(model):
        for chain in _chains(net):
            for block in chain[:-1]:
                if _is_prepared(block):
                    out.update(
                        names[getattr(block, b)[bn]]
                        for b, (_, bn) in _PRODUCED.items()
                        if block.stride > 1 or b == "branch2"
                    )
    return out


# -- surgery ---------------------------------------------------------------------------------------
def _renumber(values: Sequence[int], gone: set[int]) -> list[int]:
    """``values`` not in ``gone``, each lowered by the number of ``gone`` below it."""
    dead = sorted(gone)
    return [v - sum(1 for d in dead if d < v) for v in values if v not in gone]


def _set(block: Block, buffer: str, values: list[int]) -> None:
    old = getattr(block, buffer)
    setattr(block, buffer, torch.tensor(values, dtype=old.dtype, device=old.device))


def _drop_concatenated(block: Block, gone: set[int]) -> None:
    """Remove channels ``gone`` of ``block``'s concatenation from its ``order``."""
    _set(block, "order", _renumber(block.order.tolist(), gone))


@torch.no_grad()
def _drop_inputs(reader: Block, gone: set[int]) -> None:
    """Remove input channels ``gone`` (zero in the masked model) of ``reader``."""
    import torch_pruning as tp

    idx = sorted(gone)
    if isinstance(reader, nn.Conv2d):  # conv5
        tp.prune_conv_in_channels(reader, idx)
        return
    if reader.stride == 1:
        passing, feeding = reader.pass_idx.tolist(), reader.branch_idx.tolist()
        columns = [i for i, v in enumerate(feeding) if v in gone]
        if columns:
            tp.prune_conv_in_channels(reader.branch2[0], columns)
        _drop_concatenated(reader, {i for i, v in enumerate(passing) if v in gone})
        _set(reader, "pass_idx", _renumber(passing, gone))
        _set(reader, "branch_idx", _renumber(feeding, gone))
        return
    # a stage's first block: its depthwise conv makes a zero (or its bias) of the channel, and
    # the BatchNorm after it a constant, which the 1×1 conv adds to every position
    dw, bn, pw, after = (reader.branch1[i] for i in range(4))
    z = dw.bias[idx] if dw.bias is not None else torch.zeros(len(idx), device=bn.weight.device)
    const = (z - bn.running_mean[idx]) / torch.sqrt(bn.running_var[idx] + bn.eps)
    const = const * bn.weight[idx] + bn.bias[idx]
    shift = pw.weight[:, idx, 0, 0] @ const
    if pw.bias is not None:
        pw.bias += shift
    else:  # BN(y + s) = BN(y) with running mean μ − s (and in training: BN ignores shifts)
        after.running_mean -= shift
    tp.prune_depthwise_conv_out_channels(dw, idx)
    tp.prune_batchnorm_out_channels(bn, idx)
    tp.prune_conv_in_channels(pw, idx)
    tp.prune_conv_in_channels(reader.branch2[0], idx)


@torch.no_grad()
def remove_units_(root: nn.Module, norm: str, units: Sequence[int]) -> None:
    """Remove the channels ``units`` that the branch ending in BatchNorm ``norm`` makes, from
    where they are made to where they are read, in place (preparing ``root``'s ShuffleNetV2
    blocks first if they are not).

    Raises:
        InputError: ``norm`` is not the last BatchNorm of a ShuffleNetV2 block's branch.
    """
    import torch_pruning as tp

    prepare_shufflenets(root)
    chain, k, branch = _find(root, norm)
    block = chain[k]
    made = sorted({int(u) for u in units})
    concatenated = {_offset(block, branch) + u for u in made}
    gone: dict[int, set[int]] = {}  # chain position → its input channels that go
    for c in concatenated:
        for j, q in _route(chain, k, _out_position(block, c)):
            gone.setdefault(j, set()).add(q)
    conv_at, bn_at = _PRODUCED[branch]
    seq = getattr(block, branch)
    tp.prune_conv_out_channels(seq[conv_at], made)
    tp.prune_batchnorm_out_channels(seq[bn_at], made)
    _drop_concatenated(block, concatenated)
    for j, inputs in gone.items():
        _drop_inputs(chain[j], inputs)
