"""Latency of an ONNX model in onnxruntime, and of a PyTorch module."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["LatencyReport", "ort_latency", "torch_latency"]


@dataclass(frozen=True)
class LatencyReport:
    """Median and 90th-percentile wall time of one batch, in milliseconds."""

    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int | None
    provider: str


def _summary(times: list[float], batch: int, threads: int | None, provider: str) -> LatencyReport:
    ms = sorted(t * 1e3 for t in times)
    return LatencyReport(
        statistics.median(ms), ms[min(len(ms) - 1, int(0.9 * len(ms)))], batch, threads, provider
    )


def ort_latency(
    path: str | Path,
    batch_size: int,
    *,
    threads: int | None = None,
    provider: str = "auto",
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyReport:
    """Time ``repeats`` runs of the ONNX model on a random float32 batch (after ``warmup`` runs)."""
    from ..runtime import ort_session

    session, used = ort_session(path, provider, threads)
    inp = session.get_inputs()[0]
    shape = [batch_size] + [int(d) for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return _summary(times, batch_size, threads, used)


def torch_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_size: int,
    *,
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyReport:
    """Time ``repeats`` eval forwards of ``model`` on a random batch, synchronizing CUDA."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *example_input.shape[1:], device=device)
    was = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return _summary(times, batch_size, torch.get_num_threads(), device.type)
