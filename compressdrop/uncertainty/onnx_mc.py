"""Monte-Carlo uncertainty from an exported sampling graph (:func:`export_mc_onnx`), in
onnxruntime: what a deployed slim model answers, without PyTorch in the loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..runtime import ort_feed_dtype, ort_run, ort_session
from .mc import mc_report

__all__ = ["mc_evaluate_onnx", "onnx_mc_samples"]


def onnx_mc_samples(path: str | Path) -> int | None:
    """The samples per call of an ONNX file written by :func:`export_mc_onnx`, else ``None``."""
    from ..export import load_onnx_metadata

    value = load_onnx_metadata(path).get("mc_samples")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and 0 < int(value) <= _MAX_PER_CALL):
        raise InputError(
            f"{path}: its metadata's mc_samples is {value[:40]!r}, not a number of samples "
            f"from 1 to {_MAX_PER_CALL:,}"
        )
    return int(value)


#: the most samples per call a graph's metadata may claim (export_mc_onnx writes tens)
_MAX_PER_CALL = 1_000_000


class _Sampler:
    """Draws ``samples`` Monte-Carlo probabilities per input from an MC graph, whole calls."""

    def __init__(self, path: Path, samples: int, device: str) -> None:
        per_call = onnx_mc_samples(path)
        if per_call is None:
            raise InputError(
                f"{path} is a deterministic graph; for Monte-Carlo export the noisy slim model "
                "(compressdrop prune ... --mc-samples N writes STEM-mc.onnx)"
            )
        try:
            self.session, self.provider = ort_session(path, device)
        except Exception as e:  # onnxruntime raises its own types for corrupt files
            raise InputError(f"{path}: onnxruntime cannot load it: {e}") from None
        inp = self.session.get_inputs()[0]
        self.name = inp.name
        self.dtype = ort_feed_dtype(inp)  # token ids stay integers
        self.per_call, self.samples = per_call, samples
        self.calls = -(-samples // per_call)
        self.path, self.shape = path, list(inp.shape)[1:]  # fixed sizes are ints

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fits = len(self.shape) == x.dim() - 1 and all(
            not isinstance(want, int) or want == got for want, got in zip(self.shape, x.shape[1:])
        )
        if not fits:
            want = tuple(d if isinstance(d, int) else "any" for d in self.shape)
            text = f" (text: context={want[0]})" if len(want) == 1 else ""
            raise InputError(
                f"{self.path} takes inputs of shape {want} after the batch, the data has "
                f"{tuple(x.shape[1:])}: give data of that shape{text}"
            )
        xb: np.ndarray = x.numpy().astype(self.dtype)
        draws = [ort_run(self.session, {self.name: xb}, self.path) for _ in range(self.calls)]
        # (S, N, C), or per token (S, N, T, V) → (S, N·T, V), as mc_report reads them
        return torch.from_numpy(np.concatenate(draws)[: self.samples]).flatten(1, -2)


def mc_evaluate_onnx(
    path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int = 30,
    x_ood: torch.Tensor | None = None,
    *,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Monte-Carlo metrics of an MC graph on ``(x, y)``, as :func:`mc_evaluate` gives them.

    The graph draws its own samples per call; ``samples`` takes as many calls as needed (whole
    calls, the first ``samples`` draws kept). Also reports ``seconds_per_batch``: the median
    wall time of drawing ``samples`` samples for one batch of ``batch_size`` inputs.

    Raises:
        InputError: the file is not an MC graph (no ``mc_samples`` metadata) or does not load,
            or ``samples`` < 2.
    """
    if samples < 2:
        raise InputError(f"samples must be ≥ 2, got {samples}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    run = _Sampler(path, samples, device)

    def draw_all(xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([run(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)], 1)

    times = []
    for _ in range(5):
        t = time.perf_counter()
        run(x[:batch_size])
        times.append(time.perf_counter() - t)
    ood = None if x_ood is None else draw_all(x_ood)
    out: dict[str, Any] = dict(mc_report(draw_all(x), y, ood))
    out.update(
        samples_per_call=run.per_call,
        seconds_per_batch=float(np.median(times)),
        batch_size=batch_size,
        provider=run.provider,
    )
    return out
