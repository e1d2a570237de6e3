"""Hugging Face model folders in and out (``compressdrop.hf_folder``): a causal LM's folder
(config.json + safetensors) loads with the library's own classes only, is sparsified on text and
pruned to a uniform shape, and the slim folder reloads with ``from_pretrained`` in a process
without compressdrop, giving the slim model's logits."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch

from compressdrop.checkpoint import load_model
from compressdrop.data import DataWarning
from compressdrop.errors import CheckpointError, InputError
from compressdrop.hf_files import CONFIG_BYTES, check_shards
from compressdrop.workflows._weights import weights_of

from .test_hf import logits_elsewhere
from .test_text_tokens import trained_tokenizer

transformers = pytest.importorskip("transformers")

RECIPE = """
name: tiny-lm
model: {arch: hf-causal-lm}
data: {name: digits, batch_size: 16, val_fraction: 0.1}
gates: {family: lognormal, kl_cost: flops}
kl: {beta: 8.0, warmup: 0}
stages:
  pretrain: {epochs: 1}
  sparsify: {epochs: 3, lr: 0.001, gate_lr: 0.1}
  finetune: {epochs: 1, lr: 0.0003}
export: {onnx: false}
"""


def _folder(path, model_cls: str, config_cls: str, **sizes):
    """A byte-vocabulary causal LM of ``sizes``, random weights (seed 0), saved at ``path``."""
    config = getattr(transformers, config_cls)(
        vocab_size=256, bos_token_id=None, eos_token_id=None, **sizes
    )
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    return path


def _llama_folder(path):
    return _folder(
        path, "LlamaForCausalLM", "LlamaConfig", hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        max_position_embeddings=64,
    )  # fmt: skip


def _text(path, words_per_file: int = 200):
    gen = torch.Generator().manual_seed(0)
    words = [b"def ", b"return ", b"self", b"(x)", b":\n    ", b" = ", b"import os\n"]
    path.mkdir()
    for i in range(24):
        idx = torch.randint(len(words), (words_per_file,), generator=gen).tolist()
        (path / f"m{i}.py").write_bytes(f"# file {i}\n".encode() + b"".join(words[j] for j in idx))
    return path


def test_a_folder_loads_with_an_arch_record_and_its_own_weights(tmp_path):
    folder = _llama_folder(tmp_path / "llama")
    model = load_model(folder)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.arch["name"] == "hf-causal-lm" and model.arch["num_classes"] == 256
    assert model.arch["kwargs"]["model_type"] == "llama"
    json.dumps(model.arch)  # plain data: a checkpoint stores it


def test_loading_and_writing_a_folder_draw_no_progress_bars(tmp_path, capfd):
    """transformers' "Loading weights: 100%|████|" bars came between the CLI's own lines; they
    are off while compressdrop loads and writes a folder, and as they were afterwards."""
    from transformers.utils import logging as tf_logging

    from compressdrop.hf_folder import save_hf_folder

    folder = _llama_folder(tmp_path / "llama")
    capfd.readouterr()
    model = load_model(folder)
    ids = torch.randint(256, (2, 9))
    save_hf_folder(model, tmp_path / "out", ids)
    out, err = capfd.readouterr()
    assert "it/s" not in out + err and "%|" not in out + err
    assert tf_logging.is_progress_bar_enabled()


def test_prune_folder_sparsifies_on_text_and_writes_a_folder_that_reloads_alone(tmp_path):
    from compressdrop.data import load_dataset
    from compressdrop.workflows import evaluate_file, prune_file

    folder = _llama_folder(tmp_path / "llama")
    corpus = _text(tmp_path / "corpus", words_per_file=600)  # (3 bytes a token: as many windows)
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    trained_tokenizer(texts, folder / "tokenizer.json", vocab=60)  # the model's own tokens
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    out = tmp_path / "slim"
    events: list[dict] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # (the residual stream is left ungated: LayerNorm)
        res = prune_file(
            folder,
            out,
            recipe=str(tmp_path / "tiny.yaml"),
            data=f"text:{corpus},context=16",
            uniform=True,
            progress=events.append,
        )
    # trained on the text in its tokenizer's ids, not bytes (a DataWarning said it was bytes)
    assert not [w for w in seen if issubclass(w.category, DataWarning)]
    assert {"event": "tokenizer", "folder": str(folder)} in events  # (said to the CLI's user)
    recipe = next(e["recipe"] for e in events if e["event"] == "recipe")
    assert recipe.data.name == f"text:{corpus},context=16,tokenizer={folder.resolve()}"
    assert res.files.paths["hf_folder"] == out and res.files.max_rel_error["hf_folder"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    dense = json.loads((folder / "config.json").read_text())
    assert (config["num_attention_heads"], config["intermediate_size"]) < (4, 48)
    assert config["num_attention_heads"] * 2 <= dense["num_attention_heads"] * 2  # whole groups
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert res.summary["architecture_before"] != res.summary["architecture_after"]
    ids = torch.randint(256, (2, 16))
    with torch.no_grad():
        want = res.slim.eval()(ids).logits
    got = logits_elsewhere(out, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # the slim folder records its data: eval scores it there by default, in the same tokens
    said: list[str] = []
    scored = evaluate_file(out, announce=said.append)
    assert recipe.data.name in said[0] and scored["data"] == "text:corpus"
    assert scored["n"] == load_dataset(recipe.data.name).y_test.numel()


def test_eval_of_a_folder_reads_the_text_in_the_folders_own_tokens(tmp_path):
    """``eval my-llama/ --data text:...`` scored the model on byte ids; the folder's
    tokenizer.json encodes the text now, and bits per byte divide by its bytes per token."""
    import math

    from compressdrop.data import load_text
    from compressdrop.workflows import evaluate_file

    folder = _llama_folder(tmp_path / "llama")
    corpus = _text(tmp_path / "corpus")
    trained_tokenizer([p.read_text() for p in sorted(corpus.iterdir())], folder / "tokenizer.json")
    said: list[str] = []
    res = evaluate_file(folder, f"text:{corpus},context=8", device="cpu", announce=said.append)
    assert said == [f"data: the text in the tokens of {folder}'s tokenizer.json"]
    ds = load_text(corpus, context=8, tokenizer=folder)
    assert ds.bytes_per_token > 2 and res["n"] == ds.y_test.numel()
    assert res["bits_per_byte"] == pytest.approx(res["nll"] / math.log(2) / ds.bytes_per_token)
    as_bytes = evaluate_file(folder, f"text:{corpus},context=8,tokenizer=bytes", device="cpu")
    assert as_bytes["n"] == load_text(corpus, context=8).y_test.numel() > res["n"]


def test_folders_that_would_run_code_or_lose_shape_are_refused(tmp_path):
    folder = _llama_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"x": "evil.Model"}}))
    with pytest.raises(CheckpointError, match="names its own code"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"without config\.json"):
        load_model(tmp_path / "empty")


def test_a_shape_the_config_cannot_describe_writes_no_folder(tmp_path):
    import compressdrop as cd
    from compressdrop.hf_folder import save_hf_folder

    config = transformers.GPT2Config(
        vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(256, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cd.attach(model, "lognormal", example_inputs=ids)
    for _, gate in cd.named_gates(model):  # one head of every layer's attention goes
        if gate.num_units == 4:
            with torch.no_grad():
                gate.log_sigma[0] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config cannot describe 3 heads of 8 in n_embd 32
        slim = cd.prune(model, example_inputs=ids)
    with pytest.raises(InputError, match="cannot write a Hugging Face folder"):
        save_hf_folder(slim, tmp_path / "out", ids)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_cli_prunes_a_gated_checkpoint_into_a_folder(tmp_path):
    """``compressdrop prune gated.pt --uniform -o FOLDER``: a checkpoint of a gated model loaded
    from a folder (its arch record rebuilds it) is pruned into a folder that reloads."""
    from click.testing import CliRunner

    import compressdrop as cd
    from compressdrop.checkpoint import save_model
    from compressdrop.cli import main

    model = load_model(_llama_folder(tmp_path / "llama"))
    ids = torch.randint(256, (2, 12))
    model.arch["input_shape"] = [12]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream stays ungated (RMSNorm)
        cd.attach(model, "lognormal", example_inputs=ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.uniform_(-3, 1)
    save_model(model, tmp_path / "gated.pt")
    out = tmp_path / "slim"
    args = ["prune", str(tmp_path / "gated.pt"), "-o", str(out), "--uniform", "--json"]
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="gets no tokenizer files"):
        warnings.simplefilter("ignore", cd.GatingWarning)  # re-attached on load: the same warning
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert (
        report["files"]["hf_folder"] == str(out)
        and report["max_rel_error_files"]["hf_folder"] <= 1e-4
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in model.parameters())
    assert json.loads((out / "compressdrop.json").read_text())["architecture_after"]
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="no tokenizer"):
        warnings.simplefilter("ignore", cd.GatingWarning)  # an earlier run's folder is replaced
        assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    bad = CliRunner().invoke(main, ["prune", str(tmp_path / "gated.pt"), "-o", "x.txt"])
    assert bad.exit_code == 2 and "or a folder name" in bad.output
    again = CliRunner().invoke(main, ["export", str(out), "-o", str(tmp_path / "copy"), "--json"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "copy" / "config.json").read_text() == (out / "config.json").read_text()


def test_a_classifier_folder_is_not_read_as_a_causal_lm(tmp_path):
    """bert has a causal-LM class in transformers, so a BertForSequenceClassification folder was
    loaded as BertLMHeadModel (its classifier dropped, a new LM head drawn) and trained as a
    language model, silently."""
    config = transformers.BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, num_labels=3,
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=r"BertForSequenceClassification.*not a causal"):
        load_model(tmp_path / "bert")


def test_a_folder_output_never_replaces_a_folder_compressdrop_did_not_write(tmp_path):
    """`-o NAME` replaced whatever folder was there: another folder's files, or the model's own
    folder given as the output. Only a slim folder from an earlier run (it holds
    compressdrop.json) is replaced now, and the refusal comes before any training."""
    from compressdrop.workflows import prune_file

    folder = _llama_folder(tmp_path / "llama")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("important")
    for out in (folder, tmp_path / "other"):
        with pytest.raises(InputError, match="compressdrop did not write"):
            prune_file(folder, out, data="no-such-data-is-read", uniform=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "important"
    assert (folder / "model.safetensors").is_file()


def test_a_bfloat16_folder_is_rebuilt_in_float32(tmp_path):
    """The arch record kept the config's `dtype`, so every rebuild (the run's template, the slim
    model reloaded after training) was bfloat16: the .pt2 export failed after all the training,
    a .pt or a folder came out in bfloat16 despite the PrecisionWarning."""
    from compressdrop.arch import build_arch

    folder = _llama_folder(tmp_path / "llama")
    back = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    back.save_pretrained(tmp_path / "bf16")
    model = load_model(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # as the folder holds it
    assert not {"dtype", "torch_dtype"} & set(model.arch["kwargs"])
    assert {p.dtype for p in build_arch(model.arch).parameters()} == {torch.float32}


def _uniform_slim(model, ids, exclude=None):
    """``model`` gated (all but ``exclude``), its SNRs spread, pruned uniform at the median."""
    import compressdrop as cd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream (LayerNorm) stays ungated
        cd.attach(model, "lognormal", exclude=exclude, example_inputs=ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, gate in cd.named_gates(model):
            gate.mu.add_(torch.empty_like(gate.mu).uniform_(-2, 2))
    thr = float(torch.cat([g.snr().detach() for _, g in cd.named_gates(model)]).median())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cd.prune(model, thr, uniform=True, example_inputs=ids).eval()


def test_a_sequence_classifier_writes_a_folder_that_reloads_as_its_own_class(tmp_path, monkeypatch):
    """A BertForSequenceClassification is checked by reloading it as itself (it was reloaded as
    a causal LM, a raw RuntimeError); a reload that fails is a CheckpointError, nothing written."""
    from compressdrop.hf_folder import save_hf_folder

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(64, (2, 8))
    slim = _uniform_slim(model, ids, exclude=["BertAttention", "*pooler*"])
    umask = os.umask(0o022)
    try:
        _, err = save_hf_folder(slim, tmp_path / "out", ids)
    finally:
        os.umask(umask)
    assert err <= 1e-4
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # as mkdir makes it, not 0700
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] < 48
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, slim(ids).logits, atol=1e-5)

    def refuse(*args, **kwargs):
        raise RuntimeError("size mismatch")

    monkeypatch.setattr(transformers.BertForSequenceClassification, "from_pretrained", refuse)
    with pytest.raises(CheckpointError, match="does not load back as a BertForSequenceClass"):
        save_hf_folder(slim, tmp_path / "again", ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_family_whose_config_is_not_updated_writes_no_folder(tmp_path):
    """OPT: compressdrop cannot set its config to the pruned shape, so the folder is refused
    before anything is written (it failed in transformers' reload with a size table)."""
    from compressdrop.hf_folder import save_hf_folder

    config = transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
        max_position_embeddings=32, word_embed_proj_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(64, (2, 8))
    slim = _uniform_slim(transformers.OPTForCausalLM(config).eval(), ids)
    with pytest.raises(InputError, match=r"cannot update the model's OPTConfig.*\.pt2"):
        save_hf_folder(slim, tmp_path / "out", ids)
    assert not list(tmp_path.iterdir())


def test_a_folder_written_from_a_folder_keeps_its_tokenizer_files(tmp_path):
    """The slim folder had the model's weights and config but not the source folder's tokenizer,
    so `AutoTokenizer.from_pretrained(slim)` failed (a new-user walk)."""
    from compressdrop.workflows import export_file

    folder = _llama_folder(tmp_path / "llama")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "notes.txt").write_text("not a tokenizer file")
    export_file(folder, tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "copy" / name).read_text() == (folder / name).read_text()
    assert not (tmp_path / "copy" / "notes.txt").exists()


