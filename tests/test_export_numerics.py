"""ONNX exports that onnxruntime must compute as PyTorch does: a small epsilon the exporter's
optimizer took for zero (``compressdrop/export/_optimizer.py``); a mismatch that tied
routing scores cause, named as such."""

import onnx
import pytest
import torch
from onnxscript import rewriter
from torch import nn

from compressdrop.export import ExportMismatchError, export_onnx


class _TinyNormLM(nn.Module):
    """Token ids → embedding (id 0 a padding row of zeros) → RMSNorm with a tiny ``eps`` →
    logits: Helium's (eps 1e-8) and Ergo's (1e-12) first layer, in small."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4, padding_idx=0)
        self.weight = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 8)
        self.eps = eps

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.head(self.weight * h)


def test_a_tiny_rms_norm_epsilon_survives_the_export(tmp_path):
    torch.manual_seed(0)
    model = _TinyNormLM(1e-8).eval()
    ids = torch.tensor([[0, 1, 2, 3, 4, 7], [5, 6, 0, 0, 7, 1]])  # padding rows: zeros
    assert torch.isfinite(model(ids)).all()
    # the check draws ids from 0..7 at batch 64 (384 tokens): padding ids among them
    rules = rewriter._DEFAULT_REWRITE_RULES
    report = export_onnx(model, ids, tmp_path / "m.onnx", check_batch_sizes=(2, 64))
    assert max(report.max_rel_error.values()) <= 1e-5
    assert rewriter._DEFAULT_REWRITE_RULES is rules  # onnxscript's optimizer as it was
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    eps = [
        onnx.numpy_helper.to_array(t).item()
        for t in graph.initializer
        if onnx.numpy_helper.to_array(t).size == 1
    ]
    assert any(0 < e <= 1e-8 for e in eps)  # the epsilon is a constant of the graph


class _TinyRouter(nn.Module):
    """Tokens → sigmoid router scores → the top 2 of 4 experts (one vector each), summed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 4, bias=False)
        self.experts = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = torch.topk(torch.sigmoid(self.gate(x)), 2, dim=-1).indices  # (B, T, 2)
        return x + self.experts[picked].sum(-2)


def test_a_mismatch_from_tied_routing_scores_says_so(tmp_path):
    torch.manual_seed(0)
    model = _TinyRouter().eval()
    x = torch.randn(2, 3, 4)
    export_onnx(model, x, tmp_path / "trained.onnx", check_batch_sizes=(1, 7))  # no ties: exact
    with torch.no_grad():
        model.gate.weight.zero_()  # AFMoE's initial router: every score 0.5
    with pytest.raises(ExportMismatchError, match=r"\d+ of the \d+ rows .* torch\.topk .* tie"):
        export_onnx(model, x, tmp_path / "tied.onnx", check_batch_sizes=(1, 7))
