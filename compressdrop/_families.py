"""Hugging Face transformers families that share a known layout, by module name (the
``transformers.models.<family>`` package) and class-name prefix: one list for the gates' memory
hand-offs (``gates/_mul.py``) and the head and config registrations (``gating/known.py``)."""

from typing import NamedTuple


class Decoder(NamedTuple):
    """A decoder whose attention is LLaMA's: q/k/v projections, ``head_dim`` and
    ``num_key_value_groups`` (read by ``repeat_kv``), heads reshaped by ``-1`` or by its own
    ``num_heads``/``num_key_value_heads``.

    Attributes:
        prefix: class-name prefix (``"Llama"``: ``LlamaAttention``, ``LlamaMLP``).
        o: the attention's output projection.
        mlp: the dense MLP's class-name suffix (``None``: a mixture of experts and no dense MLP;
            fused experts are gated by :mod:`compressdrop.gating.experts`). A mixture of experts
            may have dense layers too (Qwen-MoE's ``mlp_only_layers``, or every layer off its
            ``decoder_sparse_step``), MLPs of this class.
        up: the MLP layer whose output width is ``width``; ``"up_proj"`` marks a SwiGLU MLP
            whose ``up_proj`` output one product alone reads.
        rows: rows of ``up`` per neuron (2: GLM's packed ``gate_up_proj``, ``[gate; up]``,
            gated per neuron by :mod:`compressdrop.gating.packed_mlp`).
        width: the config field of that width (the dense layers' MLPs).
        norms_across_heads: its q_norm and k_norm are RMSNorms over all heads together (or,
            BitNet's ``attn_sub_norm``, one over their outputs), so no head can go exactly: its
            heads are registered to say so, and stay.
        shared: the attribute of a mixture-of-experts block that holds its shared expert, an MLP
            of the same class whose width is another config field, ``shared_width``.
        shared_width: the config field of the shared experts' width.
        head_dim_fixed: the attention derives ``head_dim`` from ``hidden_size`` and the head
            count (its config cannot describe fewer heads of the same size).
        shared_per: the config field counting the shared experts one MLP holds, whose width
            is then ``shared_width`` times it (GLM-4-MoE's ``n_shared_experts``); ``None``: the
            width is ``shared_width`` itself.
        latent: multi-latent attention (DeepSeek-V2's): each head's rows of ``q_b_proj`` (or
            ``q_proj``), of ``kv_b_proj`` (``qk_nope_head_dim + v_head_dim``: its keys and
            values, expanded from one shared latent) and its ``v_head_dim`` columns of
            ``o_proj``; the keys' rotary part is one for all heads, so any head may go.
        q_gate: ``q_proj`` holds each head's query and then its output gate (``2 · head_dim``
            rows a head: Qwen3-Next's and Qwen3.5's ``sigmoid(gate) * attn``, per feature).
        glu: its MLP is gated (``down(act(gate(x)) * up(x))``); ``False``: ``up_proj`` feeds
            the activation alone (Arcee's and Apertus's ``down(act(up(x)))``).
    """

    prefix: str
    o: str = "o_proj"
    mlp: str | None = "MLP"
    up: str = "up_proj"
    width: str = "intermediate_size"
    rows: int = 1
    head_dim_fixed: bool = False
    norms_across_heads: bool = False
    shared: str | None = None
    shared_width: str = "shared_expert_intermediate_size"
    shared_per: str | None = None
    latent: bool = False
    q_gate: bool = False
    glu: bool = True


