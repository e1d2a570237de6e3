"""Σ a·b over each (example, unit)'s positions, for the gradient of θ in a gate's backward pass.

``torch.linalg.vecdot`` multiplies into a temporary as large as its inputs and then sums it. On
CPU a temporary of 32 MB or more (glibc's largest threshold for serving an allocation from
freshly mapped memory) is page-faulted in again at every step: for a ResNet-18-sized net's first
stage at batch 256 (256×64×32×32 float32, 64 MB) one such product took 23–27 ms where a batched
matrix-vector product over the same rows (``torch.bmm``, no temporary) took 12 ms; below that
size vecdot was as fast or faster (LeNet-5's 64×20×24×24: 0.15–0.44 against 0.44 ms in two
runs; 256×20×24×24: 0.5–0.8 against 1.8 ms). So :func:`unit_dot` takes the product on CPU from
that size on, vecdot otherwise. The two differ by float32 rounding (the order of summation).
"""

from __future__ import annotations

import torch

# from this many bytes of one operand on, the batched product (module docstring); tests lower it
BMM_BYTES = 32 * 2**20


def unit_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, U)``: Σ over the last axis of ``a * b``, for ``a`` and ``b`` of one shape ``(N, U, R)``
    and one dtype; differentiable either way (a second derivative through it works)."""
    n, u, r = a.shape
    if (
        a.device.type == "cpu"
        and a.numel() * a.element_size() >= BMM_BYTES
        and a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
    ):  # fmt: skip
        return torch.bmm(a.view(n * u, 1, r), b.view(n * u, r, 1)).view(n, u)
    return torch.linalg.vecdot(a, b)
