"""A small vision transformer (Dosovitskiy et al. 2021) for 28×28 and 8×8 images.

Built from PyTorch's own layers (``nn.TransformerEncoderLayer``, pre-norm, GELU), so that a slim
model needs no compressdrop code to load and exports to ONNX as standard attention. Gates find
its attention heads (``self_attn``) and MLP neurons (``linear1``); the residual stream stays at
full width (its units pass through LayerNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from .record import tag

__all__ = ["TinyViT", "vit_tiny"]


class TinyViT(nn.Module):
    """Patches (a strided conv) → class token + learned positions → pre-norm encoder layers →
    the class token → LayerNorm → Linear."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp: int,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise InputError(f"vit: patch {patch} does not tile a {h}×{w} image")
        if dim % heads:
            raise InputError(f"vit: width {dim} is not a multiple of {heads} heads")
        self.patch = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)``."""
        t = self.patch(x).flatten(2).transpose(1, 2)
        # t.shape[0], not len(t): len() would fix the batch size of an exported program
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        # the class token is taken before the final LayerNorm (which acts on each token alone):
        # the same logits, and onnxruntime fuses no residual Add into a SkipLayerNormalization,
        # which ran 7× slower per row than a LayerNormalization (BENCHMARKS.md §1, the ViT)
        return self.head(self.norm(self.encoder(t)[:, 0]))


def vit_tiny(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    patch: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp: int = 128,
) -> nn.Module:
    """Build a :class:`TinyViT` with its ``arch`` record.

    The defaults (a 4×4 grid of patches: 7×7 at 28×28, 2×2 for 8×8 digits; width 64, 4 layers of
    4 heads, MLP 128; at 28×28 139 k parameters and 4.85 M FLOPs an image) train on Fashion-MNIST
    in about 30 s an epoch (without gates) on one CPU core.

    Args:
        input_shape: one image's ``(C, H, W)``; the patch must tile it.
        num_classes: outputs of the last layer.
        patch: side of the square patches; ``None``: a quarter of the shorter side (a 4×4 grid on
            a square image). The record keeps the number.
        dim: width of the residual stream.
        depth: encoder layers.
        heads: attention heads per layer.
        mlp: hidden units of each layer's MLP.

    Raises:
        InputError: the patch does not tile the image, or the width is not a multiple of heads.
    """
    if patch is None:
        patch = max(1, min(input_shape[1:]) // 4)
    model = TinyViT(input_shape, num_classes, patch, dim, depth, heads, mlp)
    kwargs = {"patch": patch, "dim": dim, "depth": depth, "heads": heads, "mlp": mlp}
    return tag(model, "vit", input_shape, num_classes, **kwargs)