#: decoders with LLaMA's grouped-query attention, by family
DECODERS = {
    "llama": Decoder("Llama"),
    "qwen2": Decoder("Qwen2"),
    "qwen3": Decoder("Qwen3"),
    "mistral": Decoder("Mistral"),
    "gemma": Decoder("Gemma"),
    "gemma2": Decoder("Gemma2"),
    "gemma3": Decoder("Gemma3"),
    "olmo": Decoder("Olmo"),
    "olmo2": Decoder("Olmo2", norms_across_heads=True),
    "granite": Decoder("Granite"),
    "cohere": Decoder("Cohere"),  # its optional q/k norms hold a row per head
    "stablelm": Decoder("StableLm", head_dim_fixed=True),  # per-head q/k LayerNorms
    "starcoder2": Decoder("Starcoder2", up="c_fc"),
    "phi": Decoder("Phi", o="dense", up="fc1"),
    "mixtral": Decoder("Mixtral", mlp=None),
    # Qwen-MoE: dense MLPs in its mlp_only_layers (and off its decoder_sparse_step); Qwen2-MoE
    # also a shared expert of the same class in every sparse block
    "qwen2_moe": Decoder("Qwen2Moe", shared="shared_expert"),
    "qwen3_moe": Decoder("Qwen3Moe"),
    "olmoe": Decoder("Olmoe", mlp=None, norms_across_heads=True),
    "gpt_oss": Decoder("GptOss", mlp=None),  # a learned attention sink per query head
    # GLM and GLM-4: an explicit head_dim, partial rotary (per head), a packed gate_up_proj
    "glm": Decoder("Glm", up="gate_up_proj", rows=2),
    "glm4": Decoder("Glm4", up="gate_up_proj", rows=2),
    # LLaMA's attention with per-head q/k norms (over head_dim), sliding windows, no rotary
    # positions on some layers, attention sinks or per-position query scales: each acts on
    # every head alike, so a head goes as LLaMA's does
    "apertus": Decoder("Apertus", glu=False),  # xIELU on up_proj alone
    "apertus1p5": Decoder("Apertus1p5Text", glu=False),
    "aria": Decoder("AriaText", mlp=None),
    "arcee": Decoder("Arcee", glu=False),  # ReLU² on up_proj alone
    "cohere2": Decoder("Cohere2"),
    "cwm": Decoder("Cwm"),
    "ernie4_5": Decoder("Ernie4_5"),
    "exaone4": Decoder("Exaone4"),
    "exaone_moe": Decoder("ExaoneMoe", shared="shared_experts", shared_width="moe_intermediate_size",
                          shared_per="num_shared_experts"),
    "granite_swa": Decoder("GraniteSWA"),
    "helium": Decoder("Helium"),
    "hunyuan_v1_dense": Decoder("HunYuanDenseV1"),
    "hyperclovax": Decoder("HyperCLOVAX"),
    "jais2": Decoder("Jais2", glu=False),
    "ministral": Decoder("Ministral"),
    "ministral3": Decoder("Ministral3"),
    "seed_oss": Decoder("SeedOss"),
    "smollm3": Decoder("SmolLM3"),
    "nanochat": Decoder("NanoChat", up="fc1", glu=False),  # (q/k norms per head, after RoPE)
    "vaultgemma": Decoder("VaultGemma"),
    # encoders with LLaMA's attention (not causal): EuroBERT's, Ultrabert's, GTE's, NomicBERT's
    # and Jina-Embeddings-v3's (a key/value head per head; Jina's MLP fc1/fc2)
    "eurobert": Decoder("EuroBert"),
    "ultrabert": Decoder("Ultrabert"),
    "gte": Decoder("Gte"),
    "nomic_bert": Decoder("NomicBert"),
    "jina_embeddings_v3": Decoder("JinaEmbeddingsV3", up="fc1", glu=False),
    "olmo3": Decoder("Olmo3", norms_across_heads=True),
    "bitnet": Decoder("BitNet", norms_across_heads=True),  # its attn_sub_norm, after the heads
    # hybrids: attention layers between state-space ones (their heads alone are gated here)
    "bamba": Decoder("Bamba"),
    "falcon_h1": Decoder("FalconH1"),
    "jamba": Decoder("Jamba"),
    # mixtures of experts; a shared expert of the dense MLP's class holds shared_per experts'
    # widths (GLM-4-MoE's moe_intermediate_size · n_shared_experts)
    "glm4_moe": Decoder("Glm4Moe", shared="shared_experts", shared_width="moe_intermediate_size",
                        shared_per="n_shared_experts"),
    "dots1": Decoder("Dots1", shared="shared_experts", shared_width="moe_intermediate_size",
                     shared_per="n_shared_experts"),
    "solar_open": Decoder("SolarOpen", shared="shared_experts",
                          shared_width="moe_intermediate_size", shared_per="n_shared_experts"),
    "ernie4_5_moe": Decoder("Ernie4_5_Moe", shared="shared_experts",
                            shared_width="moe_intermediate_size",
                            shared_per="moe_num_shared_experts"),
    "hunyuan_v1_moe": Decoder("HunYuanMoEV1", shared="shared_mlp",
                              shared_width="intermediate_size"),
    "llama4": Decoder("Llama4Text", width="intermediate_size_mlp", shared="shared_expert",
                      shared_width="intermediate_size"),
    "cohere2_moe": Decoder("Cohere2Moe", shared="shared_experts", shared_width="intermediate_size",
                           shared_per="num_shared_experts"),
    # an output gate per head feature (gate_proj; Beam's with a bias per head), cut with it
    "afmoe": Decoder("Afmoe", shared="shared_experts", shared_width="moe_intermediate_size",
                     shared_per="num_shared_experts"),
    "beam": Decoder("Beam"),
    "mellum": Decoder("Mellum"),
    "granitemoe": Decoder("GraniteMoe", mlp=None),
    # GraniteMoE-Shared's, -SWA's and -Hybrid's shared MLP packs [gate; up] in input_linear (its
    # width the config's shared_intermediate_size), beside fused experts; Hybrid's attention
    # layers sit between Mamba layers
    "granitemoeshared": Decoder("GraniteMoeShared", up="input_linear", rows=2,
                                width="shared_intermediate_size"),
    "granitemoehybrid": Decoder("GraniteMoeHybrid", up="input_linear", rows=2,
                                width="shared_intermediate_size"),
    "granitemoe_swa": Decoder("GraniteMoeSWA", up="input_linear", rows=2,
                              width="shared_intermediate_size"),
    "hy_v3": Decoder("HYV3"),
    "mimo_v2_flash": Decoder("MiMoV2Flash"),
    "phimoe": Decoder("Phimoe", mlp=None),
    "minimax": Decoder("MiniMax", mlp=None),  # (its lightning-attention layers stay)
    "flex_olmo": Decoder("FlexOlmo", mlp=None, norms_across_heads=True),
    "minimax_m2": Decoder("MiniMaxM2", mlp=None, norms_across_heads=True),
    # each head's query rows followed by its output gate's
    "qwen3_next": Decoder("Qwen3Next", q_gate=True, shared="shared_expert"),
    "qwen3_5": Decoder("Qwen3_5", q_gate=True),
    "qwen3_5_moe": Decoder("Qwen3_5Moe", q_gate=True, mlp=None),
    # multi-latent attention; DeepSeek-V3.2's and GLM-MoE-DSA's indexer picks the keys of all
    # heads alike
    "minicpm3": Decoder("MiniCPM3", latent=True),
    "youtu": Decoder("Youtu", latent=True),
    **{
        family: Decoder(prefix, latent=True, shared="shared_experts",
                        shared_width="moe_intermediate_size", shared_per="n_shared_experts")
        for family, prefix in (
            ("deepseek_v2", "DeepseekV2"), ("deepseek_v3", "DeepseekV3"),
            ("deepseek_v32", "DeepseekV32"), ("glm4_moe_lite", "Glm4MoeLite"),
            ("glm_moe_dsa", "GlmMoeDsa"), ("kimi_linear", "KimiLinear"), ("axk1", "AXK1"),
        )
    },
}  # fmt: skip
#: decoders whose attention is LLaMA's and whose MLP is SwiGLU with ``up_proj``
LLAMA_LIKE = {
    family: d.prefix
    for family, d in DECODERS.items()
    if d.mlp == "MLP" and d.up == "up_proj" and d.glu
}
#: encoders whose attention is BERT's (``self.query``/``key``/``value``, ``num_attention_heads``
#: and ``all_head_size`` read by its forward, the projection in the sibling ``output.dense``),
#: with an MLP of ``intermediate.dense`` and ``output.dense`` and maybe a pooler
BERT_LIKE = {
    "bert": "Bert",
    "roberta": "Roberta",
    "xlm_roberta": "XLMRoberta",
    "camembert": "Camembert",
    "electra": "Electra",
    "roformer": "RoFormer",  # (its rotary positions act per head: any head may go)
    "megatron_bert": "MegatronBert",
    # (as decoders too: their ForCausalLM classes; the pre-norm ones norm before the heads)
    "bert_generation": "BertGeneration",
    "ernie": "Ernie",
    "roc_bert": "RoCBert",
    "roberta_prelayernorm": "RobertaPreLayerNorm",
    "xlm_roberta_xl": "XLMRobertaXL",
    # BERT's modules under other names (X-MOD: with its per-language adapters after the MLP;
    # RemBERT: its embeddings narrower than the layers)
    "data2vec_text": "Data2VecText",
    "layoutlm": "LayoutLM",
    "markuplm": "MarkupLM",
    "rembert": "RemBert",
    "xmod": "Xmod",
}
#: the ``transformers.models`` package of a family whose module is not named after it
#: (``transformers.models.data2vec.modeling_data2vec_text``)
HF_PACKAGES = {"data2vec_text": "data2vec"}


