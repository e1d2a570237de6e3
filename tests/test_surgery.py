"""Invariant 1, exact surgery: the slim model equals the gated model's eval output with pruned units
zeroed, to float32 rounding, on every architecture of the zoo and on random architectures."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import compressdrop as cd
from compressdrop.gates import GATES
from compressdrop.pruning import PruningWarning, mask_, replay, unmask_

from .zoo import ZOO, attach_zoo, input_for, randomize_

TOL = 1e-5


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def random_gates_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread every gate's SNR over several orders of magnitude (units differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in cd.named_gates(model):
            for p in gate.parameters():
                u = torch.rand(p.shape, generator=g)
                name = next(n for n, q in gate.named_parameters() if q is p)
                lo, hi = {
                    "mu": (-4.0, 0.5),
                    "log_sigma": (-3.0, 1.0),
                    "log_sigma2": (-6.0, 2.0),
                    "keep_logit": (-4.0, 4.0),
                    "log_alpha": (-5.0, 5.0),
                }[name]
                p.copy_(lo + (hi - lo) * u)
    return model


def gated(name: str, family: str = "lognormal", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = attach_zoo(randomize_(ZOO[name](), seed), name, gate=family)
    return random_gates_(model, seed).eval()


def quantiles(model: nn.Module, qs=(0.2, 0.5, 0.8)) -> list[float]:
    snr = torch.cat([g.snr().detach() for _, g in cd.named_gates(model)])
    return [float(snr.quantile(q)) for q in qs]


@pytest.mark.filterwarnings("ignore::compressdrop.pruning.PruningWarning")
@pytest.mark.parametrize("name", list(ZOO))
def test_slim_equals_masked_model_on_the_zoo(name):
    model = gated(name)
    x = input_for(model, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for thr in quantiles(model):
        slim = cd.prune(model, thr)
        assert not cd.is_gated(slim)
        assert slim.prune_report.units_after < slim.prune_report.units_before
        with torch.no_grad():
            ref = mask_(model, thr)(x)
            out = slim.eval()(x)
        unmask_(model)
        assert rel_error(out, ref) <= TOL, (name, thr)
        assert sum(p.numel() for p in slim.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
    # the input model is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", list(GATES))
def test_every_family_folds_its_expectation_exactly(family):
    model = gated("vgg", family)
    x = input_for(model, 8)
    thr = quantiles(model, (0.4,))[0]
    slim = cd.prune(model, thr)
    with torch.no_grad():
        assert rel_error(slim(x), mask_(model, thr)(x)) <= TOL


def test_resnet_residual_stream_is_pruned():
    model = gated("resnet")
    names = [n for n, g in cd.named_gates(model) if g.shared]
    assert "stem.1" in names  # the stream feeding the first blocks has one shared gate
    thr = quantiles(model, (0.6,))[0]
    slim = cd.prune(model, thr)
    stem_out = slim.stem[0].out_channels
    assert stem_out < 8
    assert slim.layers[0].conv2.out_channels == stem_out  # the block writes into the same stream
    assert slim.layers[1].conv1.in_channels == stem_out


def test_depthwise_groups_stay_aligned():
    model = gated("depthwise")
    slim = cd.prune(model, quantiles(model, (0.5,))[0])
    for m in slim.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def test_threshold_that_prunes_nothing_keeps_every_unit():
    model = gated("lenet5")
    slim = cd.prune(model, 0.0)
    rep = slim.prune_report
    assert rep.units_after == rep.units_before
    x = input_for(model, 4)
    with torch.no_grad():
        assert rel_error(slim(x), model(x)) <= TOL


def test_threshold_that_prunes_a_whole_layer_keeps_one_unit_and_says_so():
    model = gated("lenet300")
    with pytest.warns(PruningWarning, match="keeping its highest-SNR unit"):
        slim = cd.prune(model, 1e9)
    assert [layer.after for layer in slim.prune_report.layers] == [1, 1]
    x = input_for(model, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        with torch.no_grad():
            assert rel_error(slim(x), mask_(model, 1e9)(x)) <= TOL


class _Stateful(nn.Module):
    """Keeps a state of its last forward pass on itself, as RecurrentGemma's recurrent layers
    do (``rg_lru.recurrent_states``): after a pass with gradients, a tensor with history."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.state: torch.Tensor | None = None

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.state = h.mean(0)
        return self.fc2(h)


