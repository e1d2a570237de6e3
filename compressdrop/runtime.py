"""Where models run: the torch device to use and an onnxruntime session on the matching provider.

Neutral ground for every layer: training, evaluation and export all ask here, so "CUDA asked for
but absent" is one error with one message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = ["ort_session", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device a ``--device`` choice names.

    Args:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Returns:
        The device to put models and data on.

    Raises:
        InputError: CUDA asked for on a machine without it, or an unknown device name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def ort_session(
    path: str | Path, device: str = "auto", threads: int | None = None
) -> tuple[Any, str]:
    """An onnxruntime session on CUDA when asked for (or ``auto`` and a GPU is there), else CPU.

    Args:
        path: the ``.onnx`` file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime's intra-op threads (``None``: its own default).

    Returns:
        ``(session, provider)``, ``provider`` being the execution provider actually in use.

    Raises:
        InputError: ``"cuda"`` asked for and this onnxruntime build has no CUDA provider.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    providers = ["CPUExecutionProvider"]
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device.startswith("cuda"):
        raise InputError("device 'cuda' requested but onnxruntime has no usable CUDA provider here")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    return session, session.get_providers()[0]
