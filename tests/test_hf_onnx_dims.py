"""The ONNX export's dynamic dimensions: kept dynamic where the model's code allows (a chunked
scan, as Bamba's and Qwen3-Next's), and where the code fixes one (a loop over the tokens, as
RWKV's), checked only at the size the graph takes, with a warning and a
metadata entry that name it, not onnxruntime's "Got invalid dimensions for input"."""

import json
from types import SimpleNamespace

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressdrop.export import ExportWarning, export_onnx, load_onnx_metadata


class _Chunked(nn.Module):
    """Token ids embedded, padded to whole chunks of 32, each chunk mixed with the earlier ones
    by a lower-triangular (chunks, chunks) product: the shape handling of Mamba-2's chunked scan
    (Bamba's); its config bounds the length below one chunk, as the survey's Bamba (64 tokens,
    chunks of 256). A named ``Dim`` for the length failed on guards torch.export could not prove
    over that range, and the ONNX exporter fixed the length at the example's."""

    config = SimpleNamespace(max_position_embeddings=16)

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        b, n, d = h.shape
        h = F.pad(h, (0, 0, 0, (32 - n % 32) % 32)).reshape(b, -1, 32, d)  # (B, chunks, 32, D)
        s = h.sum(2)  # (B, chunks, D)
        mix = torch.einsum("bnd,bmd->bnm", s, s).tril()  # (B, chunks, chunks)
        h = h + 0.01 * torch.einsum("bnm,bmcd->bncd", mix, h)
        return self.out(h.reshape(b, -1, d)[:, :n])


class _Loop(nn.Module):
    """A recurrence written as a Python loop over the tokens (RWKV's on the CPU): torch.export
    unrolls it, fixing the length at the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        state, outs = torch.zeros_like(h[:, 0]), []
        for t in range(h.shape[1]):
            state = 0.5 * state + h[:, t]
            outs.append(state)
        return self.out(torch.stack(outs, 1))


def _input_dims(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def test_a_chunked_scan_keeps_its_length_dynamic(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 8))
    path = tmp_path / "chunked.onnx"
    rep = export_onnx(_Chunked().eval(), ids, path, check_batch_sizes=(1, 3), check_lengths=(3, 13))
    assert set(rep.max_rel_error) == {1, 3, "length 3", "length 13"}
    assert max(rep.max_rel_error.values()) <= 1e-4
    assert all(isinstance(d, str) for d in _input_dims(path))  # both dimensions symbolic
    assert "input_dims" not in load_onnx_metadata(path)


def test_a_loop_over_the_tokens_fixes_the_length_and_says_so(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 8))
    path = tmp_path / "loop.onnx"
    said = r"dimension 1 of 'ids' \(the sequence length\) fixed at 8, not dynamic from 2"
    with pytest.warns(ExportWarning, match=said):
        rep = export_onnx(_Loop().eval(), ids, path, check_batch_sizes=(1, 3), check_lengths=(5,))
    assert set(rep.max_rel_error) == {1, 3}  # the lengths it does not take are not checked
    assert max(rep.max_rel_error.values()) <= 1e-4
    assert isinstance(_input_dims(path)[0], str) and _input_dims(path)[1] == 8
    assert json.loads(rep.metadata["input_dims"]) == {"ids": {"1": [8, 8]}}
    assert load_onnx_metadata(path)["input_dims"] == rep.metadata["input_dims"]
