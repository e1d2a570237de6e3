"""Rotary positions in complex form (DeepSeek-V2's and Llama-4's ``apply_rotary_emb``) export to
ONNX with their complex values written as real ones (``compressdrop/export/_complex.py``); a
complex operation that rewrite does not know is an error that names the cause."""

import pytest
import torch
from torch import nn

from compressdrop.export import ExportError, export_onnx


class _ComplexRotary(nn.Module):
    """Queries rotated as Llama-4 rotates them: ``torch.polar`` angles, ``view_as_complex``, a
    complex product (with an ``unsqueeze``, which the ONNX exporter has no complex form of)."""

    def __init__(self, after: str = "") -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)  # (no Gemm to try first)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)  # (B, T, 8)
        angles = torch.arange(x.shape[1]).float()[:, None] * self.inv_freq  # (T, 4)
        freqs = torch.polar(torch.ones_like(angles), angles) * 1.0
        q_ = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))  # (B, T, 4) complex
        z = q_ * freqs.unsqueeze(0)
        if self.after == "exp":
            z = torch.exp(z)
        return torch.view_as_real(z).flatten(2) + q


def test_complex_rotary_positions_export_with_real_tensors(tmp_path):
    torch.manual_seed(0)
    model = _ComplexRotary().eval()
    x = torch.randn(2, 5, 8)
    report = export_onnx(model, x, tmp_path / "m.onnx", check_batch_sizes=(1, 3))
    assert max(report.max_rel_error.values()) <= 1e-5


def test_a_complex_operation_not_written_says_what_to_do(tmp_path):
    model = _ComplexRotary(after="exp").eval()
    with pytest.raises(ExportError, match=r"complex tensors .* not aten\.exp.*export_program"):
        export_onnx(model, torch.randn(2, 5, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
