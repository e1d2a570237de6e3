"""The dropout family: drop rates within sampling error, expectations preserved, eval deterministic;
Monte-Carlo uncertainty and its metrics."""

import math

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.dropout import (
    BernoulliDropout,
    Cutout,
    DropConnect,
    FastDropout,
    GaussianDropout,
    MaxDrop,
    SpatialDropout,
    Standout,
)
from compressdrop.errors import InputError
from compressdrop.uncertainty import auroc, expected_calibration_error, mc_mode, mc_predict, nll

N = 200_000


def within(estimate: float, exact: float, std: float, n: int, k: float = 5.0) -> bool:
    return abs(estimate - exact) <= k * std / math.sqrt(n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("inverted", [True, False])
def test_bernoulli_drop_rate_and_expectation(p, inverted):
    layer = BernoulliDropout(p, inverted=inverted).train()
    x = torch.ones(N)
    y = layer(x)
    dropped = float((y == 0).float().mean())
    assert within(dropped, p, math.sqrt(p * (1 - p)), N)
    # training mean equals the eval output: the same expected activation in both conventions
    q = 1 - p
    train_std = math.sqrt(p / q) if inverted else math.sqrt(p * q)
    assert within(float(y.mean()), float(layer.eval()(x).mean()), train_std, N)


def test_inverted_and_classic_agree_up_to_the_convention():
    x = torch.randn(1000).abs()
    inv, cla = BernoulliDropout(0.3, True).eval(), BernoulliDropout(0.3, False).eval()
    torch.testing.assert_close(inv(x) * 0.7, cla(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: BernoulliDropout(0.4),
        lambda: GaussianDropout(0.4),
        lambda: MaxDrop(0.4),
        lambda: MaxDrop(0.4, "channel"),
        lambda: DropConnect(nn.Linear(6, 3), 0.4),
        lambda: Standout(nn.Linear(6, 3)),
        lambda: FastDropout(nn.Linear(6, 3), 0.4),
        lambda: SpatialDropout(0.4),
        lambda: Cutout(3),
    ],
    ids=lambda make: type(make()).__name__,
)
def test_eval_is_deterministic(make):
    # built here, under the suite's seed: built at import, their weights came from a random state
    # that differed from run to run, and Standout's two train-mode draws were sometimes equal
    layer = make()
    x = (
        torch.randn(4, 6, 5, 5)
        if isinstance(layer, (SpatialDropout, Cutout, MaxDrop))
        else torch.randn(4, 6)
    )
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_gaussian_dropout_variance():
    y = GaussianDropout(0.3).train()(torch.ones(N))
    assert within(float(y.mean()), 1.0, math.sqrt(0.3 / 0.7), N)
    assert abs(float(y.var()) - 0.3 / 0.7) < 0.01


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(5, 4), lambda: nn.Conv2d(2, 3, 3)], ids=["linear", "conv"]
)
def test_dropconnect_expectation_is_the_plain_layer(make):
    torch.manual_seed(0)
    layer = make()
    dc = DropConnect(layer, 0.5).train()
    x = torch.randn(2, 5) if isinstance(layer, nn.Linear) else torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        samples = torch.stack([dc(x) for _ in range(1000)])
    with torch.no_grad():
        ref = layer(x)
    se = samples.std(0) / math.sqrt(len(samples))
    assert ((samples.mean(0) - ref).abs() <= 5 * se + 1e-6).all()
    torch.testing.assert_close(dc.eval()(x), ref)
    with pytest.raises(TypeError):
        DropConnect(nn.ReLU())


def test_standout_keep_probability_follows_the_belief_network():
    layer = Standout(nn.Linear(3, 2), alpha=2.0, beta=-1.0).train()
    x = torch.randn(1, 3).expand(N, 3)
    h = layer(x)
    with torch.no_grad():
        pre = layer.layer(x[:1])
        keep = torch.sigmoid(2 * pre - 1)
        plain = torch.relu(pre)
    active = [j for j in range(2) if plain[0, j] > 0]  # a unit with ReLU output 0 says nothing
    assert active, "the seeded input leaves no active unit: the rate check would be vacuous"
    for j in active:
        kept = float((h[:, j] != 0).float().mean())
        assert within(kept, float(keep[0, j]), math.sqrt(float(keep[0, j] * (1 - keep[0, j]))), N)
    torch.testing.assert_close(layer.eval()(x[:1]), plain * keep)


def test_fast_dropout_matches_the_moments_of_real_dropout():
    torch.manual_seed(0)
    lin = nn.Linear(50, 1)
    x = torch.randn(1, 50)
    xs = x.expand(N, 50)  # every row an independent draw
    with torch.no_grad():
        f = FastDropout(lin, 0.5).train()(xs).flatten()
        r = nn.Sequential(nn.Dropout(0.5), lin).train()(xs).flatten()
    assert abs(float(f.mean() - r.mean())) < 5 * float(r.std()) * math.sqrt(2 / N)
    assert abs(float(f.var() / r.var()) - 1) < 0.03


