"""The attention heads of Hugging Face's GPT-BigCode (StarCoder 1, SantaCoder), whose one
``c_attn`` projection packs them in one of two layouts (``D`` = ``head_dim``, ``H`` heads):

- multi-query: ``[q (H · D); k (D); v (D)]``, one key/value head for all, split by
  ``(embed_dim, kv_dim, kv_dim)``;
- multi-head: ``[q_0; k_0; v_0; q_1; …]``, each head's three ``D`` rows together, viewed by
  ``num_heads``.

A head's columns of ``c_proj`` are ``D·h … D·(h+1) − 1`` in both; the module's ``num_heads``,
``embed_dim``, ``kv_heads``, ``kv_dim`` and ``num_key_value_groups`` follow its heads.
Cross-attention (``q_attn``) is left ungated.
"""

from __future__ import annotations

from typing import Any

import torch

from .._families import hf_module
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating


def _remove(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` (module docstring); the module's counts follow."""
    D, H = int(m.head_dim), int(m.num_heads)
    kept = set(keep.tolist())
    gone = [h for h in range(H) if h not in kept]
    step = D if m.multi_query else 3 * D  # a head's rows: its query, or its q, k and v
    cut_features(m.c_attn, head_features(gone, step), out=True)
    cut_features(m.c_proj, head_features(gone, D), out=False)
    m.num_heads = len(kept)
    m.embed_dim = m.split_size = len(kept) * D
    if not m.multi_query:
        m.kv_heads = len(kept)
        m.kv_dim = len(kept) * D
    m.num_key_value_groups = m.num_heads // m.kv_heads


def _why_not(m: Any) -> str | None:
    return "cross-attention (its query is q_attn)" if m.is_cross_attention else None


def register_bigcode() -> None:
    """Register GPT-BigCode's heads, if this transformers has it."""
    register_attention_at(
        hf_module("gpt_bigcode"),
        "GPTBigCodeAttention",
        HeadSpec(o="c_proj", qkv="c_attn", heads="num_heads", remove=_remove, why_not=_why_not),
    )
