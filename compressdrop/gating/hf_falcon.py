"""The attention heads of Hugging Face's Falcon, whose one ``query_key_value`` projection packs
the heads in one of three layouts (``D`` = ``head_dim``, ``H`` query heads, ``KV`` key/value
heads), each read by its forward from ``num_heads``, ``num_kv_heads`` and ``head_dim``:

- the new decoder architecture (Falcon-40B/180B): ``KV`` groups, each its ``H / KV`` query heads
  then its key and its value, ``(G + 2) · D`` rows a group;
- multi-query (Falcon-7B): ``[q (H · D); k (D); v (D)]``, one key/value head for all;
- multi-head: ``[q_0; k_0; v_0; q_1; …]``, each head's three ``D`` rows together.

A head's columns of ``dense`` are ``D·h … D·(h+1) − 1`` in all three. Grouped query heads are
removed as LLaMA's are: every group keeps as many; where each group has one query head, its key
and value go with it. ALiBi models build their bias once for the config's heads and fold it into
the attention mask every layer gets: a pruned attention of one becomes a subclass that selects its
own heads' planes of that mask (:mod:`compressdrop.gating.hf_kept_heads`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._families import hf_module
from ..errors import InputError
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating


def _grouped(m: Any) -> bool:
    """The new decoder architecture with several query heads a key/value head."""
    return bool(m.new_decoder_architecture) and m.num_heads > m.num_kv_heads


def _own_key_value(m: Any) -> bool:
    """Each query head has its own key and value: the new decoder architecture with a group a
    head, or multi-head (the older layout without multi-query)."""
    if m.new_decoder_architecture:
        return bool(m.num_heads == m.num_kv_heads)
    return not m.multi_query


def _blocks(m: Any) -> int:
    return int(m.num_kv_heads) if _grouped(m) else 1


def _rows(m: Any, gone: list[int]) -> list[int]:
    """``query_key_value`` rows of the query heads ``gone`` (with their keys and values where
    each has its own)."""
    D, H = int(m.head_dim), int(m.num_heads)
    if m.new_decoder_architecture:
        G = H // int(m.num_kv_heads)  # query heads a group
        if G == 1:  # a group is one head's q, k and v
            return head_features(gone, 3 * D)
        return [(h // G) * (G + 2) * D + (h % G) * D + i for h in gone for i in range(D)]
    if m.multi_query:
        return head_features(gone, D)
    return head_features(gone, 3 * D)


def _remove(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` (module docstring); the module's counts follow."""
    D, H = int(m.head_dim), int(m.num_heads)
    kept = set(keep.tolist())
    gone = [h for h in range(H) if h not in kept]
    if _grouped(m) and len(kept) % int(m.num_kv_heads):
        raise InputError(
            f"{len(kept)} query heads do not split evenly over {m.num_kv_heads} key/value heads"
        )
    if m.config.alibi:  # the mask's ALiBi planes are the model's heads: select this layer's
        from .hf_kept_heads import keep_bias_heads_

        keep_bias_heads_(m, keep, H)
    cut_features(m.query_key_value, _rows(m, gone), out=True)
    cut_features(m.dense, head_features(gone, D), out=False)
    if _own_key_value(m):
        m.num_kv_heads = len(kept)
    m.num_heads = len(kept)
    m.num_key_value_groups = m.num_heads // m.num_kv_heads


def register_falcon() -> None:
    """Register Falcon's heads, if this transformers has it."""
    register_attention_at(
        hf_module("falcon"),
        "FalconAttention",
        HeadSpec(
            o="dense",
            qkv="query_key_value",
            heads="num_heads",
            blocks=_blocks,
            remove=_remove,
        ),
    )
