"""``nn.MultiheadAttention`` whose heads can be removed.

PyTorch's ``nn.MultiheadAttention`` ties its query width to ``num_heads · head_dim`` and computes
the output projection inside one fused function, so neither a gate on a head's output nor a model
with fewer heads fits it. :class:`MultiheadAttention` is a drop-in subclass with the same
parameters, buffers and ``state_dict`` keys, whose forward spells the computation out
(projections, ``F.scaled_dot_product_attention``, then ``out_proj`` called as a module, where a
head gate sits) and allows ``num_heads · head_dim < embed_dim``. :func:`to_prunable` converts a
stock instance in place of its parameters (the same ``Parameter`` objects: an optimizer built
before keeps working); :func:`to_stock` converts back while no head has been removed.

The slim model keeps this class where heads were removed; its ONNX and ``torch.export`` programs
load without compressdrop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..runtime import is_exporting, linear

__all__ = [
    "MultiheadAttention",
    "leaf_pruner",
    "nested_off",
    "to_prunable",
    "to_stock",
    "why_not_heads",
]


def why_not_heads(m: nn.MultiheadAttention) -> str | None:
    """Why the heads of ``m`` cannot be gated (``None``: they can)."""
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True (a learned key/value row shared by every head) is not supported"
    if m.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _clone_into(cls: type[nn.Module], m: nn.Module) -> nn.Module:
    """A module of class ``cls`` holding ``m``'s parameters, buffers, submodules and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(m.__dict__[key])
    return new


def to_prunable(m: nn.MultiheadAttention) -> MultiheadAttention:
    """``m`` as a :class:`MultiheadAttention` sharing its parameters (``m`` itself if it is one).

    Raises:
        InputError: ``m`` uses an option whose heads cannot be removed (:func:`why_not_heads`).
    """
    if isinstance(m, MultiheadAttention):
        return m
    why = why_not_heads(m)
    if why is not None:
        raise InputError(f"cannot remove heads of this nn.MultiheadAttention: {why}")
    new = _clone_into(MultiheadAttention, m)
    assert isinstance(new, MultiheadAttention)
    new._packed = m._qkv_same_embed_dim
    # False turns PyTorch's fused encoder paths off: they assume num_heads·head_dim == embed_dim
    new._qkv_same_embed_dim = False
    return new


def to_stock(m: nn.Module) -> nn.Module:
    """A :class:`MultiheadAttention` with all its heads back as a stock ``nn.MultiheadAttention``
    (anything else is returned as it is)."""
    if not isinstance(m, MultiheadAttention) or m.num_heads * m.head_dim != m.embed_dim:
        return m
    new = _clone_into(nn.MultiheadAttention, m)
    new._qkv_same_embed_dim = new.__dict__.pop("_packed")
    return new


