"""Accuracy against size over a sweep of pruning thresholds drawn from one trained gated model."""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._io import atomic_write
from ..errors import InputError
from ..gating import named_gates
from .metrics import evaluate
from .model_size import count_flops, count_params

__all__ = [
    "SweepRow",
    "default_thresholds",
    "pareto_front",
    "plot_sweep",
    "sweep",
    "threshold_labels",
    "write_sweep",
]


@dataclass(frozen=True)
class SweepRow:
    """One slim model of the sweep (``threshold`` 0 keeps every unit: the unpruned reference)."""

    threshold: float
    source: (
        str  # which knob produced the point: "threshold" (free) — β points come from separate runs
    )
    architecture: str
    units: int
    accuracy: float
    nll: float
    params: int
    flops: int
    onnx_bytes: int
    latency_ms: float
    latency_batch: int
    threads: int
    provider: str
    device: str
    #: the NLL in bits per token for byte-level text (bits per byte); None for a classifier
    bits_per_byte: float | None = None
    pareto: bool = False

    @property
    def quality(self) -> float:
        """What the Pareto front maximizes: accuracy, or minus the bits per byte for text."""
        return self.accuracy if self.bits_per_byte is None else -self.bits_per_byte


def default_thresholds(model: nn.Module, n: int = 10) -> list[float]:
    """``n`` thresholds spread over the quantiles of the model's SNRs, plus each family's default."""
    snr = torch.cat([g.snr().detach().flatten() for _, g in named_gates(model)]).double()
    qs = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    values = {round(float(v), 6) for v in snr.quantile(qs)}
    values |= {round(float(g.default_threshold), 6) for _, g in named_gates(model)}
    return sorted(v for v in values if v > 0)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (size, accuracy) points: True where no other point is at most as large and more accurate."""
    flags = []
    for i, (s, a) in enumerate(points):
        dominated = any(
            (s2 <= s and a2 >= a) and (s2 < s or a2 > a)
            for j, (s2, a2) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def threshold_labels(values: Sequence[float], digits: int = 4) -> list[str]:
    """``values`` with ``digits`` significant digits, or as many more (up to 9) as keep distinct
    values apart: thresholds a short training leaves close together read 145 on every row."""
    for d in range(digits, 10):
        labels = [f"{v:.{d}g}" for v in values]
        if len(set(labels)) == len(set(values)):
            break
    return labels


def sweep(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    thresholds: list[float] | None = None,
    *,
    device: str = "auto",
    latency_batch: int = 256,
    threads: int | None = None,
    repeats: int = 30,
    progress: Callable[[SweepRow, str], None] | None = None,
    text: bool = False,
    uniform: bool = False,
    bytes_per_token: float = 1.0,
) -> list[SweepRow]:
    """Build the slim model at each threshold and measure it (``uniform``: every layer of a
    stack keeps as many units, as ``prune(uniform=True)``).

    Accuracy and NLL run in PyTorch on ``device``; with ``text`` each row also carries the bits
    per byte (bits per token over ``bytes_per_token``, the test split's: 1 where a token is a
    byte), and the Pareto front is drawn on those.
    Latency runs the exported ONNX file in onnxruntime (CUDA provider on a GPU, CPU otherwise) at
    ``latency_batch`` with ``threads`` intra-op threads. Row 0 is threshold 0: every unit kept,
    the unpruned reference. ``progress`` is called with each row as it is measured and its
    threshold's label (:func:`threshold_labels` of all the thresholds, so that no two read alike).
    """
    from ..export import export_onnx
    from ..pruning import PruneReport, PruningWarning, check_threshold, prune
    from ..runtime import resolve_device
    from .latency import ort_latency

    if latency_batch < 1:
        raise InputError(f"latency_batch must be ≥ 1, got {latency_batch}")
    dev = resolve_device(device)
    given = thresholds if thresholds is not None else default_thresholds(model)
    thresholds = [0.0, *(check_threshold(t) for t in given)]  # each checked before any work
    labels = threshold_labels(thresholds)
    example = x_test[:2]
    # onnxruntime's CUDA provider on a GPU when this onnxruntime build has one (onnxruntime-gpu),
    # else its CPU provider; each row records the provider actually used
    ort_provider = "auto" if dev.type == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, thr in enumerate(thresholds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PruningWarning)
                slim = prune(model.cpu(), thr, example_inputs=example, uniform=uniform)
            rep = cast(PruneReport, slim.prune_report)
            onnx_path = Path(tmp) / f"slim{i}.onnx"
            exported = export_onnx(
                slim,
                example,
                onnx_path,
                check_batch_sizes=(1, 7),
                providers=ort_provider,
            )
            lat = ort_latency(
                onnx_path,
                latency_batch,
                threads=threads,
                provider=ort_provider,
                repeats=repeats,
            )
            m = evaluate(slim.to(dev), x_test, y_test)
            rows.append(
                SweepRow(
                    threshold=thr,
                    source="threshold",
                    architecture=rep.architecture_after,
                    units=rep.units_after,
                    accuracy=m.accuracy,
                    nll=m.nll,
                    bits_per_byte=m.bits / bytes_per_token if text else None,
                    params=count_params(slim),
                    flops=count_flops(slim.cpu(), example),
                    onnx_bytes=exported.bytes,
                    latency_ms=lat.median_ms,
                    latency_batch=latency_batch,
                    threads=threads or 0,
                    provider=lat.provider,
                    device=str(dev),
                )
            )
            if progress is not None:
                progress(rows[-1], labels[i])
    flags = pareto_front([(r.flops, r.quality) for r in rows])
    return [SweepRow(**{**asdict(r), "pareto": f}) for r, f in zip(rows, flags)]


def write_sweep(
    rows: list[SweepRow],
    out_dir: str | Path,
    title: str = "",
    dense: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``sweep.csv`` (the rows), ``sweep.json`` (``{"rows": [...], "dense": ...}``) and
    ``sweep.png`` into ``out_dir`` as a set: all three are written to temporary files first and
    moved into place only when the last is done, so a failure (the plot) leaves the folder's
    previous set whole, not new tables beside an old plot.

    ``dense``: the model before gating (``test_accuracy``, ``params``, ``flops``), drawn in the
    plot as the reference when given (``compressdrop train`` records it in ``gated.pt``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) for r in rows]
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json", "png": out / "sweep.png"}
    with contextlib.ExitStack() as stack:  # each file moved into place as the stack closes
        tmp = {k: stack.enter_context(atomic_write(p)) for k, p in paths.items()}
        with open(tmp["csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
        # what `sweep --json` prints, less the file names
        tmp["json"].write_text(json.dumps({"rows": data, "dense": dense}, indent=2))
        _draw(rows, tmp["png"], title, dense)
    return paths


def plot_sweep(
    rows: list[SweepRow], path: str | Path, title: str = "", dense: dict[str, Any] | None = None
) -> None:
    """Accuracy (bits per byte for text rows) against parameters and against FLOPs (log scale),
    Pareto front joined and its points labelled with their thresholds, the unpruned gated model
    (threshold 0) and, if given, the dense model before gating (with a dashed line at its value)
    as references."""
    with atomic_write(Path(path)) as tmp:
        _draw(rows, tmp, title, dense)


def _draw(rows: list[SweepRow], path: Path, title: str, dense: dict[str, Any] | None) -> None:
    """:func:`plot_sweep`'s figure, saved as a PNG at ``path`` (not atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ref = rows[0]
    text = ref.bits_per_byte is not None

    def y(r: SweepRow) -> float:
        return r.bits_per_byte if r.bits_per_byte is not None else 100 * r.accuracy

    what = "test bits per byte (lower is better)" if text else "test accuracy (%)"
    dense_y = None
    if dense is not None:
        dense_y = dense.get("test_bits_per_byte") if text else 100 * dense["test_accuracy"]
    for ax, key, label in (
        (axes[0], "params", "parameters"),
        (axes[1], "flops", "FLOPs per example"),
    ):
        xs = [getattr(r, key) for r in rows]
        ax.scatter(
            xs[1:],
            [y(r) for r in rows[1:]],
            c="tab:blue",
            label="slim (threshold sweep)",
        )
        front = sorted(
            (getattr(r, key), y(r))
            for r, flag in zip(rows, pareto_front([(getattr(r, key), r.quality) for r in rows]))
            if flag
        )
        ax.plot(*zip(*front), "-", c="tab:orange", label="Pareto front")
        ax.scatter(
            [getattr(ref, key)],
            [y(ref)],
            marker="*",
            s=200,
            c="black",
            label="unpruned (threshold 0)",
            zorder=3,
        )
        if dense is not None and dense_y is not None:
            ax.axhline(dense_y, ls="--", lw=1, c="grey")
            ax.scatter(
                [dense[key]],
                [dense_y],
                marker="D",
                s=60,
                c="grey",
                label="dense, before gating",
                zorder=3,
            )
        for r in rows[1:]:
            if not r.pareto:
                continue
            ax.annotate(
                f"{r.threshold:.3g}",
                (getattr(r, key), y(r)),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right" if text else "lower right")
    quality = "bits per byte" if text else "accuracy"
    fig.suptitle(
        (title + ": " if title else "") + f"{quality} against size (labels: SNR threshold)"
    )
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
