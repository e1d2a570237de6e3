"""A slim-folder plan that no config can describe is refused before training, for every family:
a dry run on the meta device cuts one step of each kind of gated unit and asks the check that
``save_hf_folder`` runs (``compressdrop/hf_plan.py``). These families trained for the whole run
and were refused only when the folder was written; the families whose config compressdrop
brings to the slim shape still pass, and their short prune writes a folder that reloads."""

from __future__ import annotations

import warnings

import pytest
import torch

from compressdrop.checkpoint import load_model
from compressdrop.errors import InputError

from .test_hf_families import LLAMA, MODELS
from .test_hf_folder import RECIPE, _text, _uniform_slim

transformers = pytest.importorskip("transformers")

OPT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 48,
       "max_position_embeddings": 64, "word_embed_proj_dim": 32}  # fmt: skip
GPTJ = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4}
#: family → its tiny config, the heads left ungated where the config derives their size (the
#: earlier check refuses those), and what its config cannot describe: BLOOM's MLP width (4 ·
#: hidden_size, no field of its own); the others' heads (their MLP width now follows, FOLLOWS;
#: Phi-3's too, its packed gate_up_proj gated per neuron)
LATE = {
    "phi3": (*MODELS["phi3"], None, r"Phi3Config .*self_attn\.o_proj\.weight is \(32, 16\)"),
    "gpt_neox": (*MODELS["gpt_neox"], None, r"GPTNeoXConfig .*attention\.query_key_value"),
    "persimmon": (*MODELS["persimmon"], None, r"PersimmonConfig .*self_attn\.query_key_value"),
    "gpt_bigcode": (*MODELS["gpt_bigcode_multi_query"], None, r"GPTBigCodeConfig .*attn\.c_attn"),
    "xglm": (*MODELS["xglm"], None, r"XGLMConfig .*k_proj\.weight is \(24, 32\)"),
    "opt": ("OPTConfig", "OPTForCausalLM", OPT, None, r"OPTConfig .*k_proj\.weight is \(24, 32\)"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", GPTJ, None, r"GPTJConfig .*attn\.k_proj"),
    "bloom": (*MODELS["bloom"], "BloomAttention", r"BloomConfig .*dense_h_to_4h\.weight"),
}
#: family → its tiny config, its attention class (the heads a folder cannot hold fewer of) and
#: the config field that gives its MLP width
FOLLOWS = {
    "gpt_neox": (*MODELS["gpt_neox"], "GPTNeoXAttention", "intermediate_size"),
    "opt": ("OPTConfig", "OPTForCausalLM", OPT, "OPTAttention", "ffn_dim"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", GPTJ, "GPTJAttention", "n_inner"),
    "gpt_bigcode": (*MODELS["gpt_bigcode_multi_query"], "GPTBigCodeAttention", "n_inner"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", GPTJ, "CodeGenAttention", "n_inner"),
    "xglm": (*MODELS["xglm"], "XGLMAttention", "ffn_dim"),
    "persimmon": (*MODELS["persimmon"], "PersimmonAttention", "intermediate_size"),
    "phi3": (*MODELS["phi3"], "Phi3Attention", "intermediate_size"),  # gated per neuron
}
SAVES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA),
    "phi": MODELS["phi"],
    "starcoder2": MODELS["starcoder2"],
    # GLM's config carries head_dim (its packed gate_up_proj is gated per neuron)
    "glm": MODELS["glm"],
    "glm4": MODELS["glm4"],
}


def _saved_and_reloaded(slim, out, ids, model_cls: str):
    """``slim`` saved as a folder and loaded back by transformers alone: the same shapes."""
    from compressdrop.hf_folder import save_hf_folder

    _, err = save_hf_folder(slim, out, ids)
    back = getattr(transformers, model_cls).from_pretrained(out).eval()
    assert err <= 1e-4
    assert {k: v.shape for k, v in back.state_dict().items()} == {
        k: v.shape for k, v in slim.state_dict().items()
    }
    return back


def _folder(path, config_cls: str, model_cls: str, sizes: dict):
    config = getattr(transformers, config_cls)(
        vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None, **sizes
    )
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(LATE))
def test_a_plan_whose_config_cannot_follow_is_refused_before_training(tmp_path, name):
    """Each of these families was trained and then refused by save_hf_folder: its config has
    no field compressdrop updates for the slim widths. The refusal comes before the recipe
    event now (nothing is trained, nothing written), in save_hf_folder's words, with the
    ``exclude`` that leaves those units alone: where the MLP width follows (FOLLOWS), the
    heads alone."""
    from compressdrop.workflows import prune_file

    config_cls, model_cls, sizes, heads, says = LATE[name]
    folder = _folder(tmp_path / name, config_cls, model_cls, sizes)
    recipe = RECIPE.replace(
        "kl_cost: flops", f"kl_cost: flops, exclude: [{heads}]" if heads else "kl_cost: flops"
    )
    (tmp_path / "tiny.yaml").write_text(recipe)
    out, events = tmp_path / "slim", []
    with (
        pytest.raises(InputError, match="cannot update the model's " + says) as e,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        prune_file(
            folder, out, recipe=str(tmp_path / "tiny.yaml"),
            data=f"text:{_text(tmp_path / 'corpus')},context=16", uniform=True,
            progress=events.append,
        )  # fmt: skip
    assert "Refused before training" in str(e.value) and "gates.exclude: [" in str(e.value)
    if name in FOLLOWS:
        assert f"gates.exclude: [{FOLLOWS[name][3]!r}]" in str(e.value)
    assert events == [] and not out.exists()


@pytest.mark.parametrize("name", list(SAVES))
def test_a_family_whose_config_follows_passes_and_its_folder_reloads(tmp_path, name):
    """The dry run refuses nothing that saves: these families' heads and MLP neurons pass the
    check, and their uniform prune writes a folder from_pretrained reloads with its shapes."""
    from compressdrop.hf_plan import check_folder_plan

    config_cls, model_cls, sizes = SAVES[name]
    folder = _folder(tmp_path / name, config_cls, model_cls, sizes)
    ids = torch.randint(256, (2, 16))
    out = tmp_path / "slim"
    model = load_model(folder)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    check_folder_plan(out, model, {"gate": "lognormal"}, True, ids)
    kept = model.state_dict()  # cut on a meta copy, not here
    assert {k: v.shape for k, v in kept.items()} == shapes and not any(
        v.is_meta for v in kept.values()
    )
    slim = _uniform_slim(load_model(folder), ids)
    assert slim.num_parameters() < model.num_parameters()
    _saved_and_reloaded(slim, out, ids, model_cls)


@pytest.mark.parametrize("name", list(FOLLOWS))
def test_a_uniform_mlp_prune_of_these_families_writes_a_folder_that_reloads(tmp_path, name):
    """These families' MLP width is a config field (GPT-NeoX's ``intermediate_size``, OPT's
    ``ffn_dim``, GPT-J's ``n_inner``...), which compressdrop now sets to the slim width: with the heads left
    ungated, the plan passes the check before training, and the uniform prune writes a folder
    from_pretrained reloads with the slim shapes and the slim model's logits."""
    from compressdrop.hf_plan import check_folder_plan

    config_cls, model_cls, sizes, attention, field = FOLLOWS[name]
    folder = _folder(tmp_path / name, config_cls, model_cls, sizes)
    ids = torch.randint(256, (2, 16))
    out = tmp_path / "slim"
    model = load_model(folder)
    dense = getattr(model.config, field) or 4 * model.config.hidden_size  # (None: 4 · n_embd)
    check_folder_plan(out, model, {"gate": "lognormal", "exclude": [attention]}, True, ids)
    slim = _uniform_slim(load_model(folder), ids, exclude=[attention])
    assert slim.num_parameters() < model.num_parameters()
    back = _saved_and_reloaded(slim, out, ids, model_cls)
    assert 0 < getattr(back.config, field) < dense
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, slim(ids).logits)


