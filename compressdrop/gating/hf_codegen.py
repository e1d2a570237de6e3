"""The attention heads of Hugging Face's CodeGen, whose one ``qkv_proj`` is packed in ``mp_num``
blocks (4, the model-parallel shards it was trained with; ``D`` = ``head_dim``, ``H`` heads,
``G = H / mp_num`` heads a block, ``L = G · D``): block ``b`` is rows ``3·L·b … 3·L·(b+1) − 1``,
its heads' queries, then their values, then their keys (``[q; v; k]``, each ``L`` rows), and holds
heads ``G·b … G·(b+1) − 1``. The forward views the projection by ``embed_dim // mp_num`` and
reshapes the heads by ``-1``; a head's columns of ``out_proj`` are ``D·h … D·(h+1) − 1``.

Surgery rewrites the layout for the heads it keeps: where every block keeps as many, the blocks
stay (only their rows shrink); else the kept heads become one block (``mp_num`` = 1, rows
``[q; v; k]`` of all kept heads in order), which the same forward reads exactly. ``embed_dim``
follows the heads; any set of heads may go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._families import hf_module
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating


def _rows(m: Any, keep: list[int]) -> tuple[list[int], int]:
    """``qkv_proj``'s rows for the kept heads in their new layout, and its block count."""
    D, H, mp = int(m.head_dim), int(m.num_attention_heads), int(m.mp_num)
    G, L = H // mp, H // mp * D
    per = [[h for h in keep if h // G == b] for b in range(mp)]
    blocks = per if len({len(p) for p in per}) == 1 else [keep]
    rows = []
    for heads in blocks:
        for part in range(3):  # q, v, k
            rows += [(h // G) * 3 * L + part * L + (h % G) * D + i for h in heads for i in range(D)]
    return rows, len(blocks)


def _remove(m: Any, keep: torch.Tensor) -> None:
    """Keep the rows of ``keep``'s heads in ``qkv_proj``, in their new layout, and their columns
    of ``out_proj`` (module docstring); ``mp_num``, ``num_attention_heads`` and ``embed_dim``
    follow."""
    kept = sorted(keep.tolist())
    D, H = int(m.head_dim), int(m.num_attention_heads)
    rows, blocks = _rows(m, kept)
    qkv = m.qkv_proj
    idx = torch.tensor(rows, dtype=torch.long, device=qkv.weight.device)
    qkv.weight = nn.Parameter(qkv.weight.data.index_select(0, idx).clone())
    if qkv.bias is not None:
        qkv.bias = nn.Parameter(qkv.bias.data.index_select(0, idx).clone())
    qkv.out_features = len(rows)
    cut_features(m.out_proj, head_features([h for h in range(H) if h not in kept], D), out=False)
    m.mp_num = blocks
    m.num_attention_heads = len(kept)
    m.embed_dim = len(kept) * D


def register_codegen() -> None:
    """Register CodeGen's heads, if this transformers has it."""
    register_attention_at(
        hf_module("codegen"),
        "CodeGenAttention",
        HeadSpec(o="out_proj", qkv="qkv_proj", heads="num_attention_heads", remove=_remove),
    )
