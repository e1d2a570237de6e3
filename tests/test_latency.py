"""Latency helpers on models whose inputs are not float images: token ids, dynamic lengths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdrop.errors import InputError
from compressdrop.evaluation import ort_latency, torch_latency
from compressdrop.export import export_onnx, load_onnx_metadata


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


def test_ort_latency_ends_the_token_ids_with_the_eos_a_classifier_reads(tmp_path):
    """BART's classifier reads each row's state at its last <eos>: ort_latency fed rows of ones
    without one, and onnxruntime failed (a Gather at index -1 of nothing). export_onnx records
    the id (``eos_token_id``) and the rows end with it, as torch_latency's do; a file without the
    record takes it as ``eos_token_id=``; a bad one is refused by name."""
    import onnx

    transformers = pytest.importorskip("transformers")
    from compressdrop._torchvision import import_torchvision

    import_torchvision()
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BartForSequenceClassification(config).eval()
    ids = torch.randint(3, 64, (2, 8))
    ids[:, -1] = 2
    path = tmp_path / "bart.onnx"
    export_onnx(model, ids, path, check_batch_sizes=(1,))
    assert load_onnx_metadata(path)["eos_token_id"] == "2"
    rep = ort_latency(path, 3, threads=1, provider="cpu", warmup=1, repeats=2)
    assert rep.batch_size == 3 and rep.median_ms > 0
    proto = onnx.load(str(path))  # the same graph without compressdrop's metadata
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(Exception, match="Gather"):
        ort_latency(tmp_path / "plain.onnx", 3, threads=1, provider="cpu", warmup=0, repeats=1)
    rep = ort_latency(tmp_path / "plain.onnx", 3, threads=1, provider="cpu", warmup=1,
                      repeats=2, eos_token_id=2)  # fmt: skip
    assert rep.median_ms > 0
    with pytest.raises(InputError, match=r"eos_token_id must be a token id .* got -1"):
        ort_latency(path, 3, threads=1, provider="cpu", warmup=0, repeats=1, eos_token_id=-1)
