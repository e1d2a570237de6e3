"""Hugging Face families beyond LLaMA, GPT-2 and BERT (``benchmarks/bench_hf_families.py``
surveys them all): their heads and MLP neurons are gated and removed exactly, with nothing to
patch by hand, and a pruned decoder generates what the masked one does.

Registered here: the decoders whose attention is LLaMA's (OLMo, Granite, Cohere with per-head q/k
norms, StableLM with per-head q/k LayerNorms, StarCoder2, Phi, GLM and GLM-4, Mixtral's and
Qwen2-MoE's attention; SmolLM3, Seed-OSS, EXAONE-4, GraniteSWA, Arcee, GLM-4-MoE, Llama-4,
Qwen3-Next with a gate per head in its q_proj, Beam with a gate_proj per head), DeepSeek-V2/V3's
multi-latent attention (``tests/test_hf_latent.py``), Phi-3's packed ``qkv_proj``, GPT-NeoX's and
Persimmon's ``query_key_value`` (each head's q, k and v rows together), Falcon's in its three
layouts, GPT-BigCode's in its two, the heads of XGLM, ModernBERT, DistilBERT, RoFormer, Megatron-
BERT, RoBERTa-PreLayerNorm, Data2Vec-Text, LayoutLM, MarkupLM, X-MOD, RemBERT, XLM, FlauBERT, CTRL,
OpenAI GPT, ModernBERT-decoder, ALBERT and DeBERTa (v1 to v3), and BLOOM's GELU written as a
formula; the encoders EuroBERT, Ultrabert, GTE, NomicBERT and Jina-Embeddings-v3 (LLaMA's
attention); the fused experts of Mixtral, Qwen2-MoE and OLMoE (``tests/test_hf_experts.py``).
OLMo-2's, OLMo-3's and OLMoE's attention is registered only to say why their heads stay (q/k norms
over all heads).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gating.gated import HeadGated

from .test_hf import ENCODER, TOKENS, VOCAB, _attach_and_prune, check_against_masked

transformers = pytest.importorskip("transformers")

LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}  # fmt: skip
DEBERTA = {**ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
           "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True}  # fmt: skip
FALCON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 64}  # fmt: skip
DEBERTA_V1 = {**ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
              "max_relative_positions": 16}  # fmt: skip
BIGCODE = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
XLM = {"emb_dim": 32, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64}
# a mixture of experts after one dense layer, with one shared expert (DeepSeek's layout)
SHARED_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
              "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}  # fmt: skip
GLM4_MOE = {**SHARED_MOE, "head_dim": 8, "use_qk_norm": True}
# multi-latent attention: one key/value head per query head, a rotary part of 4 features
MLA = {**SHARED_MOE, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16,
       "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "head_dim": 4}  # fmt: skip
MODELS = {
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA),
    "granite": ("GraniteConfig", "GraniteForCausalLM", LLAMA),
    # per-head q/k norms: Cohere's a weight row per head, StableLM's a LayerNorm per head (the
    # key's follow their query heads where each has its own key/value head)
    "cohere": ("CohereConfig", "CohereForCausalLM", {**LLAMA, "use_qk_norm": True}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 {**LLAMA, "num_key_value_heads": 4, "qk_layernorm": True}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", LLAMA),
    "phi": ("PhiConfig", "PhiForCausalLM", {**LLAMA, "num_key_value_heads": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA),
    # GLM and GLM-4: LLaMA's attention with an explicit head_dim (its default 128) and rotary
    # positions on half of each head's features; Phi-3's packed gate_up_proj (gated per neuron)
    "glm": ("GlmConfig", "GlmForCausalLM", {**LLAMA, "head_dim": 8}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {**LLAMA, "head_dim": 8}),
    # mixtures of experts: fused experts' neurons (tests/test_hf_experts.py); OLMoE's q/k
    # norms span all heads (its heads stay)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**LLAMA, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {**LLAMA, "num_experts": 4, "num_experts_per_tok": 2}),
    # OLMo-2: LLaMA's MLP, q/k norms over all heads (its heads stay)
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    # one query_key_value holding each head's q, k and v rows together (Pythia's layout)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**LLAMA, "num_key_value_heads": 4}),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM",
                  {**LLAMA, "num_key_value_heads": 4, "qk_layernorm": True}),
    # Falcon's one query_key_value in each of its layouts; with ALiBi, each layer selects its
    # heads' planes of the bias the model folds into the mask (test_hf_position_bias.py)
    **{
        f"falcon_{layout}": ("FalconConfig", "FalconForCausalLM", {**FALCON, **extra})
        for layout, extra in {
            "multi_query": {"multi_query": True},
            "multi_head": {"multi_query": False},
            "grouped": {"new_decoder_architecture": True, "num_kv_heads": 2},
            "grouped_one_each": {"new_decoder_architecture": True, "num_kv_heads": 4},
            "alibi": {"multi_query": False, "alibi": True},
        }.items()
    },
    # GPT-BigCode's one c_attn, multi-query (StarCoder 1) and multi-head
    **{
        f"gpt_bigcode_{layout}": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                                  {**BIGCODE, "multi_query": layout == "multi_query"})
        for layout in ("multi_query", "multi_head")
    },
    # XGLM: BART's attention, its reshapes reading num_heads and embed_dim
    "xglm": ("XGLMConfig", "XGLMForCausalLM", {"d_model": 32, "num_layers": 2,
             "attention_heads": 4, "ffn_dim": 48, "max_position_embeddings": 64}),
    # BERT's attention: RoFormer's and Megatron-BERT's as BERT's modules, ALBERT's in one module
    # shared by its layers
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", ENCODER),
    "megatron_bert": ("MegatronBertConfig", "MegatronBertForSequenceClassification", ENCODER),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", {**ENCODER, "embedding_size": 16}),
    # ModernBERT: one Wqkv packed [q; k; v] (its config's token ids put inside the vocabulary)
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   {**ENCODER, "cls_token_id": 1, "sep_token_id": 2}),
    # DeBERTa-v3's disentangled attention: relative positions through query_proj and key_proj,
    # or (share_att_key off) through per-head pos_query_proj and pos_key_proj, cut with them
    "deberta_v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification", DEBERTA),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {**DEBERTA, "share_att_key": False}),
    # DeBERTa v1: one in_proj with each head's q, k and v rows together, per-head q/v biases and
    # position projections; its talking heads mix the heads (they stay)
    "deberta_v1": ("DebertaConfig", "DebertaForSequenceClassification", DEBERTA_V1),
    "deberta_v1_talking": ("DebertaConfig", "DebertaForSequenceClassification",
                           {**DEBERTA_V1, "talking_head": True}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48,
                    "max_position_embeddings": 64, "num_labels": 3}),
    # LLaMA's attention, new to the registry (benchmarks/survey_hf_causal_lm.py found them
    # ungated): SmolLM3 without rotary positions on every second layer, Seed-OSS and EXAONE-4
    # keeping head counts of their own (EXAONE-4 with per-head q/k norms and sliding windows),
    # GraniteSWA's attention sinks, Arcee's ReLU² MLP (no gate_proj), OLMo-3's q/k norms over
    # all heads (its heads stay)
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {**LLAMA, "no_rope_layer_interval": 2}),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", {**LLAMA, "head_dim": 8}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {**LLAMA, "sliding_window": 4}),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", {**LLAMA, "sliding_window": 4}),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", {**LLAMA, "head_dim": 8}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", LLAMA),
    # NanoChat's q/k norms per head after the rotary positions, and its fc1/fc2 MLP; HY-V3's
    # mixture of experts with a shared expert (both registered after the survey)
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", LLAMA),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM",
              {**LLAMA, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
               "moe_intermediate_size": 24, "num_shared_experts": 1}),
    # mixtures of experts: GLM-4-MoE's dense first layer, per-head q/k norms and a shared
    # expert; Llama-4's router, a Linear that answers a tuple (scores, experts)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {**LLAMA, **GLM4_MOE}),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    {**LLAMA, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                     "intermediate_size_mlp": 48}),
    # Qwen3-Next: each head's query rows followed by its output gate's, between Gated DeltaNet
    # layers; a mixture of experts with a shared expert
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   {**LLAMA, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"],
                    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                    "shared_expert_intermediate_size": 48}),
    # Beam: a sigmoid gate per head feature (gate_proj) and a bias per head, cut with the head
    "beam": ("BeamConfig", "BeamForCausalLM", {**LLAMA, "head_dim": 8, "sliding_window": 4}),
    # RoBERTa-PreLayerNorm: BERT's heads, normed before them
    "roberta_prelayernorm": ("RobertaPreLayerNormConfig",
                             "RobertaPreLayerNormForSequenceClassification", ENCODER),
    # BERT's modules under other names: Data2Vec-Text (in the data2vec package), LayoutLM and
    # MarkupLM (their layout and markup embeddings at zero), X-MOD (a language adapter after
    # each MLP, that of a language the batch does not hold called on no rows) and RemBERT
    # (embeddings narrower than its layers)
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification", ENCODER),
    "layoutlm": ("LayoutLMConfig", "LayoutLMForSequenceClassification", ENCODER),
    "markuplm": ("MarkupLMConfig", "MarkupLMForSequenceClassification", ENCODER),
    "xmod": ("XmodConfig", "XmodForSequenceClassification",
             {**ENCODER, "languages": ["en_XX", "de_DE"], "default_language": "de_DE"}),
    "rembert": ("RemBertConfig", "RemBertForSequenceClassification",
                {**ENCODER, "input_embedding_size": 16, "output_embedding_size": 16}),
    # XLM's and FlauBERT's attention (n_heads, head_dim), CTRL's (reshapes by -1), OpenAI GPT's
    # (GPT-2's packed c_attn, split by split_size)
    "xlm": ("XLMConfig", "XLMWithLMHeadModel", XLM),
    "flaubert": ("FlaubertConfig", "FlaubertForSequenceClassification", {**XLM, "num_labels": 3}),
    "ctrl": ("CTRLConfig", "CTRLLMHeadModel", {**BIGCODE, "dff": 48}),
    "openai": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", BIGCODE),
    # ModernBERT-decoder: q/k/v projections into Wo; its GLU MLP's packed Wi (input; gate)
    "modernbert_decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM",
                           {**ENCODER, "global_attn_every_n_layers": 1}),
    # encoders with LLaMA's attention: EuroBERT's (grouped-query), GTE's (a key/value head each)
    "eurobert": ("EuroBertConfig", "EuroBertForSequenceClassification",
                 {**LLAMA, "num_labels": 3}),
    "gte": ("GteConfig", "GteForSequenceClassification", {**ENCODER, "head_dim": 8}),
    "ultrabert": ("UltrabertConfig", "UltrabertForSequenceClassification",
                  {**LLAMA, "num_labels": 3}),
    "nomic_bert": ("NomicBertConfig", "NomicBertForSequenceClassification", ENCODER),
    "jina_embeddings_v3": ("JinaEmbeddingsV3Config", "JinaEmbeddingsV3ForSequenceClassification",
                           ENCODER),
    # multi-latent attention: DeepSeek-V3's low-rank query (q_b_proj), DeepSeek-V2's full q_proj
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**LLAMA, **MLA}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    {**LLAMA, **MLA, "q_lora_rank": None}),
}  # fmt: skip
# what gets gates: heads, MLP neurons (OLMo-2's and OLMoE's q/k norms span all heads)
GATED = {
    "olmo2": (False, True),
    "olmo3": (False, True),
    "olmoe": (False, True),
    "deberta_v1_talking": (False, True),
}


def _build(name: str):
    config_cls, model_cls, sizes = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TOKENS, **sizes)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_and_mlp_neurons_prune_exactly(name):
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    dense = model.num_parameters()
    slim, thr = _attach_and_prune(model, ids)
    heads = [n for n, m in model.named_modules() if isinstance(m, HeadGated)]
    mlp = [n for n, _ in cd.named_gates(model) if n not in heads and ".0." in n]
    assert (bool(heads), bool(mlp)) == GATED.get(name, (True, True)), (heads, mlp)
    assert slim.num_parameters() < dense
    check_against_masked(slim, model, thr, causal="CausalLM" in MODELS[name][1])


@pytest.mark.parametrize("name", ["olmo2", "olmoe", "olmo3"])
def test_heads_under_norms_across_all_heads_stay_and_the_user_reads_why(name):
    """OLMo-2's, OLMoE's and OLMo-3's q_norm and k_norm are RMSNorms over all heads together: no head can
    go exactly, so each attention keeps its heads, and attach says why for each (OLMo-2's were
    left without a word); their MLP neurons are gated."""
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    _say_each_layer_keeps_its_heads(
        caught,
        "its q_norm and k_norm are RMSNorms over all heads together, so removing a head would "
        "change the others' norms",
    )
    assert not any(isinstance(m, HeadGated) for m in model.modules())


def _say_each_layer_keeps_its_heads(caught, why: str) -> None:
    """Attach warned once per layer (two) that its attention keeps its heads, for ``why``."""
    said = [str(w.message) for w in caught if "keeps all its heads" in str(w.message)]
    assert said == [
        f"compressdrop: attention 'model.layers.{i}.self_attn' keeps all its heads: {why}"
        for i in range(2)
    ]


def test_bitnets_norms_after_its_heads_and_neurons_keep_both_and_the_user_reads_why():
    """BitNet norms its heads' outputs together (``attn_sub_norm``) and its MLP's neurons
    (``ffn_sub_norm``), and its residual stream is normed too: nothing goes exactly. Its heads
    were refused for Torch-Pruning's step budget (k_proj, v_proj: "more than 50,000 steps");
    attach now says what keeps them."""
    if not hasattr(transformers, "BitNetForCausalLM"):
        pytest.skip("this transformers has no BitNet")
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(**TOKENS, **LLAMA)).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cd.GatingWarning)
        with pytest.raises(InputError, match="no gateable layer found"):
            cd.attach(model, "lognormal", example_inputs=ids)
    _say_each_layer_keeps_its_heads(
        caught,
        "its attn_sub_norm is an RMSNorm over all heads' outputs together (before o_proj), so "
        "removing a head would change the others' scale",
    )


def test_a_slim_olmo2_saves_a_config_that_reloads(tmp_path):
    """OLMo-2's MLP is LLaMA's: once pruned to one width in every layer, the config's
    ``intermediate_size`` follows (it stayed dense, and from_pretrained refused the folder)."""
    model = _build("olmo2")
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    with torch.no_grad():  # each MLP keeps 28 of its 48 neurons
        for _, g in cd.named_gates(model):
            g.log_sigma.fill_(-4.0)  # quiet: SNR far above 1
            g.log_sigma[:20] = 3.0  # noisy: far below
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)  # the config describes the slim model
        slim = cd.prune(model, 1.0, example_inputs=ids)
    assert slim.config.intermediate_size == 28
    assert [layer.mlp.up_proj.out_features for layer in slim.model.layers] == [28, 28]
    slim.save_pretrained(tmp_path / "slim")
    again = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        want, got = slim(input_ids=ids).logits, again(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["glm", "glm4"])
def test_a_uniform_glm_saves_fewer_heads_and_neurons_that_reload_and_export(name, tmp_path):
    """GLM's config carries ``head_dim`` (LLaMA's, not Phi-3's derived one): a uniform prune of
    heads and packed MLP neurons writes a config with the slim head counts and width, which
    from_pretrained reloads with the slim logits, and the slim model exports to ONNX. Its rotary
    positions cover half of each head's features (``partial_rotary_factor``), per head: the
    slim model equals the masked one."""

    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    slim = _uniform_slim(model, ids, noisy_neurons=20)  # each MLP keeps 28 neurons
    c = slim.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, 8)
    assert c.intermediate_size == 28
    assert [layer.mlp.gate_up_proj.out_features for layer in slim.model.layers] == [56, 56]
    check_against_masked(slim, model, 1.0)
    err = _saved_and_reloaded(slim, MODELS[name][1], tmp_path, ids)
    rep = cd.export_onnx(slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3))
    assert err <= 1e-4 and max(rep.max_rel_error.values()) <= 1e-4


def _uniform_slim(model, ids, noisy_neurons: int):
    """``model`` gated, its gates set so that each key/value head keeps one query head (heads 0
    and 3 noisy) and each MLP loses its first ``noisy_neurons``, pruned uniformly; the prune
    may not warn (the config describes the slim model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.fill_(-4.0)  # quiet: SNR far above 1
            g.log_sigma[[0, 3] if g.num_units == 4 else slice(0, noisy_neurons)] = 3.0  # noisy
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)
        return cd.prune(model, 1.0, example_inputs=ids, uniform=True)


