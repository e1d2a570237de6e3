"""CPU time a gated training step spends in the gates' backward nodes (issue 17).

    python benchmarks/probe_gate_backward.py --net resnet18 --family lognormal --batch 256

One eager step of ``bench_training_cost.py``'s net with the family's gates, profiled
(``torch.profiler``) ``--steps`` times after a warm-up: each step's total time in the autograd
nodes of the gate multiplies, the fused BatchNorm + gate and the draws (``evaluate_function:
...`` events, their inclusive CPU time), and the step's wall time. Less noisy than the step ratio
for a change inside those nodes: run it with another commit's package on ``PYTHONPATH`` for the
"before". Results: ``benchmarks/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_training_cost as bench
import torch
from torch.profiler import ProfilerActivity, profile

from common import save

NODES = ("_GateMulBackward", "_GatedBatchNormBackward", "LogNormalDrawBackward",
         "NormalDrawBackward", "_KeepOutputBackward")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="resnet18", choices=sorted(bench.NETS))
    ap.add_argument("--family", default="lognormal")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="gate_backward")
    args = ap.parse_args()
    shape = bench.NETS[args.net][1]
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    _, _, step = bench.make_step(args.net, args.family, "eager", args.batch, torch.device("cpu"))
    step(x, y)
    rows = []
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(x, y)
            wall = time.perf_counter() - t0
        ms = {n: 0.0 for n in NODES}
        for e in prof.key_averages():
            name = e.key.removeprefix("autograd::engine::evaluate_function: ")
            if e.key != name and name in ms:
                ms[name] += e.cpu_time_total / 1e3
        rows.append({"wall_ms": wall * 1e3, "gate_backward_ms": sum(ms.values()), "by_node": ms})
        print(
            f"step {wall * 1e3:.0f} ms, gate backward nodes {sum(ms.values()):.0f} ms", flush=True
        )
    summary = {k: statistics.median(r[k] for r in rows) for k in ("wall_ms", "gate_backward_ms")}
    print("median", {k: round(v) for k, v in summary.items()})
    print(save(args.out, {"args": vars(args), "torch": torch.__version__, "steps": rows,
                          "median": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
