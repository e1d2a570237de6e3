"""Monte-Carlo prediction from slim models (issue 19): the kept units keep their learned noise
exactly, samples stack in one batch, the sampling ONNX graph agrees with PyTorch, and the metrics
and shifts the benchmark uses do what they say."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.checkpoint import CheckpointError, load_model, save_model
from compressdrop.dropout import DropConnect
from compressdrop.errors import InputError
from compressdrop.export import ExportError
from compressdrop.gates import GATES
from compressdrop.gating import named_gates
from compressdrop.gating.noisy import NoisySite, ndtri_approx, noisy_sites
from compressdrop.pruning import PruningWarning
from compressdrop.uncertainty import (
    MCSampler,
    brier,
    export_mc_onnx,
    fit_temperature,
    keep_noise,
    mc_evaluate_onnx,
    mc_mode,
    mc_samples,
    per_example,
    shifted,
)
from compressdrop.uncertainty.shift import rotate

from .test_gates import randomize_ as spread_gate
from .zoo import ZOO, attach_zoo, input_for, randomize_

FAMILIES = sorted(GATES)


def _gated(name: str, family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = randomize_(ZOO[name](), seed).eval()
    attach_zoo(net, name, gate=family)
    for _, g in named_gates(net):
        spread_gate(g)
        with torch.no_grad():  # units differ in order, so that pruning cuts a scattered set
            for p in g.parameters():
                p.copy_(p[torch.randperm(len(p))])
    return net


def _prune(net: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        return cd.prune(net)


@pytest.mark.parametrize("family", FAMILIES)
def test_select_keeps_the_kept_units_posteriors(family):
    gate = spread_gate(GATES[family](6))
    keep = torch.tensor([True, False, True, True, False, True])
    sub = gate.select(keep)
    assert sub.num_units == 4 and type(sub) is type(gate)
    for name in ("expected", "snr", "kl_per_unit"):
        torch.testing.assert_close(getattr(sub, name)(), getattr(gate, name)()[keep])
    with pytest.raises(InputError, match="at least one True"):
        gate.select(torch.zeros(6, dtype=torch.bool))


def _fix_draws(gated: nn.Module, noisy: nn.Module, batch: int) -> None:
    """Make every gate of both models return the same θ for the kept units (drawn once)."""
    subs = {id(site.gate): site.gate for _, site in noisy_sites(noisy)}
    by_name = {name: site.gate for name, site in noisy_sites(noisy)}
    for name, g in named_gates(gated):
        theta = g.sample(batch).detach()
        g.sample = lambda b, t=theta: t  # type: ignore[method-assign]
        sub = by_name[name]
        kept = theta[:, ~g.pruned]
        sub.sample = lambda b, t=kept: t  # type: ignore[method-assign]
        subs.pop(id(sub))
    assert not subs


@pytest.mark.parametrize(
    "name,family",
    [(n, f) for n in ("lenet5", "resnet", "concat") for f in FAMILIES] + [("vit", "lognormal")],
)
def test_slim_model_with_noise_draws_what_the_masked_gated_model_draws(name, family):
    """Invariant 1 for Monte-Carlo: with the same θ for the kept units, the noisy slim model's
    stochastic output equals the masked gated model's (residual streams share one θ)."""
    gated = _gated(name, family)
    slim = _prune(gated)
    noisy = keep_noise(gated, slim)
    x = input_for(gated, 3)
    with torch.no_grad():  # eval: the slim model's output (an attention computed by
        # compressdrop's MultiheadAttention, whose projection runs as a module: rounding apart)
        want = slim(x)
        assert float((noisy(x) - want).abs().max() / want.abs().max()) <= 1e-5
    masked = cd.mask_(copy.deepcopy(gated))
    _fix_draws(masked, noisy, 3)
    with torch.no_grad(), mc_mode(masked), mc_mode(noisy):
        want, got = masked(x), noisy(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert not torch.allclose(want, masked.eval()(x))  # the noise did something


def test_stacked_samples_are_independent_and_match_the_loop_in_distribution():
    gated = _gated("lenet300", "concrete")
    noisy = keep_noise(gated, _prune(gated))
    x = input_for(gated, 4)
    torch.manual_seed(0)
    stacked = mc_samples(noisy, x, 400)
    assert stacked.shape == (400, 4, 10)
    assert not torch.allclose(stacked[0], stacked[1])  # each sample its own θ
    torch.manual_seed(1)
    with torch.no_grad(), mc_mode(noisy):
        looped = torch.stack([torch.softmax(noisy(x), -1) for _ in range(400)])
    se = ((stacked.var(0) + looped.var(0)) / 400).sqrt()
    assert bool(((stacked.mean(0) - looped.mean(0)).abs() <= 5 * se + 1e-6).all())


def test_mc_mode_draws_per_example_and_restores_the_noise_mode():
    net = _gated("lenet300", "lognormal")
    for _, g in named_gates(net):
        g.noise = "batch"
    with mc_mode(net):
        assert all(g.noise == "example" and g.training for _, g in named_gates(net))
    assert all(g.noise == "batch" and not g.training for _, g in named_gates(net))


def test_samples_of_shared_masks_are_drawn_one_pass_each():
    net = nn.Sequential(nn.Flatten(), DropConnect(nn.Linear(16, 10), p=0.5))
    assert not per_example(net)
    x = torch.randn(3, 1, 4, 4)
    draws = mc_samples(net, x, 6)
    assert draws.shape == (6, 3, 10) and not torch.allclose(draws[0], draws[1])


def test_sampler_repeats_after_the_deterministic_prefix_when_that_is_exact():
    gated = _gated("lenet5", "lognormal")
    noisy = keep_noise(gated, _prune(gated))
    x = input_for(gated, 3)
    sampler = MCSampler(noisy, 5, example=x)
    assert sampler.late_repeat  # LeNet-5: a chain, the first gate after conv 1
    with torch.no_grad():
        probs = sampler(x)
    assert probs.shape == (5, 3, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 3))
    # a residual net whose first gated layer feeds a stream that joins an earlier branch:
    # whichever way the sampler chose, its noise-free output is the slim model's, repeated
    gated = _gated("resnet", "lognormal")
    slim = _prune(gated)
    sampler = MCSampler(keep_noise(gated, slim), 4, example=input_for(gated, 3))
    for _, site in noisy_sites(sampler.model):
        site.gate.sample = lambda b, s=site: torch.ones(b, s.gate.num_units) * s.gate.expected()
    x = input_for(gated, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            sampler(x), torch.softmax(slim(x), -1).expand(4, 2, 10), rtol=1e-5, atol=1e-6
        )