def _saved_and_reloaded(slim, model_cls: str, tmp_path, ids) -> float:
    """``slim`` written as a Hugging Face folder, reloaded with ``model_cls.from_pretrained``:
    the same logits; the writer's own check's error."""
    from compressdrop.hf_folder import save_hf_folder

    _, err = save_hf_folder(slim, tmp_path / "slim", ids)
    back = getattr(transformers, model_cls).from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, slim(input_ids=ids).logits)
    return err


def test_phi3_heads_keep_the_shared_config_dense():
    """Phi-3's forward reads ``config.num_attention_heads``: each pruned attention gets a config
    of its own; the model's config describes the slim shape only where every layer agrees."""
    model = _build("phi3")
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, _ = _attach_and_prune(model, ids)
    heads = [a.self_attn.config.num_attention_heads for a in slim.model.layers]
    assert sum(heads) < 8
    for layer, h in zip(slim.model.layers, heads, strict=True):
        a = layer.self_attn  # [q (h·D); k (2·D); v (2·D)], o_proj reads h·D
        assert a.qkv_proj.out_features == (h + 4) * a.head_dim
        assert a.o_proj.in_features == h * a.head_dim == a.num_key_value_groups * 2 * a.head_dim
    if len(set(heads)) > 1:
        assert slim.config.num_attention_heads == 4


