"""What a Hugging Face folder may make compressdrop read, copy or fetch (a fifth security review):
a tokenizer file that links outside the folder was copied into the slim folder (``vocab.txt`` →
``/etc/passwd``; ``merges.txt`` → ``/proc/self/pagemap`` wrote gigabytes), a config's
``attn_implementation`` naming a Hub repository made transformers download and import a kernel,
and a config nested 200,000 deep raised a raw ``RecursionError``."""

from __future__ import annotations

import json
import os

import pytest

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError, InputError

from .test_hf_folder import _llama_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _llama_folder(tmp_path_factory.mktemp("hf") / "llama")


def _copy(folder, dst):
    dst.mkdir(parents=True)
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_tokenizer_file_linking_outside_the_folder_is_not_copied(source, tmp_path):
    from compressdrop.workflows import export_file

    secret = tmp_path / "secret.txt"
    secret.write_text("token=hf_secret")
    folder = _copy(source, tmp_path / "llama")
    os.symlink(secret, folder / "tokenizer.json")
    os.symlink("/proc/self/pagemap", folder / "merges.txt")  # gigabytes of a file, were copied
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    with pytest.warns(UserWarning, match="not copied: it links outside the model's folder") as said:
        export_file(folder, tmp_path / "slim")
    assert len(said) == 2
    assert not (tmp_path / "slim" / "tokenizer.json").exists()
    assert not (tmp_path / "slim" / "merges.txt").exists()
    assert (tmp_path / "slim" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'


def test_a_tokenizer_in_the_hub_cache_is_copied_through_its_links(source, tmp_path):
    """The Hub cache's snapshot folders hold links into the repository's ``blobs``."""
    from compressdrop.workflows import export_file

    repo = tmp_path / "models--org--llama"
    folder = _copy(source, repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text('{"version": "1.0"}')
    os.symlink("../../blobs/f00d", folder / "tokenizer.json")
    export_file(folder, tmp_path / "slim")
    assert (tmp_path / "slim" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (tmp_path / "slim" / "tokenizer.json").is_symlink()


@pytest.mark.parametrize(
    "fields",
    [
        {"attn_implementation": "kernels-community/flash-attn2"},
        {"_attn_implementation": "org/repo@main"},
        {"use_kernels": True},
        {"text_config": {"attn_implementation": "org/repo"}},
        {"attn_implementation": "flash_attention_2"},  # `kernels` fetches it without flash-attn
        {"quantization_config": {"quant_method": "fp8"}},
        {"sub_configs": [{"attn_implementation": "org/repo"}]},
        {"experts_implementation": "sonicmoe"},  # a mixture of experts' Hub kernel
        {"model_type": "rwkv"},  # its attention fetches its kernel when built on a GPU
    ],
)
def test_a_config_naming_a_kernel_to_download_is_refused(fields, source, tmp_path):
    folder = _copy(source, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(CheckpointError, match="names code for transformers to download"):
        load_model(folder)


def test_the_reference_net_refuses_a_kernel_to_download_and_takes_its_own():
    from compressdrop.models.hf import hf_causal_lm

    sizes = {"n_layer": 1, "n_embd": 16, "n_head": 2}
    with pytest.raises(InputError, match="names code to download"):
        hf_causal_lm((8,), 32, "gpt2", attn_implementation="kernels-community/flash-attn2", **sizes)
    model = hf_causal_lm((8,), 32, "gpt2", attn_implementation="eager", **sizes)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_past_the_recursion_limit_is_a_clear_error(name, source, tmp_path):
    folder = _copy(source, tmp_path / "llama")
    if name != "config.json":
        (folder / "model.safetensors").unlink()
    (folder / name).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match=f"{name}: not JSON"):
        load_model(folder)


# --- the data a model file records ----------------------------------------------------------------


def test_eval_reads_a_path_a_model_file_records_only_near_it(tmp_path, monkeypatch):
    """``eval`` without ``--data`` read the data a checkpoint recorded, wherever it was:
    ``text:/etc/passwd`` was scored as text, ``text:/usr,glob=**/*`` took 15 GB."""
    import numpy as np

    from compressdrop.checkpoint import save_model
    from compressdrop.errors import DataError
    from compressdrop.models import build_model
    from compressdrop.recipes import load_recipe
    from compressdrop.workflows import evaluate_file

    outside, near, work = tmp_path / "outside", tmp_path / "models", tmp_path / "work"
    for folder in (outside, near, work):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for folder in (outside, near):
        np.savez(folder / "d.npz", x=rng.random((20, 6)).astype(np.float32), y=np.arange(20) % 2)
    recipe = load_recipe("lenet300-lognormal").to_dict()
    model = build_model("lenet300", (6,), num_classes=2)
    monkeypatch.chdir(work)
    for where in (outside, near):
        recipe["data"]["name"] = str(where / "d.npz")
        save_model(model, near / f"{where.name}.pt", recipe=recipe)
    with pytest.raises(DataError, match=r"outside this folder and the model's.*pass --data"):
        evaluate_file(near / "outside.pt")
    assert evaluate_file(near / "outside.pt", data=str(outside / "d.npz"))["data"] == "d"
    assert evaluate_file(near / "models.pt")["data"] == "d"  # beside the model: read


def test_a_recorded_folder_that_links_out_or_hides_its_path_behind_a_comma_is_refused(
    tmp_path, monkeypatch
):
    """A review of the check above: a text folder beside the model holding a link to
    ``/etc/passwd`` was read, and ``text:c,x`` was checked as ``c`` where ``c,x`` was read."""
    from compressdrop.checkpoint import save_model
    from compressdrop.errors import DataError
    from compressdrop.models import build_model
    from compressdrop.recipes import load_recipe
    from compressdrop.workflows import evaluate_file

    secret = tmp_path / "secret.txt"
    secret.write_text("token=hf_secret " * 200)
    models = tmp_path / "models"
    (models / "corpus").mkdir(parents=True)
    (models / "corpus" / "a.txt").write_text("def f(x): return x\n" * 200)
    os.symlink(secret, models / "corpus" / "notes.txt")
    os.symlink(secret, models / "c,x")
    monkeypatch.chdir(models)
    recipe = load_recipe("lenet300-lognormal").to_dict()
    model = build_model("lenet300", (16,), num_classes=256)
    for name, spec in {"link": "text:corpus,context=16", "comma": "text:c,x,context=16"}.items():
        recipe["data"]["name"] = spec
        save_model(model, models / f"{name}.pt", recipe=recipe)
        with pytest.raises(DataError, match="or linking out of them, or unlisted"):
            evaluate_file(models / f"{name}.pt")


def test_a_tokenizer_a_model_file_records_is_read_only_near_it(tmp_path, monkeypatch):
    """``text:`` data record a ``tokenizer=`` path too (a Hugging Face folder's own); it was read
    wherever it pointed, past the check of the data's path (``tokenizer=/etc/...``)."""
    from compressdrop.checkpoint import save_model
    from compressdrop.errors import DataError
    from compressdrop.models import build_model
    from compressdrop.recipes import load_recipe
    from compressdrop.workflows import evaluate_file

    from .test_text_tokens import corpus, trained_tokenizer

    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    text = corpus(models / "corpus")
    texts = [p.read_text() for p in text.iterdir()]
    for where in (models, outside):
        trained_tokenizer(texts, where / "tokenizer.json", vocab=60)
    monkeypatch.chdir(models)
    recipe = load_recipe("lenet300-lognormal").to_dict()
    gpt = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 8}
    model = build_model("hf-causal-lm", (8,), num_classes=60, **gpt)
    for where in (models, outside):
        recipe["data"]["name"] = f"text:corpus,context=8,tokenizer={where / 'tokenizer.json'}"
        save_model(model, models / f"{where.name}.pt", recipe=recipe)
    with pytest.raises(DataError, match=r"outside this folder and the model's.*pass --data"):
        evaluate_file(models / "outside.pt")
    assert evaluate_file(models / "models.pt")["data"] == "text:corpus"  # beside it: read


def test_a_folder_dressed_as_the_hub_cache_cannot_link_its_blobs_elsewhere(source, tmp_path):
    """A review of the copy above: ``blobs`` was trusted wherever it pointed, so a shipped
    folder of ``blobs -> ~/.ssh`` and ``snapshots/main/vocab.txt -> ../../blobs/id_rsa`` had the
    key copied into the slim folder."""
    from compressdrop.workflows import export_file

    keys = tmp_path / "ssh"
    keys.mkdir()
    (keys / "id_rsa").write_text("PRIVATE KEY")
    repo = tmp_path / "models--org--llama"
    folder = _copy(source, repo / "snapshots" / "main")
    os.symlink(keys, repo / "blobs")
    os.symlink("../../blobs/id_rsa", folder / "vocab.txt")
    with pytest.warns(UserWarning, match="not copied: it links outside the model's folder"):
        export_file(folder, tmp_path / "slim")
    assert not (tmp_path / "slim" / "vocab.txt").exists()


def test_a_folder_loads_without_transformers_hub_kernels(source):
    """transformers turns ``use_kernels`` on when the ``kernels`` package is installed, and a
    later ``train()`` swaps Hub layers in on a GPU: compressdrop loads with it off."""
    model = load_model(source)
    assert getattr(model, "use_kernels", False) is False


def test_an_index_naming_a_shard_that_is_no_file_is_refused_before_it_is_opened(source, tmp_path):
    """A shard that was a FIFO (``tar`` carries them) blocked ``load_model`` without end in the
    shard's open."""

    from safetensors import safe_open

    folder = _copy(source, tmp_path / "llama")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors").unlink()
    shard = "model-00001-of-00001.safetensors"
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.mkfifo(folder / shard)
    done = _load_elsewhere(folder)  # (a hang, on the old code: the timeout ends it)
    assert f"names shards that are not files of the folder (['{shard}'])" in done.stdout, done


def _load_elsewhere(folder):
    """``load_model(folder)`` in a process of its own, with a timeout; what it says on stdout."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom compressdrop.checkpoint import load_model\n"
        "try:\n    load_model(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120
    )


def test_a_config_that_describes_more_than_the_weights_hold_is_refused(
    source, tmp_path, monkeypatch
):
    """transformers makes up the weights a folder lacks at its config's sizes: a 100 KB folder
    whose config said ``vocab_size: 20000000`` and held no embedding took 5.3 GB."""
    from safetensors.torch import load_file, save_file

    from compressdrop import hf_files

    monkeypatch.setattr(hf_files, "SPARE_WEIGHTS", 1 << 16, raising=False)  # (the bound is new)
    assert load_model(source).arch["name"] == "hf-causal-lm"  # every weight there: loads
    folder = _copy(source, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 40_000}))
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "embed" not in k and "lm_head" not in k}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"describes a model of 2,575,520 parameters"):
        load_model(folder)


def test_a_config_of_more_layers_than_the_weights_number_is_refused_before_a_build(
    source, tmp_path
):
    """transformers builds a config's layers one by one, on the ``meta`` device too:
    ``num_hidden_layers: 1e30`` in a folder of two layers never ended (nor did the parameter
    count above, which builds the model)."""

    folder = _copy(source, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**30}))
    done = _load_elsewhere(folder)  # (a hang, on the old code: the timeout ends it)
    assert f"describes {10**30:,} layers, its safetensors files number 2" in done.stdout, done
    nested = {**config, "text_config": {"num_layers": 13}}  # a sub-config's count too
    (folder / "config.json").write_text(json.dumps(nested))
    with pytest.raises(CheckpointError, match=r"describes 13 layers, .* number 2"):
        load_model(folder)
