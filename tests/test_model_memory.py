"""What a model file's weights take in memory, read from its headers without loading it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compressdrop.workflows._weights import PT2_LOADING, weights_of


def _f32(tensors) -> int:
    return sum(4 * t.numel() if t.is_floating_point() else t.nbytes for t in tensors)


def test_the_weights_are_read_from_the_files_headers_in_float32(tmp_path):
    """Every format's bytes against the module's own: bfloat16 counted as the float32 the jobs
    make of it; a training script's save holds the optimizer's state beside the model, read
    first, but only the model is what the job then trains."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.ReLU(), torch.nn.Linear(50, 20))
    model = _f32(net.state_dict().values())
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    w = weights_of(tmp_path / "sd.pt")
    assert (w.model, w.loading) == (model, 2 * model)  # the dict, then the module built
    bf16 = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    torch.save(bf16, tmp_path / "bf16.pt")
    save_file(bf16, tmp_path / "bf16.safetensors")
    assert (tmp_path / "bf16.pt").stat().st_size < model
    for name in ("bf16.pt", "bf16.safetensors"):
        w = weights_of(tmp_path / name)
        assert (w.model, w.loading) == (model, 2 * model), name
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 100)).sum().backward()
    opt.step()
    saved = {"epoch": 3, "model_state_dict": net.state_dict(), "optimizer": opt.state_dict()}
    torch.save(saved, tmp_path / "run.pt")
    adam = _f32(t for s in opt.state_dict()["state"].values() for t in s.values())
    w = weights_of(tmp_path / "run.pt")
    assert (w.model, w.loading) == (model, 2 * model + adam)
    program = torch.export.export(net, (torch.randn(2, 100),))
    torch.export.save(program, tmp_path / "net.pt2")
    w = weights_of(tmp_path / "net.pt2")
    assert model <= w.model <= model + 64 * 1024  # its entries as stored: graph and records too
    assert w.loading == int(PT2_LOADING * w.model)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    assert weights_of(tmp_path / "bad.pt") is None  # the loader says what is wrong
    assert weights_of(tmp_path / "missing.pt") is None


def test_a_hugging_face_folders_shards_add_up(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path / "llama"
    llama.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # in two shards and their index instead
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    w = weights_of(folder)
    model = _f32(state.values())
    assert (w.model, w.loading) == (model, model)  # shard by shard into the model
