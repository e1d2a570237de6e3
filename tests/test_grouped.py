"""Grouped convolutions (ResNeXt, RegNet X and Y), channel shuffle (ShuffleNetV2) and Torch-Pruning's
limits: attach, train a step, prune, slim = masked (invariant 1), onnxruntime = PyTorch (invariant
2), on small nets built here, so CI needs no torchvision."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gating import groups_of, tpgraph
from compressdrop.gating.aligned import align_keep
from compressdrop.pruning import mask_, unmask_

from .test_surgery import TOL, quantiles, random_gates_, rel_error
from .zoo import RegNetYNet, ResNeXtNet, ShuffleNet, input_for, randomize_

BATCHES = (1, 7, 64)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_step(model: nn.Module) -> None:
    x, y = input_for(model, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = F.cross_entropy(model(x), y) + cd.kl(model) / 1000
    opt.zero_grad()
    loss.backward()
    gates = [p for _, g in cd.named_gates(model) for p in g.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gates)
    opt.step()
    model.eval()


def _check_end_to_end(model: nn.Module, tmp_path, q: float = 0.5) -> nn.Module:
    """Train a step, prune at the SNR quantile ``q``, check parity, export, parameter count."""
    _train_step(model)
    random_gates_(model)
    thr = quantiles(model, (q,))[0]
    slim = cd.prune(model, thr)
    rep = slim.prune_report
    assert rep.units_after < rep.units_before
    assert rep.max_rel_error <= TOL
    x = input_for(model, 16)
    with torch.no_grad():
        ref = mask_(model, thr)(x)
        out = slim.eval()(x)
    unmask_(model)
    assert rel_error(out, ref) <= TOL
    assert n_params(slim) < n_params(model)
    report = cd.export_onnx(slim, x[:2], tmp_path / "slim.onnx", check_batch_sizes=BATCHES)
    assert set(report.max_rel_error) == set(BATCHES)
    assert max(report.max_rel_error.values()) <= 1e-4
    return slim


@pytest.mark.parametrize("net", [ResNeXtNet, RegNetYNet], ids=["resnext", "regnety"])
def test_grouped_conv_nets_prune_exactly_in_aligned_blocks(net, tmp_path):
    model = randomize_(net()).eval()
    before = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group gated: no GatingWarning
        cd.attach(model)
    blocks = {g.name: g.blocks for g in groups_of(model)}
    # the channels into each grouped conv (a) and out of it (b) are aligned to its groups
    assert blocks["blocks.0.a.0"] == blocks["blocks.0.b.0"] == 4
    assert blocks["blocks.1.a.0"] == blocks["blocks.1.b.0"] == 3
    assert blocks["blocks.0.c.0"] == 1
    slim = _check_end_to_end(model, tmp_path)
    for name, conv in slim.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.groups == before[name]
    assert slim.blocks[0].b[0].in_channels < 16 or slim.blocks[1].b[0].in_channels < 24


def test_blocks_keep_different_channels_and_each_block_gets_its_own():
    """Each group of the grouped conv keeps the same number of input channels but not the same
    positions: the slim conv's weight must hold each group's own kept channels."""
    torch.manual_seed(0)
    model = randomize_(ResNeXtNet()).eval()
    cd.attach(model)
    random_gates_(model, seed=3)
    gate = dict(cd.named_gates(model))["blocks.0.a.1"]
    thr = float(gate.snr().detach().median())
    mask_(model, thr)
    kept = ~gate.pruned.reshape(4, 4)  # (groups, channels per group)
    assert len(set(kept.sum(1).tolist())) == 1  # as many in every group
    assert len({tuple(row.tolist()) for row in kept}) > 1  # at different positions
    assert (kept | gate.mask(thr).reshape(4, 4)).equal(kept)  # every unit over threshold kept
    out_kept = ~dict(cd.named_gates(model))["blocks.0.b.1"].pruned  # the conv's own outputs
    slim = cd.prune(model, thr)
    conv = slim.blocks[0].b[0]
    dense = model.blocks[0].b[0].weight.detach()  # (16, 4, 3, 3): the gates sit on the BNs
    expected = torch.cat(
        [dense[4 * g : 4 * g + 4][out_kept[4 * g : 4 * g + 4]][:, kept[g]] for g in range(4)]
    )
    assert conv.in_channels == 4 * int(kept[0].sum())
    torch.testing.assert_close(conv.weight.detach(), expected)


def test_align_keep_tops_up_every_block_to_the_fullest():
    keep = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    snr = torch.tensor([5, 4, 3, 0, 0.1, 6, 0.5, 0.2, 0.3, 0.4, 0.9, 0.8])
    out = align_keep(keep, snr, 3).reshape(3, 4)
    assert out.sum(1).tolist() == [3, 3, 3]  # block 0 keeps 3, so every block does
    assert out[0].tolist() == [True, True, True, False]
    assert out[1].tolist() == [False, True, True, True]  # 6 (kept), then 0.5 and 0.2
    assert out[2].tolist() == [False, True, True, True]  # 0.4, 0.9, 0.8
    # nothing over the threshold anywhere: one unit per block, the best of each
    none = align_keep(torch.zeros(12, dtype=torch.bool), snr, 3).reshape(3, 4)
    assert none.sum(1).tolist() == [1, 1, 1] and none[1, 1] and none[2, 2]
    assert align_keep(keep, snr, 1) is keep


def _gating_warnings(model: nn.Module) -> list[str]:
    """Attach gates to ``model`` (8×8 single-channel inputs); the GatingWarnings said."""
    with pytest.warns(cd.GatingWarning) as record:
        cd.attach(model, example_inputs=torch.randn(2, 1, 8, 8))
    return [str(w.message) for w in record]


def test_a_grouped_conv_with_one_output_per_group_is_refused_by_name():
    """groups == out_channels < in_channels: Torch-Pruning takes it for depthwise and would cut
    its inputs with its outputs."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()
    # '0' is coupled to it (inputs with outputs) and stays ungated with it
    assert _gating_warnings(model) == [
        "compressdrop: layer '2' left ungated: grouped convolution with one output channel per "
        "group is not supported",
    ]
    assert [n for n, _ in cd.named_gates(model)] == ["5"]


