"""Recurrent dropout (Zaremba, RNNDrop, Semeniuta, Gal), gated LSTMs, and Monte-Carlo evaluation."""

import math
import warnings

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.checkpoint import load_model, save_model
from compressdrop.dropout import GRU, LSTM
from compressdrop.export import export_onnx
from compressdrop.gating import GatingWarning
from compressdrop.models import build_model
from compressdrop.uncertainty import has_noise, mc_evaluate, mc_mode, resize_images

SCHEMES = ["zaremba", "moon", "semeniuta", "gal"]


def _layer(cls, scheme, p=0.3, layers=2, **kw):
    torch.manual_seed(0)
    return cls(5, 16, layers, scheme=scheme, p=p, record_masks=True, **kw)


@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unrolled_recurrence_is_the_fused_kernel(cls, batch_first):
    m = _layer(cls, "none", batch_first=batch_first).eval()
    x = torch.randn(4, 6, 5)
    ref = getattr(nn, cls.__name__)(5, 16, 2, batch_first=batch_first)
    ref.load_state_dict(m.state_dict(), strict=False)
    y, _ = m(x)
    torch.testing.assert_close(y, ref(x)[0])
    torch.testing.assert_close(m.unrolled(x)[0], y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_is_deterministic_and_the_plain_network(cls, scheme):
    if cls is GRU and scheme == "moon":
        pytest.skip("RNNDrop needs a memory cell")
    m = _layer(cls, scheme).eval()
    x = torch.randn(3, 7, 5)
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)
    plain = getattr(nn, cls.__name__)(5, 16, 2, batch_first=True)
    plain.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(a, plain(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_drop_rate_matches_p(cls, scheme):
    if cls is GRU and scheme == "moon":
        pytest.skip("RNNDrop needs a memory cell")
    p = 0.3
    m = _layer(cls, scheme, p=p).train()
    m(torch.randn(200, 10, 5))
    for name, mask in m.last_masks.items():
        # per-sequence masks repeat over time: count each draw once
        draws = mask[0] if scheme in ("moon", "gal") else mask
        n = draws.numel()
        rate = float((draws == 0).float().mean())
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (name, rate)
        kept = draws[draws != 0]
        scale = 1.0 if name.endswith(".cell") else 1 / (1 - p)  # RNNDrop's cell mask is 0/1
        torch.testing.assert_close(kept, torch.full_like(kept, scale))


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_variational_masks_are_constant_in_time_and_differ_across_sequences(cls):
    m = _layer(cls, "gal").train()
    m(torch.randn(8, 12, 5))
    assert {"l0.input", "l0.hidden", "l1.input", "l1.hidden", "output"} <= set(m.last_masks)
    for mask in m.last_masks.values():  # (T, B, F)
        assert torch.equal(mask, mask[:1].expand_as(mask))
        assert not torch.equal(mask[0, 0], mask[0, 1])


def test_rnndrop_masks_the_cell_once_per_sequence():
    m = _layer(LSTM, "moon").train()
    m(torch.randn(8, 12, 5))
    assert set(m.last_masks) == {"l0.cell", "l1.cell"}
    for mask in m.last_masks.values():
        assert torch.equal(mask, mask[:1].expand_as(mask))
        assert not torch.equal(mask[0, 0], mask[0, 1])


def test_zaremba_drops_only_non_recurrent_connections_and_resamples_each_step():
    m = _layer(LSTM, "zaremba").train()
    m(torch.randn(8, 12, 5))
    assert set(m.last_masks) == {"l0.input", "l1.input", "output"}  # no hidden-state mask
    mask = m.last_masks["l0.input"]
    assert not torch.equal(mask[0], mask[1])


def test_semeniuta_leaves_the_carried_cell_untouched():
    torch.manual_seed(1)
    m = LSTM(5, 16, 1, scheme="semeniuta", p=0.5, record_masks=True).train()
    x, h0, c0 = torch.randn(64, 1, 5), torch.zeros(1, 64, 16), torch.randn(1, 64, 16)
    _, (_, c1) = m(x, (h0, c0))
    mask = m.last_masks["l0.update"][0]
    gates = x[:, 0] @ m.weight_ih_l0.T + m.bias_ih_l0 + m.bias_hh_l0
    i, f, g, _ = gates.chunk(4, dim=-1)
    carried = f.sigmoid() * c0[0]
    torch.testing.assert_close(c1[0], carried + i.sigmoid() * g.tanh() * mask)
    dropped = mask == 0
    assert dropped.any()
    assert torch.equal(c1[0][dropped], carried[dropped])  # exactly the carried part


def test_bad_schemes_are_refused():
    with pytest.raises(ValueError, match="scheme must be one of"):
        LSTM(3, 4, scheme="dropconnect")
    with pytest.raises(ValueError, match="GRU has none"):
        GRU(3, 4, scheme="moon")
    with pytest.raises(ValueError, match="p must be in"):
        LSTM(3, 4, scheme="gal", p=1.0)


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_eval_mode_exports_to_onnx_as_the_standard_operator(cls, tmp_path):
    import onnx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(28, 24, 2, scheme="gal", p=0.25)
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    rep = export_onnx(Net(), torch.randn(2, 28, 28), tmp_path / "rnn.onnx")
    ops = {n.op_type for n in onnx.load(rep.path).graph.node}
    assert cls.__name__ in ops
    assert max(rep.max_rel_error.values()) < 1e-4


def _gated_lstm(scheme="none"):
    torch.manual_seed(0)
    net = build_model("lstm_rows", input_shape=(1, 8, 8), hidden=24, layers=2, scheme=scheme, p=0.2)
    cd.attach(net, "lognormal", kl_cost="flops")
    return net


def test_gates_sit_on_each_lstm_layer_and_train():
    net = _gated_lstm("gal")
    names = [n for n, _ in cd.named_gates(net)]
    assert names == ["rnn.0", "rnn.1"]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = nn.functional.cross_entropy(net(x), y) + cd.kl(net) / 100
    loss.backward()
    for _, g in cd.named_gates(net):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    # per-sequence θ: two training passes differ, eval is deterministic
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_pruned_lstm_is_exact_smaller_and_exports(tmp_path):
    net = _gated_lstm()
    for _, g in cd.named_gates(net):
        with torch.no_grad():
            g.log_sigma[::3] = 3.0  # noisy units: SNR far below the threshold
    net.eval()
    kept = [int(g.mask().sum()) for _, g in cd.named_gates(net)]
    assert kept == [16, 16]
    slim = cd.prune(net)
    assert [m.hidden_size for m in slim.rnn] == [16, 16]
    assert slim.rnn[1].input_size == 16 and slim.head.in_features == 16
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        cd.mask_(net)
        torch.testing.assert_close(slim(x), net(x), rtol=1e-5, atol=1e-6)
    rep = export_onnx(slim, x[:2], tmp_path / "slim.onnx")
    assert (rep.metadata["architecture_before"], rep.metadata["architecture_after"]) == (
        "24-24",
        "16-16",
    )
    save_model(slim, tmp_path / "slim.pt")
    again = load_model(tmp_path / "slim.pt")
    torch.testing.assert_close(again(x), slim(x))


def test_plain_torch_lstm_is_left_ungated_with_a_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 12)
            self.rnn = nn.LSTM(12, 10, batch_first=True)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.rnn(torch.relu(self.fc(x)))[0][:, -1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="no gateable layer"):
            cd.attach(Net(), example_inputs=torch.randn(2, 5, 8))
    msgs = [str(w.message) for w in caught if issubclass(w.category, GatingWarning)]
    assert any("'rnn'" in m and "compressdrop.dropout.LSTM" in m for m in msgs)


def test_mc_mode_switches_recurrent_dropout_on():
    net = build_model("lstm_rows", input_shape=(1, 8, 8), hidden=12, scheme="semeniuta", p=0.3)
    net.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(net(x), net(x))
    with mc_mode(net):
        assert not torch.equal(net(x), net(x))
    assert torch.equal(net(x), net(x)) and not net.training


@pytest.mark.parametrize("gate", ["lognormal", "hardconcrete"])
def test_mc_mode_samples_the_gates_of_a_gated_lstm(gate):
    # mc_mode leaves the wrapper (Gated) in eval and switches only the gate on: the LSTM must
    # follow the gate's flag, or Monte-Carlo samples of a gated LSTM would all be E[θ].
    torch.manual_seed(0)
    net = build_model("lstm_rows", input_shape=(1, 8, 8), hidden=12)
    cd.attach(net, gate)
    with torch.no_grad():
        for _, g in cd.named_gates(net):
            for p in g.parameters():
                p.normal_(0.0, 1.0)  # a noisy posterior
    net.eval()
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(net(x), net(x))
    with mc_mode(net):
        assert not torch.equal(net(x), net(x))
    assert torch.equal(net(x), net(x))
    pred = cd.mc_predict(net, x, samples=8)
    assert pred.mutual_information.max() > 1e-4


def test_mc_evaluate_reports_uncertainty_and_refuses_noise_free_models():
    torch.manual_seed(0)
    net = build_model("lenet5", input_shape=(1, 8, 8), dropout=0.5).eval()
    assert has_noise(net) and not has_noise(build_model("lenet5", input_shape=(1, 8, 8)))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    res = mc_evaluate(net, x, y, samples=8, x_ood=torch.rand(32, 1, 8, 8) * 5)
    for key in ("nll", "ece", "deterministic_nll", "mean_mutual_information", "ood_auroc_entropy"):
        assert math.isfinite(res[key])
    assert 0 <= res["ood_auroc_mutual_information"] <= 1 and res["mean_mutual_information"] > 0
    with pytest.raises(ValueError, match="no dropout layer or gate"):
        mc_evaluate(build_model("lenet5", input_shape=(1, 8, 8)), x, y)


def test_resize_images_for_out_of_distribution_sets():
    x = torch.rand(5, 1, 8, 8)
    y = resize_images(x, (1, 28, 28))
    assert y.shape == (5, 1, 28, 28)
    torch.testing.assert_close(y.mean(), x.mean(), atol=0.02, rtol=0)
    assert resize_images(x, (3, 8, 8)).shape == (5, 3, 8, 8)
    with pytest.raises(ValueError):
        resize_images(torch.rand(5, 64), (1, 8, 8))
