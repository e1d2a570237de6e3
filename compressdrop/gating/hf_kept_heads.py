"""Hugging Face attentions that take their own heads' part of a position bias built for all heads.

BLOOM's ALiBi bias (a slope per head) is built once by ``BloomModel`` for ``config.n_head`` heads,
``(batch · heads, 1, keys)``; MPT's by ``MptModel``, ``(heads, 1, keys)``; Falcon's (with
``alibi``) once by ``FalconModel`` and folded into the attention mask, ``(batch, heads, queries,
keys)``; MPNet's relative position bias once by ``MPNetEncoder`` from one
``relative_attention_bias`` embedding (a column per head), ``(batch, heads, queries, keys)``. Each
is handed unchanged to every layer. After surgery a layer may keep fewer heads than the bias
holds, and no library's attention reads anything per layer that could select them. So surgery
turns such an attention into the subclass below, in place: the same module, parameters and
attributes, and a buffer ``bias_heads`` of the kept heads' indices among the bias's ``bias_total``
heads; its forward selects those rows of the bias and calls the library's own forward. It is still
an instance of the library's class, and exports to ``.pt2`` and ONNX as one ``index_select`` (a
Gather) more.

This module imports transformers; surgery imports it only for models of these families, and an
unpickled slim model imports it by its classes' names.
"""

from __future__ import annotations

from typing import Any

import torch

from .._torchvision import import_torchvision
from ..errors import InputError

import_torchvision()  # transformers imports torchvision: a build for another torch must load

from transformers.models.bloom.modeling_bloom import BloomAttention  # noqa: E402
from transformers.models.falcon.modeling_falcon import FalconAttention  # noqa: E402
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention  # noqa: E402
from transformers.models.mpt.modeling_mpt import MptAttention  # noqa: E402

__all__ = [
    "KeptHeadsBloomAttention",
    "KeptHeadsFalconAttention",
    "KeptHeadsMPNetSelfAttention",
    "KeptHeadsMptAttention",
    "keep_bias_heads_",
]


class _KeptHeads:
    """What the subclasses hold: ``bias_heads`` (long, the kept heads' indices among the
    bias's) and ``bias_total`` (the heads the bias is built for)."""

    bias_heads: torch.Tensor
    bias_total: int


class KeptHeadsBloomAttention(BloomAttention, _KeptHeads):
    """BLOOM's attention with fewer heads than the model's ALiBi bias holds."""

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
        *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The library's forward on the kept heads' rows of ``alibi``
        (``(batch · bias_total, 1, keys)`` → ``(batch · heads, 1, keys)``)."""
        alibi = alibi.unflatten(0, (-1, self.bias_total))  # (B, bias_total, 1, keys)
        alibi = alibi.index_select(1, self.bias_heads).flatten(0, 1)  # (B · heads, 1, keys)
        return super().forward(hidden_states, residual, alibi, *args, **kwargs)


class KeptHeadsFalconAttention(FalconAttention, _KeptHeads):
    """Falcon's attention (an ALiBi model's) with fewer heads than the mask's ALiBi planes."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
        *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The library's forward on the kept heads' planes of ``attention_mask``, which holds
        the ALiBi bias (``(batch, bias_total, queries, keys)`` → ``(batch, heads, ...)``)."""
        if attention_mask is not None and attention_mask.shape[1] == self.bias_total:
            attention_mask = attention_mask.index_select(1, self.bias_heads)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


class KeptHeadsMPNetSelfAttention(MPNetSelfAttention, _KeptHeads):
    """MPNet's self-attention with fewer heads than the encoder's relative position bias."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The library's forward on the kept heads' planes of ``position_bias``
        (``(batch, bias_total, queries, keys)`` → ``(batch, heads, queries, keys)``)."""
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.bias_heads)
        return super().forward(hidden_states, attention_mask, position_bias, *args, **kwargs)


class KeptHeadsMptAttention(MptAttention, _KeptHeads):
    """MPT's attention with fewer heads than the model's ALiBi bias."""

    def forward(
        self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None,
        *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The library's forward on the kept heads' planes of ``position_bias``
        (``(bias_total, queries, keys)`` → ``(heads, queries, keys)``)."""
        if position_bias is not None:
            position_bias = position_bias.index_select(0, self.bias_heads)
        return super().forward(hidden_states, position_bias, *args, **kwargs)


_SUBCLASS: dict[type, type] = {
    BloomAttention: KeptHeadsBloomAttention,
    FalconAttention: KeptHeadsFalconAttention,
    MPNetSelfAttention: KeptHeadsMPNetSelfAttention,
    MptAttention: KeptHeadsMptAttention,
}


def keep_bias_heads_(m: Any, keep: torch.Tensor, heads: int) -> None:
    """Make ``m`` (a BLOOM, MPT, Falcon or MPNet attention that keeps heads ``keep`` of its current
    ``heads``) take its own heads' part of a bias built for all the model's heads (``heads``
    at the first cut, ``bias_total`` recorded then after): its class becomes the subclass, and
    ``bias_heads`` the kept heads' indices in the bias (composed with earlier removals).

    Raises:
        InputError: ``m``'s class is a subclass of the library's of its own (its forward may
            differ from the one the subclass wraps).
    """
    if not isinstance(m, _KeptHeads):
        if type(m) not in _SUBCLASS:
            raise InputError(
                f"{type(m).__name__} derives from the library's attention; only the library's own "
                "class is known to take the shared position bias as compressdrop selects it"
            )
        m.__class__ = _SUBCLASS[type(m)]
    before = getattr(m, "bias_heads", None)
    keep = keep.to(torch.long).cpu()
    in_bias = keep if before is None else before.cpu()[keep]
    device = next(m.parameters()).device
    m.bias_total = int(getattr(m, "bias_total", heads))  # (an earlier cut's, if any)
    m.register_buffer("bias_heads", in_bias.to(device), persistent=False)