def hf_module(family: str) -> str:
    """The module of a Hugging Face transformers family's models (``llama``, ``falcon``, ...)."""
    return f"transformers.models.{HF_PACKAGES.get(family, family)}.modeling_{family}"


class MlpWidth(NamedTuple):
    """Where a family whose attention is not LLaMA's keeps its MLP width: the layer whose
    outputs are the neurons, below the module of the class it is keyed by, and the config field
    that gives their number.

    Attributes:
        up: the layer whose output rows are the neurons.
        width: the config field of their number.
        rows: rows of ``up`` per neuron (2: a packed ``[gate; up]``).
    """

    up: str
    width: str
    rows: int = 1


#: module class → where its MLP width is, for families whose config derives the head size from
#: the width and the head count (their heads stay refused): only their MLP width follows a
#: prune. Phi-3's packed ``gate_up_proj`` holds two rows per neuron (gated per neuron:
#: :mod:`compressdrop.gating.packed_mlp`)
MLP_WIDTHS = {
    "Phi3MLP": MlpWidth("gate_up_proj", "intermediate_size", rows=2),
    "GPTNeoXMLP": MlpWidth("dense_h_to_4h", "intermediate_size"),
    "PersimmonMLP": MlpWidth("dense_h_to_4h", "intermediate_size"),
    "GPTJMLP": MlpWidth("fc_in", "n_inner"),
    "CodeGenMLP": MlpWidth("fc_in", "n_inner"),
    "GPTBigCodeMLP": MlpWidth("c_fc", "n_inner"),
    "OPTDecoderLayer": MlpWidth("fc1", "ffn_dim"),  # (no MLP module: the layer holds fc1)
    "XGLMDecoderLayer": MlpWidth("fc1", "ffn_dim"),
}
