"""torchvision's ShuffleNetV2: the channels each block makes are gated and removed exactly, through
the channel split and shuffle (compressdrop/gating/shuffle.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import compressdrop as cd
from compressdrop.gating.shuffle import prepare_shufflenets, remove_units_
from compressdrop.pruning import replay

from tests.test_surgery import quantiles, random_gates_
from tests.torchvision_models import import_torchvision, loads_in_a_new_process

import_torchvision()

from torchvision.models import shufflenet_v2_x0_5  # noqa: E402
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2  # noqa: E402

SIDE = 32


def _small(num_classes: int = 10) -> torch.nn.Module:
    """ShuffleNetV2 x0.5's widths with 2, 3 and 2 blocks a stage (its own: 4, 8, 4): each stage
    still a stride-2 block, then channel-split blocks in a row, for the tests that attach,
    export or trace the whole net (their cost grows with the blocks)."""
    return ShuffleNetV2([2, 3, 2], [24, 48, 96, 192, 1024], num_classes)


def _net(seed: int = 0, build=shufflenet_v2_x0_5) -> torch.nn.Module:
    """A ShuffleNetV2 (x0.5 unless told) whose BatchNorms have statistics of their own (three
    train passes)."""
    torch.manual_seed(seed)
    model = build(num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIDE, SIDE))
        for m in model.modules():  # BN β away from 0: a removed channel's constant matters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 0.5)
    return model.eval()


def _stream_widths(model) -> list[int]:
    """The channels each block passes on, per block, and conv5's inputs."""
    x, out = torch.randn(1, 3, SIDE, SIDE), []
    hooks = [
        b.register_forward_hook(lambda m, i, o: out.append(o.shape[1]))
        for s in (model.stage2, model.stage3, model.stage4)
        for b in s
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out + [model.conv5[0].in_channels]


def test_prepared_blocks_compute_the_same_function_to_the_bit():
    model = _net()
    stock = copy.deepcopy(model)
    assert prepare_shufflenets(model) == []
    assert type(model.stage2[1]).__name__ == "PrunableInvertedResidual"
    assert isinstance(model.stage2[1], InvertedResidual)
    x = torch.randn(5, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(model(x), stock(x))
        for block, plain in zip(model.stage3, stock.stage3):  # stride 2, then stride 1
            h = torch.randn(3, block.branch2[0].in_channels * (2 if block.stride == 1 else 1), 4, 4)
            assert torch.equal(block(h), plain(h))


def test_every_block_gets_a_gate_on_the_channels_it_makes_and_nothing_is_left_ungated():
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.GatingWarning)
        cd.attach(model, example_inputs=torch.randn(2, 3, SIDE, SIDE))
    producers = {p for g in cd.gating.groups_of(model) for p in g.producers}
    for stage in ("stage2", "stage3", "stage4"):
        for i, block in enumerate(getattr(model, stage)):
            assert f"{stage}.{i}.branch2.5" in producers
            assert (f"{stage}.{i}.branch1.2" in producers) == (block.stride == 2)


@torch.no_grad()
def _masked_and_slim(remove: dict[str, list[int]]):
    """The net with the channels ``remove`` (branch norm → channels) zeroed after that norm, and
    a copy with them removed by :func:`remove_units_`."""
    model = _net()
    prepare_shufflenets(model)
    slim = copy.deepcopy(model)
    hooks = []
    for norm, units in remove.items():

        def zero(m, i, o, units=units):
            o = o.clone()
            o[:, units] = 0
            return o

        hooks.append(model.get_submodule(norm).register_forward_hook(zero))
        remove_units_(slim, norm, units)
    return model, slim


@pytest.mark.parametrize(
    "remove",
    [
        {"stage2.3.branch2.6": [0, 5, 11]},  # stage2's last block: read by stage3's first block
        {"stage2.0.branch1.3": [1, 2], "stage2.0.branch2.6": [3]},  # passed along stage2
        {"stage4.1.branch2.6": [0, 7, 8, 40]},  # read by later blocks and conv5
        {f"stage3.{i}.branch2.6": [i, 20 + i] for i in range(8)},  # every block of a stage
        # every channel stage2.1 passes on: its passing half is empty (a Gather of no index)
        {"stage2.0.branch1.3": list(range(12)), "stage2.0.branch2.6": list(range(12))},
    ],
)
def test_removing_made_channels_equals_zeroing_them(remove):
    model, slim = _masked_and_slim(remove)
    x = torch.randn(4, 3, SIDE, SIDE)
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    removed = sum(len(u) for u in remove.values())
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert sum(_stream_widths(slim)) < sum(_stream_widths(model)) or removed == 0


def test_the_constant_of_a_removed_channel_moves_into_the_next_running_mean():
    """A channel read by the next stage's first block: its depthwise conv makes 0 of it, the
    BatchNorm after that β − γμ/σ, which the 1×1 conv after it spreads over every position."""
    model, slim = _masked_and_slim({"stage2.3.branch2.6": [0, 1, 2, 3]})
    before = model.stage3[0].branch1[3].running_mean
    after = slim.stage3[0].branch1[3].running_mean
    assert not torch.allclose(before, after)
    assert slim.stage3[0].branch1[0].groups == slim.stage3[0].branch1[0].out_channels


def test_prune_replay_export_and_pickle(tmp_path):
    model = _net(build=_small)
    x = torch.randn(2, 3, SIDE, SIDE)
    cd.attach(model, example_inputs=x)
    slim = cd.prune(random_gates_(model, seed=1), quantiles(model, (0.5,))[0], example_inputs=x)
    assert slim.prune_report.max_rel_error <= 1e-5
    dense_widths, widths = _stream_widths(_net(build=_small)), _stream_widths(slim)
    assert all(w < d for w, d in zip(widths, dense_widths)), (widths, dense_widths)
    assert any(step[1] == "stream" for step in slim.prune_report.history)
    # rebuilt from the history on a fresh net, then its state_dict: the same outputs
    rebuilt = replay(_small(), slim.prune_report.history, x)
    rebuilt.load_state_dict(slim.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), slim(x))
    # ONNX at batches 1, 7, 64 (export_onnx raises above 1e-4) and torch.export
    report = cd.export_onnx(slim, x, tmp_path / "slim.onnx")
    assert max(report.max_rel_error.values()) <= 1e-4
    program = torch.export.export(slim, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), slim(x), rtol=0, atol=1e-6)
    # a pickled slim net loads where compressdrop's prunable class was never made
    loads_in_a_new_process(slim, x, "PrunableInvertedResidual", tmp_path)


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda m: m.stage3[2].branch2.__setitem__(2, torch.nn.GELU()), "branch2 is not"),
        (lambda m: m.stage3.__setitem__(2, torch.nn.Identity()), "the block is not an Inverted"),
    ],
)
def test_a_block_of_another_layout_keeps_the_shuffle_with_a_warning(change, why):
    model = _net(build=_small)
    change(model)  # not torchvision's layout any more
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cd.attach(model, example_inputs=torch.randn(2, 3, SIDE, SIDE))
    messages = [str(w.message) for w in record if issubclass(w.category, cd.GatingWarning)]
    prefix = "keeps its shuffle (its blocks' channels stay ungated): in block 'stage3.2', "
    assert prefix + why in messages[0]
    assert type(model.stage2[0]).__name__ == "InvertedResidual"
    assert cd.named_gates(model)  # the rest of the net is gated as before
