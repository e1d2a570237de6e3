"""Where the heads are in attention modules of libraries compressdrop knows (Hugging Face
transformers), registered the first time a model built from that library is gated.

A model's classes say which library it comes from, so nothing is imported for a model that does
not use one. Each entry is what a user would otherwise write with
:func:`~compressdrop.gating.register_attention`.
"""

from __future__ import annotations

from torch import nn

from .heads import HeadSpec, register_attention

__all__: list[str] = []  # internal to compressdrop.gating

_DONE: set[str] = set()


def register_for(model: nn.Module) -> None:
    """Register the head specs of the libraries ``model``'s modules come from (once each)."""
    libraries = {type(m).__module__.split(".")[0] for m in model.modules()}
    if "transformers" in libraries and "transformers" not in _DONE:
        _register_transformers()
        _DONE.add("transformers")


def _register_transformers() -> None:
    # BERT: the heads live in BertSelfAttention (query, key, value; num_attention_heads and
    # all_head_size read by its forward), their projection in the sibling BertSelfOutput.dense
    from transformers.models.bert.modeling_bert import BertAttention

    register_attention(
        BertAttention,
        HeadSpec(
            o="output.dense",
            q="self.query",
            k="self.key",
            v="self.value",
            heads="self.num_attention_heads",
            widths=("self.all_head_size",),
        ),
    )
