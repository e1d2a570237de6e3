"""Hugging Face transformers families that share a known layout, by module name (the
``transformers.models.<family>`` package) and class-name prefix: one list for the gates' memory
hand-offs (``gates/_mul.py``) and the head and config registrations (``gating/known.py``)."""

#: decoders whose attention is LLaMA's (q/k/v/o projections, ``head_dim``,
#: ``num_key_value_groups`` read by ``repeat_kv``) and whose MLP is SwiGLU with ``up_proj``
LLAMA_LIKE = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3": "Gemma3",
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
}
