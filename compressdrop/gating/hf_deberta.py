"""The attention heads of Hugging Face's DeBERTa (v1) and DeBERTa-v2/v3, whose disentangled
attention keeps per-head parts beside BERT's layout (``D`` = ``attention_head_size``; the heads'
output projection is the sibling ``output.dense`` in both):

- v2/v3: ``query_proj``, ``key_proj`` and ``value_proj`` as BERT's; the relative positions pass
  through ``query_proj`` and ``key_proj`` too or, with ``share_att_key`` off, through per-head
  ``pos_query_proj`` and ``pos_key_proj``, cut with the heads.
- v1: one ``in_proj`` (no bias) with each head's q, k and v rows together, per-head ``q_bias`` and
  ``v_bias``, and per-head ``pos_proj`` and ``pos_q_proj`` for the relative positions. Its
  talking-head projections mix the heads (``talking_head``): those attentions keep their heads.

Both read ``num_attention_heads`` in their reshapes; it follows the heads, as ``all_head_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._families import hf_module
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating


def _keep_rows(layer: nn.Module | None, rows: list[int]) -> None:
    """Cut every output row of ``layer`` that is not in ``rows`` (a missing layer: nothing)."""
    if isinstance(layer, nn.Linear):
        cut_features(layer, sorted(set(range(layer.out_features)) - set(rows)), out=True)


def _v2_positions(m: Any, keep: torch.Tensor) -> None:
    """v2/v3: the per-head position projections of their own (``share_att_key`` off)."""
    rows = head_features(keep.tolist(), int(m.self.attention_head_size))
    for path in ("pos_query_proj", "pos_key_proj"):
        _keep_rows(getattr(m.self, path, None), rows)


def _remove_v1(m: Any, keep: torch.Tensor) -> None:
    """v1: the heads not in ``keep`` out of ``in_proj`` (each head's 3·D rows), ``q_bias``,
    ``v_bias``, ``pos_proj``, ``pos_q_proj`` and ``output.dense``'s columns."""
    s, D = m.self, int(m.self.attention_head_size)
    _keep_rows(s.in_proj, head_features(keep.tolist(), 3 * D))
    rows = head_features(keep.tolist(), D)
    for name in ("q_bias", "v_bias"):
        setattr(s, name, nn.Parameter(getattr(s, name).data[rows].clone()))
    for path in ("pos_proj", "pos_q_proj"):
        _keep_rows(getattr(s, path, None), rows)
    gone = sorted(set(range(s.all_head_size)) - set(rows))
    cut_features(m.output.dense, gone, out=False)
    s.num_attention_heads = len(keep)
    s.all_head_size = len(keep) * D


def _why_not_v1(m: Any) -> str | None:
    if m.self.head_logits_proj is not None or m.self.head_weights_proj is not None:
        return "its talking-head projections mix the heads"
    return None


def register_deberta() -> None:
    """Register the heads of DeBERTa and DeBERTa-v2/v3, where this transformers has them."""
    register_attention_at(
        hf_module("deberta_v2"),
        "DebertaV2Attention",
        HeadSpec(
            o="output.dense", q="self.query_proj", k="self.key_proj", v="self.value_proj",
            heads="self.num_attention_heads", widths=("self.all_head_size",),
            tables=_v2_positions,
        ),
    )  # fmt: skip
    register_attention_at(
        hf_module("deberta"),
        "DebertaAttention",
        HeadSpec(
            o="output.dense", qkv="self.in_proj", heads="self.num_attention_heads",
            remove=_remove_v1, why_not=_why_not_v1,
        ),
    )  # fmt: skip
