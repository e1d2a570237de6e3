"""What the per-example random numbers alone cost beside a plain LeNet-300-100 step (issue 17).

    python benchmarks/probe_draw_cost.py --batches 64 256

A gate with one θ per example and unit needs batch × units random numbers a step, whatever else
it does: LeNet-300-100's two gates (300 and 100 units) draw 400 a example. This times, at the
step's thread count, the bare operations those draws are made of (the uniforms, and the
log-normal family's float64 normal quantile, the concrete families' logistic transform, the
variational family's normal draws) over batch × 400 values, against the plain step of
``bench_training_cost.py`` (eager and compiled, median of ``--repeats``). Their sum over a
family's operations, divided by the plain step, is a lower bound on that family's extra step
time here with PyTorch's own kernels: the multiply, the KL, the backward pass and the optimizer's
update of the gate parameters come on top. Results: ``benchmarks/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import bench_training_cost as bench
import torch

from common import save

UNITS = 300 + 100  # LeNet-300-100's gated units


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def draws(batch: int) -> dict[str, Callable[[], object]]:
    """The bare operations of the per-example draws, over batch × 400 values."""
    p64 = torch.rand(batch, UNITS, dtype=torch.float64)
    u32 = torch.rand(batch, UNITS)
    return {
        "uniform float64": lambda: torch.rand(batch, UNITS, dtype=torch.float64),
        "ndtri float64": lambda: torch.special.ndtri(p64),
        "uniform float32": lambda: torch.rand(batch, UNITS),
        "logistic from uniform": lambda: torch.log(u32) - torch.log1p(-u32),
        "normal float32": lambda: torch.randn(batch, UNITS),
    }


FAMILY_OPS = {  # the bare draw of each family, per value
    "lognormal": ("uniform float64", "ndtri float64"),
    "concrete / hardconcrete": ("uniform float32", "logistic from uniform"),
    "variational": ("normal float32",),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default="draw_cost")
    args = ap.parse_args()
    rows = []
    for batch in args.batches:
        torch.manual_seed(0)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        row: dict = {"batch": batch, "threads": torch.get_num_threads()}
        for mode in ("eager", "compiled"):
            _, _, step = bench.make_step("lenet300", None, mode, batch, torch.device("cpu"))
            row[f"plain step ms, {mode}"] = median_ms(
                lambda s=step, a=x, b=y: s(a, b), args.repeats
            )
        ops = {k: median_ms(fn, args.repeats) for k, fn in draws(batch).items()}
        row["ns per value"] = {k: ms * 1e6 / (batch * UNITS) for k, ms in ops.items()}
        for family, names in FAMILY_OPS.items():
            ms = sum(ops[n] for n in names)
            row[f"{family}: draw ms"] = ms
            for mode in ("eager", "compiled"):
                row[f"{family}: ratio floor, {mode}"] = 1 + ms / row[f"plain step ms, {mode}"]
        rows.append(row)
        print(row, flush=True)
    print(save(args.out, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
