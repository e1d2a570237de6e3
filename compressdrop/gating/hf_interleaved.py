"""The attention heads of Hugging Face decoders whose one ``query_key_value`` projection holds the
heads one after another, each as its query, key and value rows (``[q_0; k_0; v_0; q_1; ...]``):
GPT-NeoX (Pythia) and Persimmon. Both split it per head (GPT-NeoX by ``view(..., -1, 3·D)`` and
``chunk(3)``, Persimmon by ``view(..., num_heads, 3, D)``) and project the heads' concatenated
outputs with ``dense``, so head ``h`` is rows ``3·D·h … 3·D·(h+1) − 1`` of the one and columns
``D·h … D·(h+1) − 1`` of the other. Their q/k LayerNorms act on ``head_dim`` and are shared by
every head: nothing to cut there.
"""

from __future__ import annotations

from typing import Any

import torch

from .._families import hf_module
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating

#: family → attention class, for the families laid out as the module docstring says
INTERLEAVED = {"gpt_neox": "GPTNeoXAttention", "persimmon": "PersimmonAttention"}


def _head_dim(m: Any) -> int:
    return int(getattr(m, "head_size", None) or m.head_dim)


def _heads(m: Any) -> int:
    return int(m.query_key_value.out_features // (3 * _head_dim(m)))


def _remove(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep``: their query, key and value rows and their columns of
    ``dense``; Persimmon's ``num_heads`` (read by its reshape) follows."""
    D, H = _head_dim(m), _heads(m)
    gone = [h for h in range(H) if h not in set(keep.tolist())]
    cut_features(m.query_key_value, head_features(gone, 3 * D), out=True)
    cut_features(m.dense, head_features(gone, D), out=False)
    if hasattr(m, "num_heads"):
        m.num_heads = len(keep)


def register_interleaved() -> None:
    """Register the heads of every :data:`INTERLEAVED` family this transformers has."""
    spec = HeadSpec(o="dense", qkv="query_key_value", heads=_heads, remove=_remove)
    for family, cls in INTERLEAVED.items():
        register_attention_at(hf_module(family), cls, spec)
