"""A model too big for the machine's memory is refused before it is read, with the file, the
estimate and the memory available in the message and no output written (the kernel's
out-of-memory killer ended such a run with "Killed" alone); the override lets it try, a model
that fits is untouched, and where the system does not say how much memory there is, nothing is
refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from compressdrop.checkpoint import save_model
from compressdrop.cli import main
from compressdrop.data import dataset
from compressdrop.errors import InputError
from compressdrop.models import build_model
from compressdrop.workflows import memory, prune_file
from compressdrop.workflows._weights import PT2_LOADING, weights_of


def _f32(tensors) -> int:
    return sum(4 * t.numel() if t.is_floating_point() else t.nbytes for t in tensors)


def _need(path, job: str) -> int:
    w = weights_of(path)
    assert w is not None
    return max(w.loading, int(memory.FACTORS[job][0] * w.model))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


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
    torch.save(net, tmp_path / "module.pt")  # a pickled module: read as itself, not built again
    w = weights_of(tmp_path / "module.pt")
    assert (w.model, w.loading) == (model, model)
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


def test_a_model_beyond_the_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.OVERRIDE, raising=False)
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    need = _need(tmp_path / "dense.pt", "export onnx")
    monkeypatch.setattr(dataset, "available_memory", lambda: need - 1)
    res = _cli("export", tmp_path / "dense.pt", "-o", tmp_path / "dense.onnx")
    assert res.exit_code == 1
    said = f"{need / 2**20:.1f} MB of memory"
    assert re.search(
        rf"Error: .*dense\.pt: exporting it to ONNX would take about {said}", res.output
    )
    assert f"than the {(need - 1) / 2**20:.1f} MB available" in res.output
    assert f"set {memory.OVERRIDE}=1 to try anyway" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]
    assert _cli("eval", tmp_path / "dense.pt", "--data", "digits").exit_code == 0  # it fits
    monkeypatch.setattr(
        dataset, "available_memory", lambda: _need(tmp_path / "dense.pt", "eval") - 1
    )
    res = _cli("eval", tmp_path / "dense.pt", "--data", "digits")
    assert res.exit_code == 1 and "dense.pt: evaluating it would take" in res.output
    monkeypatch.setattr(dataset, "available_memory", lambda: need - 1)
    monkeypatch.setenv(memory.OVERRIDE, "1")  # the user knows better
    assert _cli("export", tmp_path / "dense.pt", "-o", tmp_path / "dense.onnx").exit_code == 0
    assert (tmp_path / "dense.onnx").is_file()
    monkeypatch.delenv(memory.OVERRIDE)
    monkeypatch.setattr(dataset, "available_memory", lambda: need)  # just fits: untouched
    assert _cli("export", tmp_path / "dense.pt", "-o", tmp_path / "again.onnx").exit_code == 0
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "dense.onnx").read_bytes()


def test_training_is_counted_where_it_happens(tmp_path, monkeypatch):
    """prune with --data trains: Adam's state and the slim copy are counted on the CPU, not
    where the training state goes to a GPU; the refusal comes before the data are read."""
    monkeypatch.delenv(memory.OVERRIDE, raising=False)
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    train, prune = _need(tmp_path / "dense.pt", "sparsify"), _need(tmp_path / "dense.pt", "prune")
    assert train > prune
    monkeypatch.setattr(dataset, "available_memory", lambda: train - 1)
    monkeypatch.setattr(dataset.Dataset, "__post_init__", lambda self: pytest.fail("data read"))
    with pytest.raises(InputError, match=r"dense\.pt: training its gates and pruning it would"):
        prune_file(tmp_path / "dense.pt", tmp_path / "slim.pt", data="digits", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]
    memory.check_model_memory(tmp_path / "dense.pt", "sparsify", "cuda")  # host: prune's share
    with pytest.raises(InputError, match="training its gates"):
        memory.check_model_memory(tmp_path / "dense.pt", "sparsify", "cpu")


def test_nothing_is_refused_where_the_memory_is_not_known(tmp_path, monkeypatch):
    """No MemAvailable (another system), or a file whose headers do not say: no refusal, and
    a damaged file gets the loader's own error."""
    monkeypatch.delenv(memory.OVERRIDE, raising=False)
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    monkeypatch.setattr(dataset, "available_memory", lambda: 1)
    with pytest.raises(InputError, match="would take about"):
        memory.check_model_memory(tmp_path / "dense.pt", "eval")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    res = _cli("eval", tmp_path / "bad.pt", "--data", "digits")
    assert res.exit_code == 1 and "would take" not in res.output and "bad.pt" in res.output
    monkeypatch.setattr(dataset, "available_memory", lambda: None)
    memory.check_model_memory(tmp_path / "dense.pt", "sparsify", "cpu")
    assert _cli("eval", tmp_path / "dense.pt", "--data", "digits").exit_code == 0