def test_units_that_a_grouped_conv_takes_one_per_group_are_left_ungated_by_name():
    """A depthwise conv with a channel multiplier (8 → 16, 8 groups): each group must keep its
    one input channel, so a gate on them could never prune; it used to be attached anyway and
    kept every unit without a word."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()
    assert _gating_warnings(model) == [
        "compressdrop: layer '0' left ungated: its units reach '2', a grouped convolution with "
        "one of them per group, and every group must keep its channel",
    ]
    assert [(n, g.num_units) for n, g in cd.named_gates(model)] == [("3", 16)]


def test_grouped_convs_that_together_leave_one_unit_per_block_are_named_together():
    """6 channels into convs of 2 and 3 groups: 6 blocks of one channel between them."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 6, 3, padding=1)
            self.a = nn.Conv2d(6, 4, 3, padding=1, groups=2)
            self.b = nn.Conv2d(6, 6, 3, padding=1, groups=3)
            self.head = nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c(x))
            return self.head(torch.cat([self.a(h), self.b(h)], 1).mean((2, 3)))

    model = Two().eval()
    assert _gating_warnings(model) == [
        "compressdrop: layer 'c' left ungated: its units reach the grouped convolutions 'b', 'a', "
        "whose groups together leave one of them per block, and every group must keep its channel"
    ]
    assert "c" not in [n for n, _ in cd.named_gates(model)]


def test_shufflenet_gates_its_branches_and_leaves_the_shuffle_with_a_warning(tmp_path):
    """A ShuffleNet written by hand (not torchvision's class, whose shuffled channels are gated:
    tests/test_shuffle.py): the channels through the shuffle stay ungated, with a warning."""
    model = randomize_(ShuffleNet()).eval()
    with pytest.warns(cd.GatingWarning, match="splits them into several dimensions") as record:
        cd.attach(model)
    assert len(record) == 1  # the concatenated, shuffled channels: one coupled group
    gated = {g.name: g.producers for g in groups_of(model)}
    # inside each branch: 1×1 → depthwise → 1×1, whose channels never reach the shuffle
    assert set(gated["stage.0.branch2.3"]) == {"stage.0.branch2.0", "stage.0.branch2.3"}
    assert set(gated["stage.1.branch2.3"]) == {"stage.1.branch2.0", "stage.1.branch2.3"}
    assert "stage.1.branch2.5" not in {p for ps in gated.values() for p in ps}
    _check_end_to_end(model, tmp_path)