@pytest.mark.parametrize("name", list(FOLLOWS))
def test_free_mlp_widths_of_these_families_are_refused_as_free_widths(tmp_path, name):
    """A free prune (each layer keeps its own number of neurons) still writes no folder: one
    config field cannot give several widths, and save_hf_folder says so (it said the config
    could not be updated at all)."""
    import compressdrop as cd
    from compressdrop.hf_folder import save_hf_folder

    config_cls, model_cls, sizes, attention, field = FOLLOWS[name]
    model = load_model(_folder(tmp_path / name, config_cls, model_cls, sizes))
    ids = torch.randint(256, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cd.attach(model, "lognormal", exclude=[attention], example_inputs=ids)
    with torch.no_grad():  # layer 0 keeps more neurons than layer 1
        for i, (_, gate) in enumerate(cd.named_gates(model)):
            gate.mu.copy_(torch.linspace(-3, 3, gate.mu.numel()) + (2.0 if i == 0 else -2.0))
        thr = float(torch.cat([g.snr() for _, g in cd.named_gates(model)]).median())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = cd.prune(model, thr, uniform=False, example_inputs=ids).eval()
    with pytest.raises(InputError, match=f"the layers keep different widths \\({field} \\["):
        save_hf_folder(slim, tmp_path / "slim", ids)
    assert not (tmp_path / "slim").exists()


@pytest.mark.parametrize("name", ["gpt_neox", "opt"])
def test_a_recipe_run_on_pythia_or_opt_writes_a_folder_that_reloads(tmp_path, name):
    """The whole run, as ``compressdrop prune my-model/ --uniform -o slim/`` makes it, with the
    heads left ungated in the recipe: trained, pruned, fine-tuned and written, where the check
    before training refused it; the folder reloads in plain transformers at the slim MLP width."""
    from compressdrop.workflows import prune_file

    config_cls, model_cls, sizes, attention, field = FOLLOWS[name]
    folder = _folder(tmp_path / name, config_cls, model_cls, sizes)
    recipe = RECIPE.replace("kl_cost: flops", f"kl_cost: flops, exclude: [{attention}]")
    (tmp_path / "tiny.yaml").write_text(recipe)
    out = tmp_path / "slim"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_file(
            folder, out, recipe=str(tmp_path / "tiny.yaml"),
            data=f"text:{_text(tmp_path / 'corpus')},context=16", uniform=True,
        )  # fmt: skip
    dense = getattr(transformers, model_cls).from_pretrained(folder)
    back = getattr(transformers, model_cls).from_pretrained(out)
    assert 0 < getattr(back.config, field) < getattr(dense.config, field)
    assert back.num_parameters() < dense.num_parameters()


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "heads_excluded"])
@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "mixtral"])
def test_the_dry_run_traces_a_mixture_of_experts_and_agrees_with_save_hf_folder(
    tmp_path, name, heads
):
    """Fused experts run ``grouped_mm``, which has no float32 meta kernel: the dry run's meta
    copy could not be traced, and Qwen2-MoE's shared expert (cut through Torch-Pruning's graph)
    was left to save_hf_folder after the whole training. The meta copy is bfloat16 now: every
    kind of unit is cut on it (the shared expert by one neuron), and the answer before training,
    a folder can hold it, is save_hf_folder's on the real uniform prune, which reloads."""
    from compressdrop.gating.groups import find_groups
    from compressdrop.hf_folder import folder_problem
    from compressdrop.hf_plan import _by_exclude_pattern, _cut, check_folder_plan

    config_cls, model_cls, sizes = MODELS[name]
    folder = _folder(tmp_path / name, config_cls, model_cls, sizes)
    ids = torch.randint(256, (2, 16))
    exclude = None if heads else [config_cls.replace("Config", "Attention")]
    model = load_model(folder)
    groups = find_groups(model, ids, exclude=exclude, warn=False)
    cuts = {p: _cut(model, gs, ids) for p, gs in _by_exclude_pattern(model, groups).items()}
    assert "model.layers.*.mlp.experts" in cuts and None not in cuts.values()
    assert {p: folder_problem(cut) for p, cut in cuts.items()} == dict.fromkeys(cuts)
    if name == "qwen2_moe":  # traced on the meta copy: one neuron of each shared expert cut
        layers = cuts["model.layers.*.mlp.shared_expert.up_proj"].model.layers
        assert [layer.mlp.shared_expert.down_proj.in_features for layer in layers] == [47, 47]
    out = tmp_path / "slim"
    check_folder_plan(out, model, {"gate": "lognormal", "exclude": exclude}, True, ids)
    slim = _uniform_slim(load_model(folder), ids, exclude=exclude)
    assert slim.num_parameters() < model.num_parameters()
    _saved_and_reloaded(slim, out, ids, model_cls)
