"""Transformer MLPs: the hidden units of Linear → GELU → Linear on (batch, tokens, d) inputs are
gated and removed exactly; the residual stream is left alone; nn.TransformerEncoderLayer keeps
working with gates on (its fused fast path would skip them) and after surgery; a gated MLP
(SwiGLU) has one gate per unit on its product."""

import warnings

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.export.program import export_program
from compressdrop.gates import GATES


class MLPBlock(nn.Module):
    """Pre-LayerNorm residual MLP block over tokens, mean-pooled into a classifier."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


class EncoderClassifier(nn.Module):
    """Token ids → embedding → one nn.TransformerEncoderLayer → mean pool → Linear."""

    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(ids)).mean(1))


def _spread(model: nn.Module) -> float:
    gate = next(iter(cd.named_gates(model)))[1]
    with torch.no_grad():
        gate.log_sigma.copy_(torch.linspace(-3, 1, gate.num_units))
    return float(gate.snr().detach().median())


def _attach(model: nn.Module, x: torch.Tensor, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cd.attach(model, example_inputs=x[:2], **kwargs)
    return [str(w.message) for w in record if w.category is cd.GatingWarning]


def test_a_residual_mlp_block_gates_its_hidden_units_only(tmp_path):
    torch.manual_seed(0)
    model = MLPBlock().eval()
    x = torch.randn(4, 5, 16)
    warned = _attach(model, x)
    assert [n for n, _ in cd.named_gates(model)] == ["fc1"]
    # the stream fc2 writes into is summed with the block's input, which nothing can slice
    assert any("'fc2'" in w and "summed with a tensor that cannot be pruned" in w for w in warned)
    thr = _spread(model)
    slim = cd.prune(model, thr)
    assert slim.fc1.out_features == slim.fc2.in_features < 32
    with torch.no_grad():
        torch.testing.assert_close(slim(x), cd.mask_(model, thr)(x), rtol=1e-5, atol=1e-6)
    assert max(cd.export_onnx(slim, x[:2], tmp_path / "m.onnx").max_rel_error.values()) <= 1e-4


def test_transformer_encoder_layer_keeps_its_gates_and_prunes_exactly(tmp_path):
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    ids = torch.randint(0, 40, (4, 6))
    warned = _attach(model, ids, granularity="neuron")  # its heads: tests/test_heads.py
    assert [n for n, _ in cd.named_gates(model)] == ["encoder.layers.0.linear1"]
    assert any("linear2" in w and "LayerNorm" in w for w in warned)  # post-norm: not exact
    layer = model.encoder.layers[0]
    assert layer.linear1.in_features == 16  # the wrapper shows the wrapped layer's attributes
    thr = _spread(model)
    with torch.no_grad():
        masked = cd.mask_(model, thr)(ids)  # eval + no_grad: the fast path would skip the gate
        layer.linear1.gate.pruned.zero_()
        unmasked = model(ids)
    assert not torch.allclose(masked, unmasked)  # so the gate did act in eval
    slim = cd.prune(model, thr)
    lin1, lin2 = slim.encoder.layers[0].linear1, slim.encoder.layers[0].linear2
    assert lin1.out_features == lin2.in_features == lin1.weight.shape[0] < 32
    with torch.no_grad():
        torch.testing.assert_close(slim(ids), masked, rtol=1e-5, atol=1e-6)
    slim.train()(ids).sum().backward()  # the slim layer trains too
    slim.eval()
    assert max(cd.export_onnx(slim, ids[:2], tmp_path / "e.onnx").max_rel_error.values()) <= 1e-4
    assert max(export_program(slim, ids[:2], tmp_path / "e.pt2").max_rel_error.values()) <= 1e-5


class SwiGLUDecoderBlock(nn.Module):
    """Token ids → embedding → RMSNorm → gated MLP down(silu(gate(x)) * up(x)) on a residual
    stream → mean pool → Linear: a LLaMA-style MLP."""

    def __init__(self, vocab: int = 40, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.RMSNorm(d)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        x = self.norm(h)
        h = h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.head(h.mean(1))


@pytest.mark.parametrize("family", list(GATES))
def test_a_gated_mlp_has_one_gate_on_its_product_and_prunes_exactly(family, tmp_path):
    torch.manual_seed(0)
    model = SwiGLUDecoderBlock().eval()
    ids = torch.randint(0, 40, (4, 6))
    warned = _attach(model, ids, gate=family)
    # gate_proj and up_proj share their units; θ goes on the factor that enters the product
    # linearly, once: silu(gate(x)) * (θ·up(x)), not silu(θ·gate(x)) * θ·up(x)
    assert [n for n, _ in cd.named_gates(model)] == ["up_proj"]
    # the residual stream starts at the token embedding, which no gate can zero
    assert any("'down_proj'" in w and "embedding 'emb'" in w for w in warned)
    assert not cd.is_gated(model.gate_proj)
    model.train()
    loss = model(ids).sum() + cd.kl(model)
    loss.backward()  # trains through the one site
    assert model.up_proj.gate.kl().grad_fn is not None
    model.eval()
    gate = model.up_proj.gate
    with torch.no_grad():
        for p in gate.parameters():  # spread the SNRs: some units fall under the median
            p.add_(torch.linspace(-2, 2, gate.num_units, dtype=p.dtype))
    thr = float(gate.snr().detach().median())
    slim = cd.prune(model, thr)
    widths = {slim.gate_proj.out_features, slim.up_proj.out_features, slim.down_proj.in_features}
    assert len(widths) == 1 and widths.pop() < 32
    with torch.no_grad():
        torch.testing.assert_close(slim(ids), cd.mask_(model, thr)(ids), rtol=1e-5, atol=1e-6)
    if family == "lognormal":  # the slim block holds no gate: the same export for every family
        report = cd.export_onnx(slim, ids[:2], tmp_path / "g.onnx")
        assert max(report.max_rel_error.values()) <= 1e-4
