"""The attention heads of Hugging Face families whose position bias is built outside the attention,
once for the config's head count, and handed to every layer (``D`` = ``head_dim``):

- BLOOM: ALiBi, a slope per head, built by ``BloomModel``. Its one ``query_key_value`` holds each
  head's q, k and v rows together (``view(..., num_heads, 3, D)``): head ``h`` is rows
  ``3·D·h … 3·D·(h+1) − 1``, and columns ``D·h … D·(h+1) − 1`` of ``dense``; ``num_heads`` is
  read by its reshapes.
- MPT: ALiBi, a slope per head, built by ``MptModel``. Its ``Wqkv`` is ``[q; k; v]``, each
  ``n_heads · D`` rows, split by ``chunk(3)``; ``out_proj`` projects the heads; ``n_heads`` is
  read by its reshapes.
- MPNet: a relative position bias from one ``relative_attention_bias`` embedding in
  ``MPNetEncoder``, a column per head, shared by all layers. Its ``q``, ``k`` and ``v`` are
  BERT's; ``o`` projects the heads; ``all_head_size`` is read by its reshape.

Each layer removes its own heads: surgery turns the attention into a subclass that selects its
kept heads' part of the bias (:mod:`compressdrop.gating.hf_kept_heads`), so the bias, the
embedding and the other layers stay as they are. BLOOM's ``slow_but_exact`` tensor-parallel
path (``pretraining_tp`` > 1) slices the heads by the hidden size: those attentions keep their
heads.
"""

from __future__ import annotations

from typing import Any

import torch

from .._families import hf_module
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating


def _remove_bloom(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` out of ``query_key_value`` and ``dense`` (module docstring);
    ``num_heads`` follows, and the attention selects its heads' ALiBi slopes."""
    from .hf_kept_heads import keep_bias_heads_

    D, H = int(m.head_dim), int(m.num_heads)
    keep_bias_heads_(m, keep, H)  # first: it refuses a class it does not know
    gone = [h for h in range(H) if h not in set(keep.tolist())]
    cut_features(m.query_key_value, head_features(gone, 3 * D), out=True)
    cut_features(m.dense, head_features(gone, D), out=False)
    m.num_heads = len(keep)


def _why_not_bloom(m: Any) -> str | None:
    if m.pretraining_tp > 1 and m.slow_but_exact:
        return "its slow_but_exact tensor-parallel path slices the heads by the hidden size"
    return None


def _remove_mpnet(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` out of ``q``, ``k``, ``v`` and ``o``; ``num_attention_heads``
    and ``all_head_size`` follow, and the attention selects its heads' planes of the bias."""
    from .hf_kept_heads import keep_bias_heads_

    D, H = int(m.attention_head_size), int(m.num_attention_heads)
    keep_bias_heads_(m, keep, H)  # first: it refuses a class it does not know
    gone = head_features([h for h in range(H) if h not in set(keep.tolist())], D)
    for layer in (m.q, m.k, m.v):
        cut_features(layer, gone, out=True)
    cut_features(m.o, gone, out=False)
    m.num_attention_heads = len(keep)
    m.all_head_size = len(keep) * D


def _remove_mpt(m: Any, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` out of ``Wqkv`` (``[q; k; v]``, ``D`` rows a head in each)
    and ``out_proj``; ``n_heads`` follows, and the attention selects its heads' ALiBi planes."""
    from .hf_kept_heads import keep_bias_heads_

    D, H = int(m.head_dim), int(m.n_heads)
    keep_bias_heads_(m, keep, H)  # first: it refuses a class it does not know
    gone = head_features([h for h in range(H) if h not in set(keep.tolist())], D)
    cut_features(m.Wqkv, [part * H * D + i for part in range(3) for i in gone], out=True)
    cut_features(m.out_proj, gone, out=False)
    m.n_heads = len(keep)


def register_position_bias() -> None:
    """Register the heads of BLOOM, MPT and MPNet, where this transformers has them."""
    register_attention_at(
        hf_module("bloom"),
        "BloomAttention",
        HeadSpec(
            o="dense", qkv="query_key_value", heads="num_heads", remove=_remove_bloom,
            why_not=_why_not_bloom,
        ),
    )  # fmt: skip
    register_attention_at(
        hf_module("mpt"),
        "MptAttention",
        HeadSpec(o="out_proj", qkv="Wqkv", heads="n_heads", remove=_remove_mpt),
    )
    register_attention_at(
        hf_module("mpnet"),
        "MPNetSelfAttention",
        HeadSpec(o="o", q="q", k="k", v="v", heads="num_attention_heads", remove=_remove_mpnet),
    )  # fmt: skip
