"""Latency of an ONNX model in onnxruntime, and of a PyTorch module."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError

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
    length: int | None = None,
    eos_token_id: int | None = None,
) -> LatencyReport:
    """Time ``repeats`` runs of the ONNX model on a random batch (after ``warmup`` runs).

    Every input of the model is fed: floating-point inputs with standard normal values, integer
    inputs (token ids, attention masks) with ones (an id every vocabulary of two or more has; a
    mask that keeps every position), boolean inputs with ``True``. For a model that reads each
    row's end-of-sequence state (BART's classifier), the token ids' rows end with that id, as
    :func:`torch_latency`'s do.

    Args:
        length: the size of every dynamic dimension after the batch (a sequence model exported
            with dynamic lengths); ``None`` where the model has none.
        eos_token_id: the end-of-sequence id that ends each row of token ids (``input_ids``, or
            the only integer input); ``None``: the file's ``eos_token_id`` metadata, which
            :func:`~compressdrop.export_onnx` records for such a model, else none.

    Raises:
        InputError: an input has a dynamic dimension beyond the batch and ``length`` is
            ``None``, or a type this cannot fill (strings, complex numbers).
    """
    from ..runtime import ort_session

    session, used = ort_session(path, provider, threads)
    feed = _ort_feed(session.get_inputs(), batch_size, length)
    if eos_token_id is None:
        recorded = session.get_modelmeta().custom_metadata_map.get("eos_token_id")
        eos_token_id = int(recorded) if recorded is not None and recorded.isdigit() else None
    if eos_token_id is not None:
        _end_ids_with(feed, eos_token_id)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return _summary(times, batch_size, threads, used)


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64,
               "tensor(float16)": np.float16}  # fmt: skip


def _ort_feed(inputs: list, batch_size: int, length: int | None) -> dict[str, np.ndarray]:
    """One random batch for onnxruntime inputs ``inputs`` (see :func:`ort_latency`)."""
    rng = np.random.default_rng(0)
    feed = {}
    for inp in inputs:
        shape = [batch_size]
        for i, d in enumerate(inp.shape[1:], 1):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif length is not None:
                shape.append(length)
            else:
                raise InputError(
                    f"input {inp.name!r} has a dynamic dimension {i} ({d!r}): pass its size "
                    "as length=..."
                )
        kind = inp.type
        if kind in _ORT_FLOATS:
            feed[inp.name] = rng.standard_normal(shape).astype(_ORT_FLOATS[kind])
        elif kind.startswith(("tensor(int", "tensor(uint")):
            feed[inp.name] = np.ones(shape, dtype=np.dtype(kind[len("tensor(") : -1]))
        elif kind == "tensor(bool)":
            feed[inp.name] = np.ones(shape, dtype=bool)
        else:
            raise InputError(f"input {inp.name!r} is a {kind}, which a latency run cannot fill")
    return feed


def _end_ids_with(feed: dict[str, np.ndarray], eos: int) -> None:
    """End each row of the token ids in ``feed`` (``input_ids``, else its only integer input)
    with ``eos``, in place.

    Raises:
        InputError: no input is plainly the token ids.
    """
    if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
        raise InputError(f"eos_token_id must be a token id (an int ≥ 0), got {eos!r}")
    ints = [k for k, v in feed.items() if np.issubdtype(v.dtype, np.integer)]
    name = "input_ids" if "input_ids" in ints else (ints[0] if len(ints) == 1 else None)
    if name is None:
        raise InputError(
            f"eos_token_id {eos} given, but no input is plainly the token ids (inputs "
            f"{sorted(feed)}): name one input_ids"
        )
    from ..gating.inputs import end_rows_with

    feed[name] = end_rows_with(torch.from_numpy(feed[name]), eos).numpy()


def torch_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_size: int,
    *,
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyReport:
    """Time ``repeats`` eval forwards of ``model`` on a random batch like ``example_input``
    (standard normal floats; integer token ids below the largest in ``example_input`` plus one,
    each row ending in the end-of-sequence id of a model that reads it), synchronizing CUDA."""
    device = next(model.parameters()).device
    shape = (batch_size, *example_input.shape[1:])
    if example_input.is_floating_point():
        x = torch.randn(shape, dtype=example_input.dtype, device=device)
    elif example_input.dtype == torch.bool:
        x = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        from ..gating.inputs import with_eos

        high = int(example_input.max()) + 1 if example_input.numel() else 1
        x = torch.randint(0, high, shape, dtype=example_input.dtype, device=device)
        x = with_eos(model, x)  # (BART's classifier reads each row's end-of-sequence state)
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
