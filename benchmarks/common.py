"""Helpers shared by the benchmark scripts: machine facts and a JSON/markdown result writer."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from compressdrop.evaluation import ort_latency

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def ort_in_turns(
    paths: dict[str, Path], batch: int, rounds: int, repeats: int, warmup: int = 10
) -> dict[str, list[float]]:
    """Milliseconds a batch of each ONNX model in ``paths``, one value a round: the models take
    turns (the order reversed every other round), one onnxruntime session each a round (CPU, 2
    threads, the median of ``repeats`` runs), so that a change of load hits every model alike."""
    ms: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for k in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            rep = ort_latency(
                paths[k], batch, threads=2, provider="cpu", warmup=warmup, repeats=repeats
            )
            ms[k].append(rep.median_ms)
    return ms
