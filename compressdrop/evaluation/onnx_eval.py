"""Accuracy and NLL of an ONNX classifier, run in onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..runtime import check_labels, correct, ort_feed_dtype, ort_run, ort_session
from .metrics import prediction_loss

__all__ = ["evaluate_onnx"]


def evaluate_onnx(
    path: str | Path, x: torch.Tensor, y: torch.Tensor, device: str = "auto", batch_size: int = 512
) -> dict[str, Any]:
    """Accuracy and NLL of the ONNX model at ``path`` on ``(x, y)``, plus its size on disk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        session, provider = ort_session(path, device)
    except Exception as e:  # onnxruntime raises its own exception types for corrupt files
        if isinstance(e, ValueError):
            raise
        raise InputError(f"{path}: onnxruntime cannot load it: {e}") from None
    inp = session.get_inputs()[0]
    name = inp.name
    expected = tuple(inp.shape[1:])
    mismatch = len(expected) != x.dim() - 1 or any(
        isinstance(e, int) and e != a for e, a in zip(expected, x.shape[1:])
    )
    if mismatch:
        raise InputError(
            f"{path} expects inputs of shape {expected} but the data has {tuple(x.shape[1:])}"
        )
    dtype = ort_feed_dtype(inp)  # token ids stay integers
    logits = np.concatenate(
        [
            ort_run(session, {name: x[i : i + batch_size].numpy().astype(dtype)}, path)
            for i in range(0, len(x), batch_size)
        ]
    )
    t = torch.from_numpy(logits)
    if t.shape[0] != len(y) or t.dim() != y.dim() + 1:
        raise InputError(
            f"{path}: its output has shape {tuple(t.shape)}, not logits for the data's "
            f"{len(y)} examples {tuple(y.shape[1:]) or ''} (an ONNX graph that draws Monte-Carlo "
            "samples is evaluated with --mc)"
        )
    check_labels(t.shape[-1], y)
    nll = float(prediction_loss(t, y))  # labels (N, T): next-token prediction, per token
    acc = correct(t, y) / y.numel()
    return {
        "model": str(path),
        "n": y.numel(),  # examples, or predicted tokens (labels (N, T))
        "accuracy": acc,
        "nll": nll,
        "onnx_bytes": _onnx_bytes(path),
        "provider": provider,
    }


def _onnx_bytes(path: Path) -> int:
    """Bytes on disk, counting an external-data file next to the model if the exporter wrote one."""
    total = os.path.getsize(path)
    data = path.with_name(path.name + ".data")
    return total + (os.path.getsize(data) if data.exists() else 0)
