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
#: earlier check refuses those), and what its config cannot describe
LATE = {
    "phi3": (*MODELS["phi3"], None, r"Phi3Config .*mlp\.gate_up_proj\.weight is \(94, 32\)"),
    "gpt_neox": (*MODELS["gpt_neox"], None, r"GPTNeoXConfig .*mlp\.dense_h_to_4h"),
    "persimmon": (*MODELS["persimmon"], None, r"PersimmonConfig .*mlp\.dense_h_to_4h"),
    "gpt_bigcode": (*MODELS["gpt_bigcode_multi_query"], None, r"GPTBigCodeConfig .*mlp\.c_fc"),
    "xglm": (*MODELS["xglm"], None, r"XGLMConfig .*fc1\.weight is \(47, 32\)"),
    "opt": ("OPTConfig", "OPTForCausalLM", OPT, None, r"OPTConfig .*fc1\.weight is \(47, 32\)"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", GPTJ, None, r"GPTJConfig .*mlp\.fc_in"),
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        GPTJ,
        "CodeGenAttention",
        r"CodeGenConfig .*mlp\.fc_in\.weight is \(127, 32\)",
    ),
    # BLOOM's MLP width is 4 · hidden_size, no field of its own
    "bloom": (*MODELS["bloom"], "BloomAttention", r"BloomConfig .*dense_h_to_4h\.weight"),
}
SAVES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA),
    "phi": MODELS["phi"],
    "starcoder2": MODELS["starcoder2"],
}


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
    ``exclude`` that leaves those units alone."""
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
    assert events == [] and not out.exists()


@pytest.mark.parametrize("name", list(SAVES))
def test_a_family_whose_config_follows_passes_and_its_folder_reloads(tmp_path, name):
    """The dry run refuses nothing that saves: these families' heads and MLP neurons pass the
    check, and their uniform prune writes a folder from_pretrained reloads with its shapes."""
    from compressdrop.hf_folder import save_hf_folder
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
    _, err = save_hf_folder(slim, out, ids)
    back = getattr(transformers, model_cls).from_pretrained(out)
    assert err <= 1e-4
    assert {k: v.shape for k, v in back.state_dict().items()} == {
        k: v.shape for k, v in slim.state_dict().items()
    }
