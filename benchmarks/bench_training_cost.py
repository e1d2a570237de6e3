"""Benchmark 3: time of a gated training step against a plain one, per gate family.

Run: .venv/bin/python benchmarks/bench_training_cost.py [--steps 60] [--net lenet5]
Target (DESIGN.md): a gated step costs at most 1.2× a plain one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import compressdrop as cd
from compressdrop.gates import GATES
from compressdrop.models import build_model

from common import markdown_table, save


def step_times(model, x, y, n_train, steps, gated):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 10):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        if gated:
            loss = loss + cd.kl(model) / n_train
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 10:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nets", default="lenet300,lenet5")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for net in args.nets.split(","):
        x = torch.randn(args.batch, 1, 28, 28)
        y = torch.randint(0, 10, (args.batch,))
        plain = step_times(build_model(net).train(), x, y, 60000, args.steps, False)
        for family in GATES:
            model = cd.attach(build_model(net), gate=family).train()
            gated = step_times(model, x, y, 60000, args.steps, True)
            rows.append(
                {
                    "net": net,
                    "family": family,
                    "plain ms": plain,
                    "gated ms": gated,
                    "ratio": gated / plain,
                }
            )
            print(rows[-1], flush=True)
    table = markdown_table(rows, ["net", "family", "plain ms", "gated ms", "ratio"])
    print(table)
    save("training_cost", {"args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