def test_stablelm_and_distilbert_heads_are_fixed_by_their_config():
    """Their libraries derive the head size from the width and the head count: a uniform
    prune warns that the config cannot describe fewer heads (the existing contract)."""
    for name in ("stablelm", "distilbert"):
        model = _build(name)
        ids = torch.randint(3, VOCAB, (2, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cd.GatingWarning)
            cd.attach(model, "lognormal", example_inputs=ids)
        with torch.no_grad():
            for _, g in cd.named_gates(model):
                for p in g.parameters():
                    p.add_(torch.empty_like(p).uniform_(-2, 2))
        thr = float(torch.cat([g.snr().detach() for _, g in cd.named_gates(model)]).median())
        with pytest.warns(cd.PruningWarning, match="cannot describe"):
            cd.prune(model, thr, example_inputs=ids, uniform=True)


@pytest.mark.parametrize(
    ("name", "rows"),
    [("phi3", 1), ("falcon_multi_query", 1), ("gpt_bigcode_multi_query", 1),
     ("falcon_grouped", 1), ("falcon_multi_head", 3), ("gpt_bigcode_multi_head", 3)],
)  # fmt: skip
def test_a_packed_projection_charges_a_head_the_rows_that_go_with_it(name, rows):
    """The cost-aware prior charged each head of a packed projection three times its query rows
    (q, k and v), also where groups of heads share their keys and values (Phi-3 with
    grouped-query attention, Falcon and GPT-BigCode multi-query): there a head takes its query
    rows alone with it, and its columns of the output projection."""
    from compressdrop.gating.head_groups import _head_costs
    from compressdrop.gating.heads import head_dim_of, head_spec_of
    from compressdrop.gating.known import register_for

    model = _build(name)
    register_for(model)  # (attach does this first)
    attn = next(m for m in model.modules() if head_spec_of(m) is not None)
    spec = head_spec_of(attn)[0]
    qkv, o = attn.get_submodule(spec.qkv), attn.get_submodule(spec.o)
    D = head_dim_of(attn, spec)
    params, _ = _head_costs(attn, spec, 1)
    want = rows * D * (qkv.in_features + (qkv.bias is not None)) + D * o.out_features
    assert params == want


def _bart_classifier():
    """A small BART classifier, random weights, and two rows of ids that end in its <eos>."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        **TOKENS, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 8))
    ids[:, -1] = 2
    return transformers.BartForSequenceClassification(config).eval(), ids


def test_bart_residual_stream_is_refused_for_its_layernorm_not_its_eos_pooling():
    """BART's classifier views its end-of-sequence states ``(N, F)`` as ``(N, 1, F)``: the
    decoder's residual stream was refused as "a view that splits them ... (a channel
    shuffle?)". The view splits nothing; what keeps the stream is the LayerNorm after each
    residual sum, and the warning says so, as the encoder's does."""
    model, ids = _bart_classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    said = {str(w.message) for w in caught}
    assert not any("splits them" in s for s in said)
    for stack in ("encoder", "decoder"):
        assert (
            f"compressdrop: layer 'model.{stack}.layers.1.fc2' left ungated: its units pass "
            "through LayerNorm, which does not map 0 to 0 per unit"
        ) in said


