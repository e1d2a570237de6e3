"""Inputs under dataset shift, for judging uncertainty (Ovadia et al., NeurIPS 2019).

Images are ``(N, C, H, W)`` floats in [0, 1]. Each shift is a function of the images and an
intensity; :data:`SHIFTS` lists those the benchmark uses, intensity 0 being the clean images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["SHIFTS", "blur", "contrast", "gaussian_noise", "resize_images", "rotate", "shifted"]


def _images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"expected float images (N, C, H, W), got shape {tuple(x.shape)}")
    return x


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate each image by ``degrees`` counter-clockwise about its centre (bilinear, zeros
    outside)."""
    x = _images(x)
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype
    ).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Add N(0, σ²) pixel noise (a fixed ``seed``: every method sees the same noise), clipped to
    [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(_images(x).shape, generator=g, dtype=x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation ``sigma`` pixels (a separable kernel of radius 3σ)."""
    x = _images(x)
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(
        F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean by ``factor`` (below 1: less contrast)."""
    x = _images(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


# name → (function of images and an intensity, the intensities measured; 0 = clean)
SHIFTS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], tuple[float, ...]]] = {
    "rotation": (rotate, (0, 30, 60, 90, 120, 150, 180)),
    "gaussian_noise": (gaussian_noise, (0.1, 0.2, 0.4)),
    "blur": (blur, (0.5, 1.0, 2.0)),
    "contrast": (contrast, (0.5, 0.3, 0.1)),
}


def shifted(x: torch.Tensor, name: str, intensity: float) -> torch.Tensor:
    """``x`` under the shift ``name`` of :data:`SHIFTS` at ``intensity``.

    Raises:
        InputError: an unknown shift name.
    """
    if name not in SHIFTS:
        raise InputError(f"unknown shift {name!r}; choose one of {sorted(SHIFTS)}")
    return SHIFTS[name][0](x, intensity)


def resize_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bring images (N, C, H, W) to one example's ``shape`` (C', H', W').

    Bilinear resize (antialiased when shrinking); channels averaged to 1 or repeated from 1. Used
    for out-of-distribution sets (digits' 8×8 images for a 28×28 model, say).

    Returns:
        ``x`` itself if it already has the shape, else a new float tensor.

    Raises:
        InputError: ``x`` is not a batch of images, or the channels cannot be mapped.
    """
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() != 4 or len(shape) != 3:
        raise InputError(f"cannot resize inputs of shape {tuple(x.shape[1:])} to {tuple(shape)}")
    c, h, w = shape
    y = torch.nn.functional.interpolate(
        x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=h < x.shape[2]
    )
    if y.shape[1] != c:
        if c == 1:
            y = y.mean(1, keepdim=True)
        elif y.shape[1] == 1:
            y = y.expand(-1, c, -1, -1)
        else:
            raise InputError(f"cannot map {y.shape[1]} channels to {c}")
    return y.contiguous()