def _gpt2_folder(path):
    return _folder(
        path, "GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64
    )


def test_a_plan_no_config_describes_is_refused_before_training(tmp_path):
    """A GPT-2 folder pruned free, or with its heads gated, to a folder: trained for nothing
    and refused only when the folder was written (GPT-2's config derives the head size from
    n_embd / n_head). Both are refused now before any training, and nothing is written; the
    heads left ungated, as the message says, pass the check."""
    from compressdrop.hf_plan import check_folder_plan
    from compressdrop.workflows import prune_file

    folder = _gpt2_folder(tmp_path / "gpt2")
    data = f"text:{_text(tmp_path / 'corpus')},context=16"
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    out, events = tmp_path / "slim", []
    for uniform, says in ((False, "pass --uniform"), (True, r"exclude: \[GPT2Attention\]")):
        with pytest.raises(InputError, match=says), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the residual stream is left ungated (LayerNorm)
            prune_file(
                folder, out, recipe=str(tmp_path / "tiny.yaml"), data=data, uniform=uniform,
                progress=events.append,
            )  # fmt: skip
    assert events == [] and not out.exists()
    # the way out the message gives: the heads left ungated (a folder of a uniform MLP-only
    # prune of GPT-2 reloads: test_hf.py::test_uniform_shape_saves_a_standard_config_that_...)
    gates = {"gate": "lognormal", "exclude": ["GPT2Attention"]}
    ids = torch.randint(256, (2, 16))
    model = load_model(folder)
    before = [type(m) for m in model.modules()]
    check_folder_plan(out, model, gates, True, ids)
    assert [type(m) for m in model.modules()] == before  # traced, not gated
    # free is refused where several layers could keep different widths (a review); one layer's
    # MLP alone passed that test, but its slim width differs from the ungated layers' and
    # save_hf_folder refused it after training: the dry run (hf_plan.py) refuses it before
    with pytest.raises(InputError, match="free prune of several layers"):
        check_folder_plan(out, model, gates, False, ids)
    # and the way out is not --uniform, which the message said (a uniform prune of one layer
    # leaves it as narrow as before): every layer's MLP gated, or none
    for uniform in (False, True):
        with pytest.raises(InputError) as refused:
            check_folder_plan(out, model, {**gates, "include": ["*h.0.mlp*"]}, uniform, ids)
        said = str(refused.value)
        assert re.search(
            r"'transformer\.h\.\*\.mlp\.c_fc' are gated in 1 of the layers, and cutting them "
            r"leaves the layers at different widths \(n_inner \[127, 128\]\); .*gate those "
            r"units in every layer .* or in none \(gates\.exclude: \['transformer\.h\.\*\.mlp"
            r"\.c_fc'\]\)",
            said,
        ), said
        assert "uniform=True" not in said and "--uniform" not in said