@pytest.mark.slow
def test_bart_classifier_exports_with_check_rows_that_end_in_its_eos(tmp_path):
    """BART's classifier reads each example's state at its <eos>: export_onnx's check drew
    random ids without one and failed ("Each example must contain at least one <eos> token"),
    and an example drawn for the CLI's export could not even be traced. The check's rows now end
    with ``config.eos_token_id`` (and hold no other), at every batch size and length checked."""
    model, ids = _bart_classifier()
    slim, _ = _attach_and_prune(model, ids)
    # torch.export bounds its length from below (3 tokens, not 2): said and recorded
    with pytest.warns(cd.ExportWarning, match=r"\(the sequence length\) only from 3 to 64"):
        rep = cd.export_onnx(
            slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3), check_lengths=(5, 13)
        )
    assert json.loads(rep.metadata["input_dims"]) == {"input_ids": {"1": [3, 64]}}
    assert set(rep.max_rel_error) == {1, 3, "length 5", "length 13"}
    assert max(rep.max_rel_error.values()) <= 1e-4
    from compressdrop.gating import example_input_for
    from compressdrop.gating.inputs import eos_read_by

    assert eos_read_by(slim) == 2 and eos_read_by(_build("xglm")) is None
    drawn = example_input_for(slim, batch=4)
    assert (drawn[:, -1] == 2).all() and (drawn[:, :-1] != 2).all()
    # timed on random ids as well (sweep's and eval's latency): they failed without an <eos>
    from compressdrop.evaluation import torch_latency

    assert torch_latency(slim, ids, 3, warmup=1, repeats=2).median_ms > 0
    with torch.no_grad():
        assert slim(drawn).logits.shape == (4, 3)