def test_noise_on_chosen_layers_only():
    gated = _gated("lenet5", "variational")
    slim = _prune(gated)
    last = [n for n, _ in named_gates(gated)][-1]
    noisy = keep_noise(gated, slim, layers=[last])
    assert [n for n, _ in noisy_sites(noisy)] == [last]
    x = input_for(gated, 3)
    sampler = MCSampler(noisy, 4, example=x)
    assert sampler.late_repeat  # the convolutions run once per input
    with pytest.raises(InputError, match="layers must name gates"):
        keep_noise(gated, slim, layers=["nope"])


def test_ndtri_approx_matches_torch_over_the_float64_range():
    p = torch.cat(
        [
            torch.logspace(-300, -1, 3000, dtype=torch.float64),
            torch.linspace(0.05, 0.95, 1000, dtype=torch.float64),
        ]
    )
    p = torch.cat([p, 1 - p[p > 1e-15]])
    want = torch.special.ndtri(p)
    rel = (ndtri_approx(p) - want).abs() / want.abs().clamp(min=1e-3)
    assert float(rel.max()) < 2e-9


@pytest.mark.parametrize("name,family", [("resnet", "variational"), ("vit", "lognormal")])
def test_a_noisy_slim_checkpoint_loads_with_its_noise(tmp_path, name, family):
    gated = _gated(name, family)
    noisy = keep_noise(gated, _prune(gated))
    save_model(noisy, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert [n for n, _ in noisy_sites(back)] == [n for n, _ in noisy_sites(noisy)]
    shared = [s.gate for _, s in noisy_sites(back)]
    if name == "resnet":
        assert len({id(g) for g in shared}) < len(shared)  # the residual stream's gate, once
    else:
        assert any(s.head_dim for _, s in noisy_sites(back))  # heads keep their noise too
    x = input_for(gated, 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), noisy(x), rtol=0, atol=0)
        torch.manual_seed(0)
        a = mc_samples(back, x, 3)
        torch.manual_seed(0)
        b = mc_samples(noisy, x, 3)
    torch.testing.assert_close(a, b)
    # a record that names a layer the model lacks: a clear error, not a half-built model
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["noise"][0]["site"] = "no.such.layer"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"no\.such\.layer"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_onnx_graph_draws_the_pytorch_posterior(family, tmp_path):
    gated = _gated("lenet5", family)
    noisy = keep_noise(gated, _prune(gated))
    x = input_for(gated, 4)
    rep = export_mc_onnx(noisy, x, tmp_path / "mc.onnx", samples=20)
    assert rep.metadata["mc_samples"] == "20"
    y = torch.randint(0, 10, (4,))
    res = mc_evaluate_onnx(tmp_path / "mc.onnx", x, y, samples=30, batch_size=4)
    assert res["samples_per_call"] == 20 and res["samples"] == 30
    assert 0 <= res["ece"] <= 1 and math.isfinite(res["nll"]) and res["seconds_per_batch"] > 0


