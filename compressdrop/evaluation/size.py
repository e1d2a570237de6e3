"""Model size: parameters, FLOPs (``torch.utils.flop_counter``) and ONNX bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["SizeReport", "count_flops", "count_params", "size"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass per example, measured by ``FlopCounterMode`` at batch 1.

    As in ``torch.utils.flop_counter``: a multiply-add counts 2 FLOPs, and only matrix products and
    convolutions are counted (element-wise work is negligible beside them).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    x = example_input[:1]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class SizeReport:
    """Parameters, FLOPs per example and (for an exported model) bytes of the ONNX file."""

    params: int
    flops: int
    onnx_bytes: int | None = None

    def reduction_from(self, dense: SizeReport) -> dict[str, float]:
        """How many times smaller than ``dense`` this model is, per measure."""
        out = {
            "params": dense.params / max(self.params, 1),
            "flops": dense.flops / max(self.flops, 1),
        }
        if self.onnx_bytes and dense.onnx_bytes:
            out["onnx_bytes"] = dense.onnx_bytes / self.onnx_bytes
        return out


def size(
    model: nn.Module, example_input: torch.Tensor, onnx_path: str | Path | None = None
) -> SizeReport:
    """Parameters, FLOPs and, when ``onnx_path`` is given, its bytes on disk."""
    nbytes = os.path.getsize(onnx_path) if onnx_path is not None else None
    return SizeReport(count_params(model), count_flops(model, example_input), nbytes)