@pytest.mark.slow
def test_t5_classifier_exports_without_its_decoders_cache_and_with_eager_attention(tmp_path):
    """T5's export failed in torch.export (step 1/3): its decoder stack keeps a config of its
    own, whose ``use_cache`` export's switch did not reach, so the output held an
    ``EncoderDecoderCache``; then in the exporter's decomposition (step 2/3) of its ``sdpa``
    attention ("Cannot view a tensor ..."). Every config's cache is off for an export now, and a
    failed export is tried once more with eager attention (the same function), then put back."""
    from compressdrop.runtime import no_cache

    torch.manual_seed(0)
    config = transformers.T5Config(
        **TOKENS, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_labels=3,
        decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForSequenceClassification(config).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    ids[:, -1] = 2
    slim, _ = _attach_and_prune(model, ids)
    configs = [m.config for m in slim.modules() if hasattr(m, "config")]
    before = [c.use_cache for c in configs]
    assert slim.config.use_cache and sum(before) > 1  # the decoder stack's own
    with no_cache(slim):
        assert not any(c.use_cache for c in configs)
    assert [c.use_cache for c in configs] == before  # put back
    rep = cd.export_onnx(slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3))
    assert max(rep.max_rel_error.values()) <= 1e-4
    assert slim.config._attn_implementation == "sdpa"