def test_an_exported_sampler_draws_the_models_dropout_too(tmp_path):
    """The exporter wrote a stock dropout as an inference-mode Dropout node, which onnxruntime
    runs as the identity: a graph of a model with dropout sampled only its gates (a GPT-2's
    ``resid_pdrop`` made the check refuse the graph; a smaller share of dropout passed it)."""
    import numpy as np

    from compressdrop.export import export_onnx
    from compressdrop.runtime import ort_session

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).eval()
    x = torch.randn(5, 8)
    sampler = MCSampler(net, 4)
    with torch.no_grad():
        want = torch.stack([sampler(x) for _ in range(50)]).var(0).mean().item()
    export_onnx(sampler, x, tmp_path / "d.onnx", check_batch_sizes=())
    session, _ = ort_session(tmp_path / "d.onnx", "cpu")
    name = session.get_inputs()[0].name
    got = np.stack([session.run(None, {name: x.numpy()})[0] for _ in range(50)]).var(0).mean()
    assert 0.5 < got / want < 2, (got, want)  # the old graph: about 1e-14
    # dropout ahead of the first gate is drawn per sample: no shared prefix run once per input
    gated = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    cd.attach(gated, example_inputs=x[:2])
    noisy = keep_noise(gated, cd.prune(gated, 0.0), 0.0)
    assert not MCSampler(noisy, 4, example=x).late_repeat
    export_mc_onnx(noisy, x, tmp_path / "mc.onnx", samples=8)
    # the channel kinds zero whole channels
    from compressdrop.uncertainty.slim import _draw_dropout_masks

    drop = _draw_dropout_masks(nn.Sequential(nn.Dropout2d(0.5)))[0].train()
    planes = drop(torch.ones(4, 6, 5, 5)).flatten(2)
    assert {tuple(p.unique().tolist()) for p in planes.flatten(0, 1)} == {(0.0,), (2.0,)}
    # on (N, C, L), as torch's Dropout2d, per channel (a review found whole examples dropped)
    rows = drop(torch.ones(64, 6, 5))
    assert {tuple(r.unique().tolist()) for r in rows.flatten(0, 1)} == {(0.0,), (2.0,)}
    first = rows[:, :, 0]  # some example keeps some channels and loses others (chance 2⁻³²⁰)
    assert ((first == 0).any(1) & (first != 0).any(1)).any()
    with pytest.raises(InputError, match="AlphaDropout cannot be sampled"):
        MCSampler(nn.Sequential(nn.Linear(8, 3), nn.AlphaDropout(0.1)), 4)
    # a mask shared by the batch would be shared by the stacked samples (and the exporter folds
    # DropConnect's weight mask into a constant): refused, with the way that works
    with pytest.raises(InputError, match=r"cannot be stacked.*mc_samples"):
        MCSampler(nn.Sequential(nn.Flatten(), DropConnect(nn.Linear(16, 10), p=0.5)), 4)
    # recurrent dropout draws its masks per example (tied over time steps): stacked, as before
    from compressdrop.dropout import LSTM

    MCSampler(LSTM(4, 8, scheme="gal", p=0.2), 4)


