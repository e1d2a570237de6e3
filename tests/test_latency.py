"""Latency helpers on models whose inputs are not float images: token ids, dynamic lengths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdrop.errors import InputError
from compressdrop.evaluation import ort_latency, torch_latency
from compressdrop.export import export_onnx


class TokenNet(nn.Module):
    """Token ids (batch, length) -> class logits: an embedding, a mean over positions, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


@pytest.fixture
def token_net() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet().eval()


def test_ort_latency_feeds_token_ids(tmp_path, token_net):
    path = tmp_path / "tokens.onnx"
    export_onnx(token_net, torch.randint(0, 50, (2, 12)), path, check_batch_sizes=(1,))
    rep = ort_latency(path, 5, threads=1, provider="cpu", warmup=1, repeats=3)
    assert rep.batch_size == 5 and rep.provider == "CPUExecutionProvider"
    assert 0 < rep.median_ms <= rep.p90_ms


def test_ort_latency_needs_the_length_of_a_dynamic_sequence(tmp_path, token_net):
    path = tmp_path / "tokens.onnx"
    example = torch.randint(0, 50, (2, 12))
    export_onnx(token_net, example, path, check_batch_sizes=(1,), check_lengths=(5,))
    with pytest.raises(InputError, match=r"dynamic dimension 1 .*length="):
        ort_latency(path, 2, threads=1, provider="cpu", warmup=1, repeats=2)
    rep = ort_latency(path, 2, threads=1, provider="cpu", warmup=1, repeats=2, length=7)
    assert rep.batch_size == 2 and rep.median_ms > 0


def test_torch_latency_draws_ids_like_the_example(token_net):
    rep = torch_latency(token_net, torch.randint(0, 50, (2, 12)), 4, warmup=1, repeats=2)
    assert rep.batch_size == 4 and rep.median_ms > 0