GRANITE_MOE = {**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2,
               "shared_intermediate_size": 48}  # fmt: skip
GRANITE_HYBRID = {"layer_types": ["mamba", "attention"], "mamba_d_state": 8, "mamba_n_heads": 4,
                  "mamba_d_head": 16, "mamba_expand": 2, "mamba_n_groups": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "sizes"),
    [
        ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", GRANITE_MOE),
        ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", {**GRANITE_MOE, "sliding_window": 4}),
        (
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            {**GRANITE_MOE, **GRANITE_HYBRID},
        ),
    ],
)
def test_a_uniform_granite_moe_saves_its_shared_mlp_width_and_reloads(
    config_cls, model_cls, sizes, tmp_path
):
    """GraniteMoE-Shared's, -SWA's and -Hybrid's shared MLP (``input_linear`` packing [gate;
    up]) is the config's ``shared_intermediate_size``: a uniform prune of it, the heads
    (Hybrid's attention layer, between Mamba layers, is LLaMA's) and the experts writes a config
    that from_pretrained reloads with the slim logits. Before, Hybrid's heads had no gates and
    the shared width stayed the dense one in the config, so the folder was refused."""
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TOKENS, **sizes))
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    slim = _uniform_slim(model, ids, noisy_neurons=16)  # each shared MLP keeps 32 neurons
    assert any(isinstance(m, HeadGated) for m in model.modules())
    c = slim.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.shared_intermediate_size) == (2, 2, 32)
    check_against_masked(slim, model, 1.0)
    assert _saved_and_reloaded(slim, model_cls, tmp_path, ids) <= 1e-4