def test_sampling_graph_that_disagrees_is_not_written(tmp_path, monkeypatch):
    gated = _gated("lenet300", "lognormal")
    noisy = keep_noise(gated, _prune(gated))
    x = input_for(gated, 4)
    import compressdrop.runtime as runtime

    real = runtime.ort_session

    class Skewed:  # a runtime that samples a different distribution
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, names, feeds):
            out = self.session.run(names, feeds)
            return [(out[0] ** 3) / (out[0] ** 3).sum(-1, keepdims=True)]

    monkeypatch.setattr(runtime, "ort_session", lambda *a, **k: (Skewed(real(*a, **k)[0]), "CPU"))
    with pytest.raises(ExportError, match="standard errors"):
        export_mc_onnx(noisy, x, tmp_path / "mc.onnx", samples=16)
    assert list(tmp_path.iterdir()) == []


def test_deterministic_onnx_file_is_refused_for_monte_carlo(tmp_path):
    from compressdrop.export import export_onnx

    net = ZOO["lenet300"]().eval()
    export_onnx(net, input_for(net, 2), tmp_path / "d.onnx")
    with pytest.raises(InputError, match="deterministic graph"):
        mc_evaluate_onnx(tmp_path / "d.onnx", input_for(net, 2), torch.tensor([0, 1]))


def test_brier_and_temperature_scaling():
    y = torch.tensor([0, 1, 2])
    assert brier(torch.eye(3), y) == 0.0
    assert brier(torch.eye(3)[[1, 2, 0]], y) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(z * 3.0, labels) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(InputError):
        fit_temperature(z[:3], labels[:2])


def test_shifts():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 9, 9, generator=g)
    torch.testing.assert_close(rotate(x, 0), x)
    torch.testing.assert_close(rotate(rotate(x, 90), -90)[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    noisy = shifted(x, "gaussian_noise", 0.2)
    assert torch.equal(noisy, shifted(x, "gaussian_noise", 0.2)) and noisy.min() >= 0
    blurred = shifted(x, "blur", 1.0)
    assert blurred.std() < x.std()
    torch.testing.assert_close(shifted(x, "contrast", 1.0), x)
    assert shifted(x, "contrast", 0.1).std() < 0.2 * x.std()
    with pytest.raises(InputError, match="unknown shift"):
        shifted(x, "fog", 1)
    assert isinstance(NoisySite, type)


def test_a_slim_model_from_another_gated_model_is_refused_by_keep_noise():
    """keep_noise took any slim model; sampling then failed with "noisy site has 29 units but
    the layer gives 115 along dim 1"."""
    gated = _gated("lenet300", "lognormal")
    other = _gated("lenet300", "lognormal", seed=1)
    with torch.no_grad():  # another spread of SNRs: other widths at the same threshold
        for _, g in named_gates(other):
            g.log_sigma.sub_(1.0)
    slim_other = _prune(other)
    assert slim_other.prune_report.architecture() != _prune(gated).prune_report.architecture()
    with pytest.raises(InputError, match="does not fit the gated model's kept units"):
        keep_noise(gated, slim_other)
    # the check runs on the gated model's recorded inputs and leaves the random state as it was
    slim = _prune(gated)
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    keep_noise(gated, slim)
    assert torch.equal(torch.rand(3), want)