@pytest.mark.parametrize(
    "layout", [{"multi_query": True}, {"new_decoder_architecture": True, "num_kv_heads": 2}]
)
def test_a_falcon_plan_is_refused_before_training_and_its_mlp_writes_a_folder(tmp_path, layout):
    """Falcon's config derives the head size from hidden_size / num_attention_heads, and
    compressdrop did not update its ``ffn_hidden_size``: a plan that gated its heads passed the
    check before training and every slim folder was refused after it. Its heads are refused
    before training now, with the way out; that way (its MLP alone, uniform) writes a folder
    whose config says the slim width and which from_pretrained reloads."""
    from compressdrop.hf_folder import save_hf_folder
    from compressdrop.hf_plan import check_folder_plan

    folder = _folder(
        tmp_path / "falcon", "FalconForCausalLM", "FalconConfig", hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, **layout,
    )  # fmt: skip
    ids = torch.randint(256, (2, 16))
    out = tmp_path / "slim"
    with pytest.raises(InputError, match=r"FalconConfig derives their size from hidden_size / "
                       r"num_attention_heads.*exclude: \[FalconAttention\]"):  # fmt: skip
        check_folder_plan(out, load_model(folder), {"gate": "lognormal"}, True, ids)
    gates = {"gate": "lognormal", "exclude": ["FalconAttention"]}
    check_folder_plan(out, load_model(folder), gates, True, ids)
    slim = _uniform_slim(load_model(folder), ids, exclude=["FalconAttention"])
    widths = {
        m.dense_h_to_4h.out_features for m in slim.modules() if type(m).__name__ == "FalconMLP"
    }
    assert len(widths) == 1 and max(widths) < 128  # (the config's ffn_hidden_size: 4 · 32)
    _, err = save_hf_folder(slim, out, ids)
    assert err <= 1e-5
    assert json.loads((out / "config.json").read_text())["ffn_hidden_size"] < 128
    again = transformers.FalconForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want, got = slim(ids).logits, again(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_an_index_of_shards_must_name_safetensors_files_of_the_folder(tmp_path):
    """A security review: an index naming a pickled ``.bin`` shard made transformers try to
    unpickle it (its weights-only unpickler refused, as a raw traceback that advised turning it
    off). Sharded safetensors still load."""
    config = transformers.LlamaConfig(
        vocab_size=256, bos_token_id=None, eos_token_id=None, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert not (folder / "model.safetensors").exists()
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(load_model(folder)(ids).logits, model.eval()(ids).logits)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in ("pytorch_model-00001-of-00001.bin", "../elsewhere.safetensors"):
        bad = {**index, "weight_map": {k: shard for k in index["weight_map"]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=r"not safetensors files of the folder.*pickled"):
            load_model(folder)
    (folder / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"index\.json: not a JSON object"):
        load_model(folder)
    # read through the bounded reader of config.json: the memory check, which reads the index
    # before the folder is loaded, blocked on a FIFO there (`compressdrop eval` hung) and read a
    # file of any size
    (folder / "model.safetensors.index.json").unlink()
    os.mkfifo(folder / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a file"):
        check_shards(folder)  # (pytest would hang here before)
    assert weights_of(folder) is None  # no estimate: the load's own check says what is wrong
    (folder / "model.safetensors.index.json").unlink()
    with open(folder / "model.safetensors.index.json", "wb") as f:
        f.truncate(CONFIG_BYTES + 1)  # sparse: no disk taken
    with pytest.raises(CheckpointError, match=r"index\.json: over 64 MB"):
        load_model(folder)


def test_a_pickled_model_is_told_before_training_that_no_folder_can_come_of_it(tmp_path):
    """A new-user walk: a pickled GPT-2 (``--trust-pickle``) is recorded as a torch.export
    program, so its slim model is rebuilt without a config; ``-o FOLDER`` trained for the whole
    recipe and only then said that a folder is for transformers models."""
    from click.testing import CliRunner

    from compressdrop.cli import main

    config = transformers.GPT2Config(
        vocab_size=256, n_layer=1, n_embd=16, n_head=2, n_positions=32, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.save(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2.pt")
    args = ["prune", tmp_path / "gpt2.pt", "--trust-pickle", "--data", "digits", "--uniform"]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "slim"]])
    assert res.exit_code == 1, res.output
    assert "read from a pickled module" in res.output and "save_pretrained" in res.output
    assert "epoch" not in res.output and not (tmp_path / "slim").exists()


def test_a_pickled_classifier_is_not_told_to_save_a_folder_that_is_refused(tmp_path):
    """A pickled BERT classifier was told to save_pretrained and prune that folder, which is
    refused (a folder must hold a causal LM): the advice went round in a circle."""
    from click.testing import CliRunner

    from compressdrop.cli import main

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    torch.save(transformers.BertForSequenceClassification(config), tmp_path / "bert.pt")
    args = ["prune", tmp_path / "bert.pt", "--trust-pickle", "--data", "digits", "--uniform"]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "slim"]])
    assert res.exit_code == 1, res.output
    assert "--arch module:function" in res.output and "save_pretrained" not in res.output
    assert not (tmp_path / "slim").exists()


