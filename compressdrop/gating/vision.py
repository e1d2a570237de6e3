"""The heads of torchvision's Swin Transformer (V1 and V2) and MaxViT as units.

torchvision's ``ShiftedWindowAttention`` hands its projections' weights to a function instead of
calling them, and that function takes the head size from the residual width (``C //
num_heads``), so a head can be neither gated nor removed there. When its heads are gated, the
module becomes a subclass (:func:`prunable`) whose forward computes the same windowed attention
but calls ``proj`` as a layer (the gate's site: its input, split into heads) and reads the head
size from ``qkv``. Removing heads then cuts their rows of ``qkv``, their columns of ``proj`` and
their per-head tables: V1's relative position bias table (a column per head), V2's ``logit_scale``
and the last layer of its bias MLP (``cpb_mlp``, a row per head). The slim module stays this
subclass; its torch.export program and ONNX graph need no compressdrop.

MaxViT's ``RelativePositionalMultiHeadAttention`` calls its output projection (``merge``) as a
layer but reshapes the heads to the residual width; its subclass reshapes them to their own
width, and removal cuts the bias table's columns and sets ``n_heads``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HeadSpec, cut_features, register_attention

__all__: list[str] = []  # internal to compressdrop.gating

_PRUNABLE: dict[type, type] = {}


def _shift_mask(
    pad_h: int, pad_w: int, window: list[int], shift: list[int], device
) -> torch.Tensor:
    """``(windows, N, N)``: 0 where two positions of a window came from the same region before
    the cyclic shift, −100 where the shift brought them together."""
    region = torch.zeros(pad_h, pad_w, device=device)
    rows = (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None))
    cols = (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            region[r, c] = 3 * i + j
    n = window[0] * window[1]
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, n)
    differ = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, -100.0)


class _WindowAttention:
    """The forward of a prunable ``ShiftedWindowAttention`` (mixed into a subclass of it)."""

    window_size: list[int]
    shift_size: list[int]
    num_heads: int
    attention_dropout: float
    dropout: float
    training: bool
    qkv: nn.Linear
    proj: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed (shifted) multi-head attention of ``x`` ``(B, H, W, C)``; output likewise."""
        B, H, W, C = x.shape
        win, shift = list(self.window_size), list(self.shift_size)
        x = F.pad(x, (0, 0, 0, (-W) % win[1], 0, (-H) % win[0]))
        pad_h, pad_w = x.shape[1], x.shape[2]
        shift = [0 if win[i] >= (pad_h, pad_w)[i] else shift[i] for i in range(2)]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        gh, gw, n = pad_h // win[0], pad_w // win[1], win[0] * win[1]
        x = x.view(B, gh, win[0], gw, win[1], C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
        heads = self.num_heads
        inner = self.qkv.weight.shape[0] // 3
        scale = getattr(self, "logit_scale", None)
        bias: torch.Tensor | None = self.qkv.bias
        if scale is not None and bias is not None:  # V2: keys get no bias
            bias = torch.cat(
                [bias[:inner], torch.zeros_like(bias[inner : 2 * inner]), bias[2 * inner :]]
            )
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(x.shape[0], n, 3, heads, inner // heads).permute(2, 0, 3, 1, 4)
        if scale is not None:  # V2: cosine attention with a learned temperature per head
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(scale, max=math.log(100.0)).exp()
        else:
            attn = (q * (inner // heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + self.get_relative_position_bias()  # type: ignore[attr-defined]
        if shifted:
            mask = _shift_mask(pad_h, pad_w, win, shift, x.device)
            attn = attn.view(B, gh * gw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(-1, n, inner)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        C = x.shape[-1]
        x = (
            x.view(B, gh, gw, win[0], win[1], C)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(B, pad_h, pad_w, C)
        )
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class _GridAttention:
    """The forward of a prunable MaxViT ``RelativePositionalMultiHeadAttention``."""

    n_heads: int
    head_dim: int
    scale_factor: float
    to_qkv: nn.Module
    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention within each group of ``x`` ``(B, G, P, D)``; output likewise."""
        B, G, P, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        q, k, v = (
            t.reshape(B, G, P, heads, dim).transpose(2, 3)
            for t in torch.chunk(self.to_qkv(x), 3, dim=-1)
        )
        attn = q @ (k * self.scale_factor).transpose(-2, -1)
        bias = self.get_relative_positional_bias()  # type: ignore[attr-defined]
        out = F.softmax(attn + bias, dim=-1) @ v
        return self.merge(out.transpose(2, 3).reshape(B, G, P, heads * dim))


def prunable(m: nn.Module) -> nn.Module:
    """``m`` (a torchvision ``ShiftedWindowAttention``/``V2`` or MaxViT attention) made a subclass
    whose forward calls its output projection and reads the heads' width from their own count;
    the same outputs. ``m`` itself, changed."""
    base = type(m)
    if base not in _PRUNABLE.values():
        m.__class__ = _subclass(base)
    return m


def _subclass(base: type) -> type:
    """The prunable subclass of a torchvision attention class (made once)."""
    if base not in _PRUNABLE:
        mixin = (
            _GridAttention if hasattr(base, "get_relative_positional_bias") else _WindowAttention
        )
        name = f"Prunable{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _PRUNABLE[base] = cls
    return _PRUNABLE[base]


def __getattr__(name: str) -> type:
    """The prunable subclasses by name, so that a pickled slim model (``torch.save(model)``)
    finds its attentions' classes again in a new process."""
    if name.startswith("Prunable"):
        from torchvision.models import maxvit, swin_transformer

        for module in (swin_transformer, maxvit):
            base = getattr(module, name.removeprefix("Prunable"), None)
            if isinstance(base, type):
                return _subclass(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cut_tables(m: nn.Module, keep: torch.Tensor) -> None:
    """The per-head tables of the heads ``keep``: V1's bias table columns, V2's temperatures and
    bias-MLP rows."""
    scale = getattr(m, "logit_scale", None)
    if isinstance(scale, nn.Parameter):
        m.logit_scale = nn.Parameter(scale.data[keep].clone())
        mlp = m.get_submodule("cpb_mlp")
        assert isinstance(mlp, nn.Sequential)
        last = mlp[-1]
        assert isinstance(last, nn.Linear)
        kept = set(keep.tolist())
        cut = [h for h in range(last.out_features) if h not in kept]
        cut_features(last, cut, out=True)
    else:
        table = m.get_parameter("relative_position_bias_table")
        m.relative_position_bias_table = nn.Parameter(table.data[:, keep].clone())


def register_torchvision() -> None:
    """Register the Swin and MaxViT attentions' head specs."""
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import (
        ShiftedWindowAttention,
        ShiftedWindowAttentionV2,
    )

    register_attention(
        (ShiftedWindowAttention, ShiftedWindowAttentionV2),
        HeadSpec(o="proj", qkv="qkv", prepare=prunable, tables=_cut_tables),
    )
    register_attention(
        RelativePositionalMultiHeadAttention,
        HeadSpec(o="merge", qkv="to_qkv", heads="n_heads", prepare=prunable, tables=_cut_tables),
    )