def test_a_window_partition_is_named_as_one_not_as_a_channel_shuffle():
    """Swin's residual stream, channels-last, is split into windows: the message guessed "(a
    channel shuffle?)" for it, though its units stay whole in the last dimension. Now it names
    the window partition and its shapes (torchvision's Swin and MaxViT say the same)."""

    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.head = nn.Linear(1, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            h = self.embed(x.reshape(n, 8, 8, 1))  # (N, 8, 8, 16), channels last
            w = h.view(n, 4, 2, 4, 2, 16).permute(0, 1, 3, 2, 4, 5)  # (N, 4, 4, 2, 2, 16)
            w = torch.relu(self.mix(w.reshape(n, 16, 4, 16).mean(2)))  # (N, 16, 16)
            return self.head(w.mean(1))

    said = _gating_warnings(Windows().eval())
    assert said == [
        "compressdrop: layer 'embed' left ungated: its units (the last dimension) pass through a "
        "reshape that regroups their positions into windows, (N, 8, 8, 16) to (N, 4, 2, 4, 2, "
        "16) (a window partition, as in Swin or MaxViT), which Torch-Pruning's index mapping "
        "does not follow: it reads dimension 1 as the units"
    ]


class _Pooled(nn.Module):
    """BART's classifier on its end-of-sequence states: ``(N, F)`` viewed as ``(N, 1, F)``, the
    last position taken; ``conv``: the new dimension of size 1 read as a Conv1d's channel."""

    def __init__(self, conv: bool = False):
        super().__init__()
        self.pre, self.embed = nn.Linear(64, 32), nn.Linear(32, 16)
        self.conv = nn.Conv1d(1, 4, 3) if conv else None
        self.head = nn.Linear(56 if conv else 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.relu(self.pre(x.flatten(1))))  # (N, 16)
        if self.conv is not None:
            return self.head(self.conv(h.view(h.shape[0], 1, -1)).flatten(1))  # (N, 4 · 14)
        return self.head(h.view(h.shape[0], -1, h.shape[-1])[:, -1])  # (N, 1, F) → (N, F)


def test_a_view_that_inserts_a_dimension_of_size_one_splits_no_units():
    """BART's pooling, ``(N, F)`` viewed as ``(N, 1, F)``, was refused as a view that splits
    the units "(a channel shuffle?)": the units stay whole in the last dimension, and
    Torch-Pruning maps each index to itself, so ``embed`` is gated, with no warning, and prunes
    exactly. The same view read by a Conv1d as one channel still splits them."""
    model = _Pooled().eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.GatingWarning)
        cd.attach(model, example_inputs=x)
    assert [n for n, _ in cd.named_gates(model)] == ["pre", "embed"]
    random_gates_(model)
    thr = quantiles(model, (0.5,))[0]
    slim = cd.prune(model, thr, example_inputs=x)
    assert slim.embed.out_features == slim.head.in_features < 16
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        ref, out = mask_(model, thr)(x), slim.eval()(x)
    assert rel_error(out, ref) <= TOL
    [said] = _gating_warnings(_Pooled(conv=True).eval())
    assert "'embed' left ungated" in said and "splits them into several dimensions" in said


def test_a_failing_index_mapping_blocks_its_groups_not_the_model(monkeypatch):
    """Torch-Pruning's reshape mapping divided by zero on torchvision's ShuffleNetV2: such a
    failure becomes a warning for the groups through that node, the rest is still gated."""
    from torch_pruning.dependency import index_mapping

    # channels after a reshape inferred as 0 (as on torchvision's model): Torch-Pruning's own
    # mapping then divides by zero
    monkeypatch.setattr(
        index_mapping.shape_infer, "infer_in_channels_recursively", lambda *a, **k: 0
    )
    model = randomize_(ShuffleNet()).eval()
    with pytest.warns(cd.GatingWarning, match="ZeroDivisionError") as record:
        cd.attach(model)
    assert all("left ungated" in str(w.message) for w in record)
    assert "stage.0.branch2.3" in {g.name for g in groups_of(model)}
    slim = cd.prune(random_gates_(model), quantiles(model, (0.5,))[0])
    assert slim.prune_report.max_rel_error <= TOL