def nested_off(root: nn.Module) -> list[str]:
    """Turn off the nested-tensor path of every ``nn.TransformerEncoder`` in ``root`` that holds a
    :class:`MultiheadAttention` (that path hands its layers nested tensors, which this forward does
    not take; it changes speed only, and the outputs at padded positions, which are zeros there).

    Returns:
        The names of the encoders whose ``use_nested_tensor`` was True.
    """
    changed = []
    for name, m in root.named_modules():
        if (
            isinstance(m, nn.TransformerEncoder)
            and getattr(m, "use_nested_tensor", False)
            and any(isinstance(a, MultiheadAttention) for a in m.modules())
        ):
            m.use_nested_tensor = False
            changed.append(name)
    return changed


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed, PyTorch's MultiheadAttention convention) as −inf/0."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that allows ``num_heads · head_dim < embed_dim`` (heads removed).

    Same constructor, parameters and forward signature as ``nn.MultiheadAttention``; build one
    from a stock module with :func:`to_prunable`. ``in_proj_weight`` (or ``q/k/v_proj_weight``)
    holds ``num_heads · head_dim`` rows per projection and ``out_proj`` as many input features.

    Returned attention weights (``need_weights=True``) are those of the remaining heads, averaged
    over them when ``average_attn_weights``.
    """

    _packed: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packed = self._qkv_same_embed_dim
        self._qkv_same_embed_dim = False  # see to_prunable

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads: ``num_heads · head_dim``."""
        return self.num_heads * self.head_dim

    @torch.no_grad()
    def remove_heads_(self, keep: torch.Tensor) -> None:
        """Keep only heads ``keep`` (indices, ascending): their query, key and value rows and
        their columns of ``out_proj``; ``num_heads`` becomes ``len(keep)``."""
        D, n = self.head_dim, self.inner_dim
        feats = (keep[:, None] * D + torch.arange(D)).flatten().to(self.out_proj.weight.device)
        rows = torch.cat([feats + s * n for s in range(3)])
        cuts = [("in_proj_weight", rows), ("in_proj_bias", rows)]
        cuts += [(f"{x}_proj_weight", feats) for x in "qkv"]
        for name, idx in cuts:
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, nn.Parameter(p.index_select(0, idx).clone()))
        self.out_proj.weight = nn.Parameter(self.out_proj.weight.index_select(1, feats).clone())
        self.out_proj.in_features = len(feats)
        self.num_heads = len(keep)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, b = self.inner_dim, self.in_proj_bias
        if self.in_proj_weight is not None and same:
            # self-attention: one product for q, k and v (one MatMul in the exported graph)
            q, k, v = linear(query, self.in_proj_weight, b).split(n, dim=-1)
            return q, k, v
        bq, bk, bv = (None, None, None) if b is None else b.split(n)
        if self.in_proj_weight is not None:
            wq, wk, wv = self.in_proj_weight.split(n)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return linear(query, wq, bq), linear(key, wk, bk), linear(value, wv, bv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``."""
        if query.is_nested:
            raise InputError("compressdrop's MultiheadAttention does not take nested tensors")
        if is_causal and attn_mask is None:
            raise InputError("is_causal=True is a hint about attn_mask: pass the causal mask too")
        same = query is key and key is value  # self-attention (before the layout changes below)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, S, H, D = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        # (B, L, H·D) to (B, H, L, D); one head left needs no transpose (none in the ONNX graph)
        q, k, v = (
            t.unsqueeze(1) if H == 1 else t.unflatten(-1, (H, D)).transpose(1, 2)
            for t in self._project(query, key, value, same)
        )
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            if mask.shape[0] != B * H:
                raise InputError(
                    f"attn_mask of shape {tuple(mask.shape)}: a 3-D mask needs batch · num_heads "
                    f"= {B * H} rows (this attention has {H} heads left)"
                )
            mask = mask.reshape(B, H, L, S)
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.reshape(B, 1, 1, S)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or (p == 0.0 and is_exporting()):
            # spelled out when exported: onnxruntime folds kᵀ into its MatMul here, where the
            # exporter's decomposition of scaled_dot_product_attention leaves a Transpose node
            # that costs as much as the MatMul on CPU (BENCHMARKS §1, profile_vit_ort.py)
            scores = (q * (1 / math.sqrt(D))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if not need_weights and mask is not None:
                # as scaled_dot_product_attention: a query that may see no key gets zeros, not
                # the NaN of a softmax over −inf alone (which would spread to every position)
                weights = torch.where(weights.isnan(), 0.0, weights)
            heads = F.dropout(weights, p) @ v
            weights = weights if need_weights else None
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        heads = heads.squeeze(1) if H == 1 else heads.transpose(1, 2).flatten(2)
        out = self.out_proj(heads)  # (B, L, H·D): a head gate's site
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights


def leaf_pruner() -> Any:
    """A Torch-Pruning pruner that makes it see a :class:`MultiheadAttention` as one node whose
    embedding channels (the residual stream) it never cuts; its heads are removed by
    :meth:`MultiheadAttention.remove_heads_`."""
    import torch_pruning as tp

    class AttentionLeaf(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise InputError("compressdrop removes an attention's heads, not its embed_dim")

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.MultiheadAttention) -> int:
            return layer.embed_dim

        def get_in_channels(self, layer: nn.MultiheadAttention) -> int:
            return layer.embed_dim

    return AttentionLeaf()
