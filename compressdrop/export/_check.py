"""What every exporter here shares: run the model in eval mode on the CPU, a dynamic batch
dimension, and the check of an exported file against PyTorch at several batch sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CompressDropError

__all__ = [
    "ExportError",
    "ExportMismatchError",
    "compare_at_batches",
    "dynamic_batch",
    "eval_on_cpu",
]


class ExportError(CompressDropError, RuntimeError):
    """The model could not be exported."""


class ExportMismatchError(ExportError):
    """The exported file's output differs from PyTorch's beyond the tolerance."""


@contextlib.contextmanager
def eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on the CPU; its device and training flag come back afterwards."""
    was_training = model.training
    device = next(model.parameters()).device
    try:
        yield model.eval().cpu()
    finally:
        model.to(device).train(was_training)


def dynamic_batch() -> torch.export.Dim:
    """The batch dimension every export leaves dynamic."""
    return torch.export.Dim("batch", min=1, max=1 << 20)


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def compare_at_batches(
    model: nn.Module,
    run: Callable[[torch.Tensor], np.ndarray],
    example: torch.Tensor,
    batch_sizes: Sequence[int],
    rtol: float,
    what: str,
) -> dict[int, float]:
    """max|run(x) − model(x)| / max|model(x)| on fresh random inputs at each batch size.

    Raises:
        ExportMismatchError: naming ``what``, at the first batch size beyond ``rtol``.
    """
    errors: dict[int, float] = {}
    for b in batch_sizes:
        xb = torch.randn(b, *example.shape[1:], dtype=example.dtype)
        with torch.no_grad():
            ref = model(xb).numpy()
        got = run(xb)
        errors[b] = _rel_error(got, ref)
        if got.shape != ref.shape or not errors[b] <= rtol:
            raise ExportMismatchError(
                f"{what} differs from PyTorch at batch size {b}: relative error "
                f"{errors[b]:.3g} > {rtol:g} (shapes {got.shape} vs {ref.shape})"
            )
    return errors
