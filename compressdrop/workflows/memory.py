"""A model too big for the machine is refused before it is read, with what it would take: the
system's out-of-memory killer otherwise ends the process ("Killed", nothing else), possibly
minutes in and with an output half written.

What a job takes is estimated from the model's float32 weights (read from the files' headers:
:func:`~compressdrop.workflows._weights.weights_of`) times a factor per job, measured as the peak
resident set of each CLI command, one process per run, at two sizes of one family: the slope
(peak − the smaller's peak) / (weights − the smaller's weights), which leaves out what every run
holds whatever the model (torch, transformers, the data). Measured with
``benchmarks/probe_model_memory.py`` (BENCHMARKS.md §12; 2026-12-07, torch 2.13, CPU) on a
LLaMA-style decoder (a Hugging Face folder, 256 wide × 4 layers against 1024 × 8: 13 MB and
405 MB) and on torchvision's ResNet-18 against ResNet-152 (state dicts with ``--arch``: 45 MB
and 233 MB); each factor below is the smaller of the two slopes, rounded down, so that a model
that would fit is not refused: a late out-of-memory error is better than a false refusal.
Loading alone is the reader's (:class:`~compressdrop.workflows._weights.Weights`): a state dict
is held twice (the dict, then the module built from it), a ``.pt2`` program 3.5 times.

A job is refused only where its estimate exceeds all of the memory the system says is available
(:func:`~compressdrop.data.dataset.available_memory`: ``MemAvailable``, or the room under
the control group's memory limit where that is less; never where the system does not say),
and :data:`OVERRIDE` set to ``1`` lets it try.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import dataset
from ..errors import InputError
from ._weights import weights_of

__all__ = ["FACTORS", "OVERRIDE", "check_model_memory"]

#: the environment variable that turns the check off (``1``) for a user who knows better
OVERRIDE = "COMPRESSDROP_NO_MEMORY_CHECK"

#: each job's peak memory over its model's float32 weights, and what it does, for messages.
#: The slopes measured (LLaMA-style decoder / ResNet-18 → 152): eval 1.13 / 1.69, export to
#: ONNX 5.96 / 7.18, to ``.pt2`` – / 3.27, prune of a gated checkpoint 2.47 / 2.22 and prune
#: with data (sparsify on the CPU) 6.11 / 5.32 (7.76 / 6.15 before a run's template and plan
#: check shared the model's weights), both writing ``.pt``; each factor is the smaller, rounded
#: down. Not measured apart, so given a lower bound: a folder's export (the
#: model and its reloaded copy), ``sweep`` (the gated model and each threshold's slim one), and
#: a prune's ``.pt2`` or ``.onnx`` output, whose export of the slim model is left out.
FACTORS: dict[str, tuple[float, str]] = {
    "eval": (1.1, "evaluating it"),
    "export onnx": (5.9, "exporting it to ONNX"),
    "export pt2": (3.2, "exporting it as a .pt2 program"),
    "export folder": (2.0, "writing it as a Hugging Face folder"),
    "prune": (2.2, "pruning it"),
    "sweep": (2.2, "sweeping its thresholds"),
    "sparsify": (5.3, "training its gates and pruning it"),
}


def check_model_memory(path: str | Path, job: str, device: str = "cpu") -> None:
    """Refuse ``job`` (a key of :data:`FACTORS`) of the model at ``path`` where it would clearly
    take more memory than is available. A job that trains on a GPU (``device``) keeps its
    training state there: its host memory is counted as pruning's.

    Raises:
        InputError: naming the file, the estimate, the memory available and what to do.
    """
    if os.environ.get(OVERRIDE, "").strip() not in ("", "0"):
        return
    free = dataset.available_memory()
    weights = weights_of(path) if free is not None else None
    if free is None or weights is None:
        return
    if job == "sparsify" and (device.startswith("cuda") or (device == "auto" and _cuda())):
        job = "prune"
    factor, doing = FACTORS[job]
    need = max(weights.loading, int(factor * weights.model))
    if need <= free:
        return
    raise InputError(
        f"{path}: {doing} would take about {_size(need)} of memory "
        f"({need / max(weights.model, 1):.1f}× its {_size(weights.model)} of float32 weights), "
        f"more than the {_size(free)} available; run it on a machine with more memory, or set "
        f"{OVERRIDE}=1 to try anyway"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _cuda() -> bool:
    return torch.cuda.is_available()