def _with_tokenizer(folder):
    """``folder`` with a real (byte-level BPE, tiny) tokenizer saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(i): i for i in range(97, 123)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


def test_a_checkpoint_carries_its_folders_tokenizer_into_the_slim_folder(tmp_path):
    """A gated checkpoint (a --keep-gated file) carried no tokenizer, so the slim folder written
    from it had none (a warning said to copy them by hand). The files are read with the folder
    and kept in every checkpoint of the model."""
    from click.testing import CliRunner

    import compressdrop as cd
    from compressdrop.checkpoint import save_model
    from compressdrop.cli import main

    folder = _with_tokenizer(_llama_folder(tmp_path / "llama"))
    model = load_model(folder)
    model.arch["input_shape"] = [12]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream stays ungated
        cd.attach(model, "lognormal", example_inputs=torch.randint(256, (2, 12)))
    save_model(model, tmp_path / "gated.pt")
    (folder / "tokenizer.json").unlink()  # the folder is gone or changed: the checkpoint's own
    args = ["prune", str(tmp_path / "gated.pt"), "-o", str(tmp_path / "slim"), "--uniform"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # re-attached on load: the same warning
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "slim").iterdir())
    assert "tokenizer.json" in written and "tokenizer_config.json" in written, written
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "slim")
    assert tok("abc")["input_ids"] == [97, 98, 99]


def test_an_empty_tokenizer_file_is_carried_too(tmp_path):
    """Review 11: an empty file (``added_tokens.json`` of nothing) made every checkpoint of the
    model fail to save (``torch.frombuffer`` takes no empty buffer)."""
    from compressdrop.checkpoint import save_model

    folder = _llama_folder(tmp_path / "llama")
    (folder / "added_tokens.json").write_bytes(b"")
    (folder / "vocab.txt").write_text("a\nb\n")
    model = load_model(folder)
    assert model.tokenizer_files == {"added_tokens.json": b"", "vocab.txt": b"a\nb\n"}
    save_model(model, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt").tokenizer_files == model.tokenizer_files