def test_a_model_holding_a_state_with_autograd_history_prunes():
    """prune deep-copies the gated model, and ``copy.deepcopy`` refused the state that attach's
    trace (or a training step) left on it ("Only Tensors created explicitly by the user (graph
    leaves) support the deepcopy protocol"): the state is now copied detached, the model's own
    left as it was."""
    model = randomize_(_Stateful())
    x = torch.randn(3, 4)
    cd.attach(model, example_inputs=x)
    ((_, g),) = cd.named_gates(model)
    with torch.no_grad():
        g.log_sigma[:4] = 3.0  # half the units noisy: pruned at SNR 1
    ref = mask_(model, 1.0).eval()(x)  # (with gradients, as a training step's)
    state = model.state
    assert state is not None and state.grad_fn is not None
    slim = cd.prune(model, 1.0)
    assert slim.fc1.out_features == 4 and model.state is state
    torch.testing.assert_close(slim(x), ref, rtol=1e-5, atol=1e-6)


def test_model_without_gates_is_a_clear_error():
    with pytest.raises(ValueError, match="no gates"):
        cd.prune(ZOO["lenet300"]())
    with pytest.raises(ValueError, match="no gates"):
        cd.mask_(ZOO["lenet300"]())


def test_replay_rebuilds_the_slim_structure_from_its_history():
    model = gated("resnet")
    slim = cd.prune(model, quantiles(model, (0.5,))[0])
    fresh = replay(ZOO["resnet"](), slim.prune_report.history)
    fresh.load_state_dict(slim.state_dict())  # strict: same structure
    x = input_for(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), slim(x))


# --- property test over random architectures ------------------------------------------------------


