"""DeepSeek's layout in Hugging Face decoders: multi-latent attention (DeepSeek-V2/V3, whose
heads are each a block of ``q_b_proj``, of ``kv_b_proj`` and of ``o_proj``, of three widths) and
a mixture of experts with a shared expert whose width is ``moe_intermediate_size`` times
``n_shared_experts`` (DeepSeek, GLM-4-MoE). A slim model's config follows it where it can, and
says why where it cannot. DeepSeek-V4's grouped output projection is left ungated, and says why."""

from __future__ import annotations

import warnings

import pytest
import torch

import compressdrop as cd

from .test_hf import VOCAB, check_against_masked
from .test_hf_families import MODELS, _build

transformers = pytest.importorskip("transformers")


def _attach(model, ids) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream
        cd.attach(model, "lognormal", example_inputs=ids)


def _keep(model, noisy: dict[int, list[int] | slice]) -> None:
    """Every gate quiet (SNR far above 1) but the units ``noisy[num_units]`` (far below)."""
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.fill_(-4.0)
            g.log_sigma[noisy[g.num_units]] = 3.0


# each key/value head keeps one query head; dense MLP 28 neurons of 48; each expert 16 of 24
# (expert-major, 4 experts) and the shared expert 16 of 24
UNIFORM = {
    4: [0, 3],
    48: slice(0, 20),
    96: [e * 24 + j for e in range(4) for j in range(8)],
    24: slice(0, 8),
}


def test_a_uniform_deepseek_v3_saves_fewer_latent_heads_that_reload(tmp_path):
    """DeepSeek-V3's heads are gated and removed exactly: each keeps its rows of q_b_proj
    (qk_head_dim each) and kv_b_proj (qk_nope_head_dim + v_head_dim) and its v_head_dim columns
    of o_proj, and its config's head counts follow (``head_dim``, its rotary part, stays);
    from_pretrained reloads the slim logits. Its heads had no gates."""
    model = _build("deepseek_v3")
    ids = torch.randint(3, VOCAB, (2, 8))
    _attach(model, ids)
    _keep(model, {**UNIFORM, 4: [0, 1]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)  # the config describes the slim model
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    c = slim.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, 4)
    assert (c.intermediate_size, c.moe_intermediate_size) == (28, 16)
    for layer in slim.model.layers:
        a = layer.self_attn
        assert a.q_b_proj.out_features == 2 * 8  # qk_head_dim 4 + 4
        assert a.kv_b_proj.out_features == 2 * (4 + 8)
        assert a.o_proj.in_features == 2 * 8
    check_against_masked(slim, model, 1.0)
    slim.save_pretrained(tmp_path / "slim")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, slim(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["glm4_moe", "deepseek_v2"])
def test_a_shared_expert_is_described_by_its_experts_width_or_the_user_reads_why(name, tmp_path):
    """The shared expert's width is ``moe_intermediate_size · n_shared_experts``: kept at the
    routed experts' width, the config's ``moe_intermediate_size`` follows both and the folder
    reloads; kept at another, the config cannot describe it, and prune says so (the experts'
    width was set alone, and from_pretrained refused the folder)."""
    ids = torch.randint(3, VOCAB, (2, 8))
    model = _build(name)
    _attach(model, ids)
    _keep(model, UNIFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    assert slim.config.moe_intermediate_size == 16
    slim.save_pretrained(tmp_path / "slim")
    back = getattr(transformers, MODELS[name][1]).from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, slim(input_ids=ids).logits)
    model = _build(name)
    _attach(model, ids)
    _keep(model, {**UNIFORM, 24: slice(0, 4)})  # the shared expert keeps 20
    with pytest.warns(cd.PruningWarning, match=r"moe_intermediate_size \[20, 16\]"):
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    assert slim.config.moe_intermediate_size == 24  # left describing the dense model


# DeepSeek-V4: one shared key/value head, a grouped low-rank output projection (o_a_proj: 2
# groups of 16 rows, its output (..., 2, 16)), hash-routed experts with a shared expert
DEEPSEEK_V4 = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 8, "qk_rope_head_dim": 4, "q_lora_rank": 16,
               "o_groups": 2, "o_lora_rank": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
               "n_shared_experts": 1, "moe_intermediate_size": 24, "sliding_window": 16,
               "max_position_embeddings": 64, "index_n_heads": 2, "index_head_dim": 8}  # fmt: skip


def test_deepseek_v4s_grouped_output_projection_is_left_ungated_and_the_rest_prunes_exactly():
    """``o_a_proj`` (a Linear whose forward views its 32 rows as 2 groups of 16) was given a gate
    of 32 units that its output of 16 features cannot take: prune's first forward pass failed
    ("LogNormalGate has 32 units but the input has 16 along dim 3"). Attach now leaves it
    ungated and says why; the experts' neurons are gated and removed exactly."""
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V4")
    torch.manual_seed(0)
    config = transformers.DeepseekV4Config(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2, **DEEPSEEK_V4)  # fmt: skip
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cd.attach(model, "lognormal", example_inputs=ids)
    why = [str(w.message) for w in said if "o_a_proj' left ungated" in str(w.message)]
    assert len(why) == 1 and "its gate would have 32 units" in why[0]
    assert "has 16 along dim -1 (shape (2, 8, 2, 16))" in why[0]
    gated = [n for n, _ in cd.named_gates(model)]
    assert "model.layers.0.mlp.experts" in gated and not [n for n in gated if "o_a_proj" in n]
    _keep(model, {96: [e * 24 + j for e in range(4) for j in range(8)], 24: slice(0, 8)})
    slim = cd.prune(model, 1.0, example_inputs=ids)
    assert slim.model.layers[0].mlp.shared_experts.up_proj.out_features == 16
    check_against_masked(slim, model, 1.0)