def test_deterministic_fast_dropout_integrates_the_sigmoid_over_dropout_noise():
    # σ(output) must approximate E[σ(s)] under real dropout, with no randomness of its own.
    torch.manual_seed(0)
    lin = nn.Linear(40, 3)
    x = torch.randn(1, 40) * 2
    layer = FastDropout(lin, 0.5, deterministic=True).train()
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, layer(x))
        real = nn.Sequential(nn.Dropout(0.5), lin).train()(x.expand(N, 40))
        mc = torch.sigmoid(real).mean(0)
        naive = torch.sigmoid(lin(x))[0]
    torch.testing.assert_close(torch.sigmoid(out)[0], mc, atol=0.02, rtol=0)
    # the correction matters: the plain mean is farther from the truth where units saturate
    assert (torch.sigmoid(out)[0] - mc).abs().max() < (naive - mc).abs().max()
    torch.testing.assert_close(layer.eval()(x), lin(x))


def test_spatial_dropout_drops_whole_maps():
    y = SpatialDropout(0.5).train()(torch.ones(64, 8, 4, 4))
    per_map = y.flatten(2)
    assert ((per_map == 0).all(-1) | (per_map != 0).all(-1)).all()


@pytest.mark.parametrize("size,holes", [(3, 1), ((2, 4), 2)])
def test_cutout_zeroes_patches_of_the_right_area(size, holes):
    torch.manual_seed(0)
    x = torch.ones(500, 1, 16, 16)
    y = Cutout(size, holes).train()(x)
    h, w = (size, size) if isinstance(size, int) else size
    zeros = (y == 0).flatten(1).sum(1).float()
    assert float(zeros.max()) <= h * w * holes
    assert float(zeros.mean()) > 0.5 * h * w  # patches clipped at the borders are smaller
    assert torch.equal(Cutout(size, holes).eval()(x), x)


def test_cutout_takes_one_image_and_cuts_a_rectangle_of_the_given_shape():
    torch.manual_seed(1)
    img = torch.ones(3, 32, 32)
    for _ in range(20):
        y = Cutout((4, 10)).train()(img)
        assert y.shape == img.shape
        hole = (y == 0).all(0)  # the same patch on every channel
        assert torch.equal((y == 0).any(0), hole)
        rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
        if len(rows) == 0:
            continue
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h <= 4 and w <= 10 and int(hole.sum()) == h * w  # a full, axis-aligned rectangle
    with pytest.raises(ValueError, match="Cutout takes"):
        Cutout(3).train()(torch.ones(8, 8))


@pytest.mark.parametrize("mode", ["feature", "channel"])
def test_maxdrop_drops_only_maxima_at_rate_p(mode):
    torch.manual_seed(0)
    layer = MaxDrop(0.3, mode).train()
    x = torch.randn(4000, 3, 4, 4)
    y = layer(x)
    changed = y != x
    is_max = layer._is_max(x)
    assert not (changed & ~is_max).any()
    rate = float(changed.sum() / is_max.sum())
    assert within(rate, 0.3, math.sqrt(0.21), int(is_max.sum()))
    # expectation: maxima scaled by 1 − p at test time
    torch.testing.assert_close(layer.eval()(x)[is_max], x[is_max] * 0.7)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = (
            nn.Linear(4, 16),
            nn.BatchNorm1d(16),
            nn.Dropout(0.5),
            nn.Linear(16, 3),
        )
        self.arch = {"input_shape": [4]}

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def test_mc_predict_keeps_noise_on_and_batchnorm_in_eval():
    model = Net().eval()
    model.bn.running_mean.fill_(0.3)
    stats = model.bn.running_mean.clone()
    x = torch.randn(50, 4)
    pred = mc_predict(model, x, samples=40)
    assert torch.equal(model.bn.running_mean, stats)  # BN never went to training mode
    assert pred.mean.shape == (50, 3) and torch.allclose(pred.mean.sum(1), torch.ones(50))
    assert (pred.variance > 0).any()
    assert (pred.entropy + 1e-6 >= pred.mutual_information).all() and (
        pred.mutual_information >= 0
    ).all()
    assert not model.training and not model.drop.training  # flags restored
    # a model without noise gave identical samples without a word (mc_evaluate refused it)
    with pytest.raises(InputError, match="no dropout layer or gate"):
        mc_predict(nn.Sequential(nn.Linear(4, 3)), x, samples=4)


def test_mc_mode_samples_gates_and_family_layers():
    model = cd.attach(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), GaussianDropout(0.3), nn.Linear(8, 2))
    )
    x = torch.randn(3, 4)
    model.eval()
    assert torch.equal(model(x), model(x))
    with mc_mode(model):
        assert not torch.equal(model(x), model(x))
    assert torch.equal(model(x), model(x))


def test_metrics_on_known_cases():
    y = torch.tensor([0, 1, 1, 0])
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    assert nll(probs, y) == pytest.approx(
        -sum(math.log(v) for v in (0.9, 0.8, 0.6, 0.5)) / 4, rel=1e-6
    )
    # a perfectly calibrated confident predictor has ECE 0; an overconfident wrong one has ECE 1
    assert expected_calibration_error(
        torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 0])
    ) == pytest.approx(0)
    assert expected_calibration_error(
        torch.tensor([[1.0, 0.0]] * 3), torch.tensor([1, 1, 1])
    ) == pytest.approx(1)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9])) == 1.0
    assert auroc(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.5
    from sklearn.metrics import roc_auc_score

    neg, pos = torch.randn(300), torch.randn(200) + 0.7
    ref = roc_auc_score([0] * 300 + [1] * 200, torch.cat([neg, pos]).numpy())
    assert auroc(neg, pos) == pytest.approx(ref, abs=1e-12)