def test_groups_over_the_index_budget_are_skipped_with_a_warning(monkeypatch):
    """A group whose indices multiply through flattening (Swin's windows) is skipped once it
    would hold more indices than the budget; the other groups are gated as before."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),  # each of the 6 channels becomes 64 features
        nn.Linear(6 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()
    monkeypatch.setattr(tpgraph, "MAX_GROUP_INDICES", 200)
    with pytest.warns(cd.GatingWarning, match="grows past 200 channel indices") as record:
        cd.attach(model, example_inputs=torch.randn(2, 1, 8, 8))
    assert [str(w.message).split("'")[1] for w in record] == ["2"]
    assert [n for n, _ in cd.named_gates(model)] == ["0", "5"]


def test_the_total_index_budget_ends_the_enumeration_with_a_warning(monkeypatch):
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
    )
    model.append(nn.Linear(8, 2))
    x = (torch.randn(2, 4),)
    dg, _ = tpgraph.build_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    roots, sizes = zip(
        *[
            (names[g[0].dep.target.module], sum(len(idxs) for _, idxs in g))
            for g in tpgraph.bounded_groups(dg, (nn.Linear,), names, [])
        ]
    )
    assert roots == ("6", "4", "2", "0")  # the graph's order: the output layer first
    monkeypatch.setattr(tpgraph, "MAX_TOTAL_INDICES", sizes[0] + sizes[1])  # room for two
    with pytest.warns(cd.GatingWarning, match="'2' and the layers after it left ungated"):
        cd.attach(model, example_inputs=x)
    assert [n for n, _ in cd.named_gates(model)] == ["4"]


def test_skipped_groups_count_against_a_time_budget_not_the_memory_one(monkeypatch):
    """A skipped group's indices are freed at once: they do not use up the memory budget of the
    groups kept (a 0.5 B decoder lost five MLPs that way), only a larger budget on time."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),  # each of the 6 channels becomes 64 features: its group is skipped
        nn.Linear(6 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    monkeypatch.setattr(tpgraph, "MAX_GROUP_INDICES", 200)
    # the groups kept hold 3 + 64 + 24 indices; the skipped one took 12 to enumerate: room for
    # the kept ones (91), not for those plus the skipped one's (103)
    monkeypatch.setattr(tpgraph, "MAX_TOTAL_INDICES", 95)
    with pytest.warns(cd.GatingWarning, match="'2' left ungated: its Torch-Pruning group grows"):
        cd.attach(model, example_inputs=x)
    assert [n for n, _ in cd.named_gates(model)] == ["0", "5"]
    cd.detach(model)
    monkeypatch.setattr(tpgraph, "MAX_SKIPPED_INDICES", 12)  # the skipped group uses it up
    with pytest.warns(cd.GatingWarning) as record:
        cd.attach(model, example_inputs=x)
    assert any("bounded to limit time" in str(w.message) for w in record)
    assert [n for n, _ in cd.named_gates(model)] == ["5"]


def test_groups_over_the_step_budget_are_skipped_and_count_against_the_time_one(monkeypatch):
    """A group whose indices stay few but whose walk through the graph never closes (GPT-OSS's
    residual stream through its router and fused experts: a million steps, 73 s for two layers
    of a tiny model) is skipped once it takes more steps than its budget; the steps of skipped
    groups count against a budget on time as their indices do."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(h + h.tanh() + h.sigmoid() + 2 * h)  # b's group walks every branch

    model, x = Branchy().eval(), torch.randn(2, 4)
    monkeypatch.setattr(tpgraph, "MAX_GROUP_STEPS", 5)
    with pytest.warns(cd.GatingWarning, match="'b' left ungated: its Torch-Pruning group takes "
                      "more than 5 steps through the graph") as record:  # fmt: skip
        cd.attach(model, example_inputs=x)
    assert len(record) == 1 and [n for n, _ in cd.named_gates(model)] == ["a"]
    cd.detach(model)
    monkeypatch.setattr(tpgraph, "MAX_SKIPPED_STEPS", 6)  # b's skipped group uses it up
    with (
        pytest.warns(cd.GatingWarning) as record,
        pytest.raises(InputError, match="no gateable layer"),
    ):
        cd.attach(model, example_inputs=x)
    said = [str(w.message) for w in record]
    assert any("'a' and the layers after it left ungated" in m for m in said), said
    assert any("or 6 steps to enumerate (bounded to limit time)" in m for m in said), said


def test_a_torch_pruning_error_while_tracing_is_a_warning_then_a_clear_error(monkeypatch):
    """Nothing can be gated without Torch-Pruning's graph: the warning names Torch-Pruning's
    error, attach raises InputError (not the bare error)."""
    from torch_pruning.dependency.graph import DependencyGraph

    # a call inside Torch-Pruning's build_dependency that fails there (a wrong signature)
    monkeypatch.setattr(DependencyGraph, "_build_dependency", DependencyGraph.get_pruning_group)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with (
        pytest.warns(cd.GatingWarning, match="Torch-Pruning could not trace the model .TypeError"),
        pytest.raises(InputError, match="no gateable layer"),
    ):
        cd.attach(model, example_inputs=torch.randn(2, 4))
    assert not cd.is_gated(model)


def test_an_error_in_the_model_itself_is_not_hidden():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            raise ValueError("the model's own error")

    with pytest.raises(ValueError, match="the model's own error"):
        cd.attach(Broken(), example_inputs=torch.randn(2, 4))