class RandomNet(nn.Module):
    def __init__(self, widths, use_bn, residual, concat, dense):
        super().__init__()
        self.arch = {"input_shape": [2, 8, 8]}
        c, layers = 2, []
        for w in widths:
            layers.append(
                nn.ModuleDict(
                    {
                        "conv": nn.Conv2d(c, w, 3, padding=1),
                        "bn": nn.BatchNorm2d(w) if use_bn else nn.Identity(),
                    }
                )
            )
            c = w
        self.layers = nn.ModuleList(layers)
        self.residual, self.concat = residual, concat
        self.res = nn.Conv2d(c, c, 3, padding=1) if residual else None
        self.side = nn.Conv2d(2, 3, 1) if concat else None
        c_out = c + (3 if concat else 0)
        self.fc = nn.Linear(c_out * 16, dense) if dense else None
        self.head = nn.Linear(dense if dense else c_out * 16, 5)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        inp = x
        for layer in self.layers:
            x = torch.relu(layer["bn"](layer["conv"](x)))
        if self.res is not None:
            x = torch.relu(self.res(x) + x)
        if self.side is not None:
            x = torch.cat([x, torch.relu(self.side(inp))], 1)
        x = torch.flatten(self.pool(x), 1)
        if self.fc is not None:
            x = torch.relu(self.fc(x))
        return self.head(x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(2, 7), min_size=1, max_size=3),
    use_bn=st.booleans(),
    residual=st.booleans(),
    concat=st.booleans(),
    dense=st.sampled_from([0, 9]),
    family=st.sampled_from(list(GATES)),
    q=st.floats(0.05, 0.95),
    seed=st.integers(0, 10_000),
)
def test_property_random_architectures_prune_exactly(
    widths, use_bn, residual, concat, dense, family, q, seed
):
    torch.manual_seed(seed)
    model = randomize_(RandomNet(widths, use_bn, residual, concat, dense), seed)
    with warnings.catch_warnings():
        # a concat of an un-normalized conv can defeat Torch-Pruning's index mapping: attach
        # leaves such groups ungated with a warning (checked in test_gating)
        warnings.simplefilter("ignore", cd.GatingWarning)
        try:
            cd.attach(model, gate=family)
        except ValueError as e:
            assume("no gateable layer" not in str(e))
            raise
    random_gates_(model, seed).eval()
    thr = quantiles(model, (q,))[0]
    x = torch.randn(6, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        slim = cd.prune(model, thr)
        with torch.no_grad():
            ref = mask_(model, thr)(x)
    with torch.no_grad():
        assert rel_error(slim(x), ref) <= TOL


class _DenseBlock(nn.Module):
    """DenseNet's pattern: new channels concatenated, then BatchNorm → ReLU → ``reader``."""

    def __init__(self, reader: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grow = nn.Conv2d(8, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(14)
        self.reader = reader
        self.head = nn.Linear(reader.out_channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = self.reader(torch.relu(self.norm(torch.cat([s, self.grow(s)], 1))))
        return self.head(y.mean((2, 3)))


def _dense_block(reader: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = _DenseBlock(reader)
    with torch.no_grad():  # statistics that make BN(0) = β − γμ/σ clearly non-zero
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
        net.norm.bias.uniform_(-1, 1)
    return net.eval()


def test_a_constant_after_batchnorm_folds_into_a_1x1_readers_bias():
    """A pruned channel of ``grow`` is zero before the norm and β − γμ/σ after it: the 1×1 conv
    that reads it gets that constant in its (new) bias, so the slim model matches the masked one,
    and the pruning history rebuilds the bias."""
    net = _dense_block(nn.Conv2d(14, 5, 1, bias=False))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.GatingWarning)  # every group is gated, none refused
        cd.attach(net, "lognormal", example_inputs=x)
    gates = dict(cd.named_gates(net))
    assert any(g.num_units == 6 for g in gates.values())  # the concatenated channels of grow
    torch.manual_seed(1)
    with torch.no_grad():  # SNRs spread, so that the median prunes about half of every layer
        for g in gates.values():
            g.log_sigma.uniform_(-3, 1)
    thr = float(torch.cat([g.snr().detach() for g in gates.values()]).median())
    slim = cd.prune(net, thr, example_inputs=x)
    mask_(net, thr)
    with torch.no_grad():
        want, got = net(x), slim(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert slim.reader.bias is not None  # where the constants went
    history = slim.prune_report.to_dict()["history"]
    assert ["reader", "bias", []] in history
    fresh = _dense_block(nn.Conv2d(14, 5, 1, bias=False))
    replay(fresh, history, example_inputs=x)
    fresh.load_state_dict(slim.state_dict())
    torch.testing.assert_close(fresh(x), got)


def test_a_constant_into_a_padded_conv_is_refused_with_the_reason():
    """A 3×3 conv with padding sees the constant inside the map and zeros at its border: no bias
    is exact, so those channels stay ungated and the warning says why."""
    net = _dense_block(nn.Conv2d(14, 5, 3, padding=1))
    with pytest.warns(cd.GatingWarning, match="cannot fold a constant into its bias"):
        cd.attach(net, "lognormal", example_inputs=torch.randn(2, 3, 8, 8))
    assert all(g.num_units != 6 for _, g in cd.named_gates(net))


@pytest.mark.parametrize("name", ["resnet", "depthwise"])
def test_a_frozen_first_layer_is_traced_and_cut_with_its_group(name):
    # a frozen stem (requires_grad=False, reached by no tensor that requires grad) was missing
    # from the traced dependency graph: its group was cut without it and the slim model
    # differed or did not run
    torch.manual_seed(0)
    model = randomize_(ZOO[name](), 0)
    name_first, first = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    first.requires_grad_(False)
    model = random_gates_(attach_zoo(model, name), 0).eval()
    assert not first.weight.requires_grad  # attach leaves the flags as they were
    x = input_for(model, 8)
    thr = quantiles(model, (0.6,))[0]
    slim = cd.prune(model, thr)
    assert not first.weight.requires_grad
    cut = slim.get_submodule(name_first)
    assert cut.out_channels < first.out_channels
    # the cut layer's new parameters stay frozen (Torch-Pruning's require grad); the rest train
    assert not any(p.requires_grad for p in cut.parameters())
    assert all(p.requires_grad for n, p in slim.named_parameters() if not n.startswith(name_first))
    with torch.no_grad():
        assert rel_error(slim(x), mask_(model, thr)(x)) <= TOL
