"""Linear layers on inputs of more than two dimensions export as one ONNX ``Gemm`` each, bias
included (``compressdrop/export/_gemm.py``), with the same values, and the model is left as it
was."""

import collections
import contextlib

import onnx
import torch
from torch import nn

import compressdrop.export.onnx as onnx_export
from compressdrop import runtime
from compressdrop.export import export_onnx


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


class _OwnForward(nn.Linear):
    """A subclass with a forward of its own: left as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_token_linears_export_as_gemm_and_the_model_is_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4, bias=False), _OwnForward(4, 3)
    )
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    classes = [type(m) for m in model]
    export_onnx(model, torch.randn(3, 5, 8), tmp_path / "m.onnx")  # checked at batches 1, 7, 64
    ops = _ops(tmp_path / "m.onnx")
    # the first layer: a Gemm with its bias; no bias: a MatMul; the subclass: MatMul + Add, × 2
    assert ops["Gemm"] == 1
    assert ops["MatMul"] == 2
    assert [type(m) for m in model] == classes
    assert seen  # the hook ran while the model was traced
    assert runtime._GEMM[0] == 0


def test_an_encoder_layer_projects_through_gemm(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    export_onnx(layer, torch.randn(2, 6, 16), tmp_path / "enc.onnx")
    ops = _ops(tmp_path / "enc.onnx")
    # q, k and v in one product, the attention's output projection, the two MLP layers
    assert ops["Gemm"] == 4
    # what is left of MatMul is the attention itself (scores, weighted values)
    assert ops["MatMul"] <= 2
    assert type(layer.linear1) is nn.Linear
    assert type(layer.self_attn) is nn.MultiheadAttention


def test_flattened_linear_gives_the_values_of_f_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 7, 5, 8), torch.randn(3, 8), torch.randn(3)
    runtime._GEMM[0] += 1
    try:
        flat = runtime.linear(x, w, b)
    finally:
        runtime._GEMM[0] -= 1
    assert flat.shape == (4, 7, 5, 3)
    torch.testing.assert_close(flat, nn.functional.linear(x, w, b))


class _ReadsItsLinear(nn.Module):
    """A forward that cannot take the switched class (it checks its layer's type), beside a
    stock attention that can be spelled out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.fc) is not nn.Linear:
            raise TypeError("this model wants its own nn.Linear")
        h = self.fc(x)
        return self.att(h, h, h, need_weights=False)[0]


@contextlib.contextmanager
def _unchanged(model):
    yield []


def test_a_failing_gemm_switch_keeps_the_spelled_out_attention(tmp_path, monkeypatch):
    x = torch.randn(3, 5, 8)
    torch.manual_seed(0)
    export_onnx(_ReadsItsLinear().eval(), x, tmp_path / "staged.onnx")
    staged = _ops(tmp_path / "staged.onnx")
    monkeypatch.setattr(onnx_export, "gemm_linears", _unchanged)  # the attention alone
    torch.manual_seed(0)
    export_onnx(_ReadsItsLinear().eval(), x, tmp_path / "attention.onnx")
    monkeypatch.setattr(onnx_export, "_spelled_out_attention", _unchanged)  # as it is
    torch.manual_seed(0)
    export_onnx(_ReadsItsLinear().eval(), x, tmp_path / "plain.onnx")
    assert staged["Gemm"] == 0
    assert staged == _ops(tmp_path / "attention.onnx")
    assert staged["Transpose"] < _ops(tmp_path / "plain.onnx")["Transpose"]
