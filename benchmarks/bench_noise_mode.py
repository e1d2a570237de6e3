"""Benchmark: one θ per example (the default) against one θ per mini-batch (``noise="batch"``).

Run: .venv/bin/python benchmarks/bench_noise_mode.py [--seeds 0,1,2] [--families ...]

LeNet-300-100 on scikit-learn's digits, the learning test's protocol (tests/test_learning.py): 60
epochs of Adam from scratch with the ELBO (β = 1, warm-up 10), prune at the family's default
threshold, fine-tune 5 epochs as the lenet300 recipes do. The threshold and every hyper-parameter
are the shipped defaults (none was tuned on this comparison, so no validation split is used);
test accuracy is read once per run. Reports the share of hidden units pruned, the architecture,
test accuracy pruned and fine-tuned, and the wall time of the gated training, per seed and as
mean ± std.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressdrop.data import load_digits
from compressdrop.evaluation import evaluate
from compressdrop.gates import GATES
from compressdrop.models import build_model
from compressdrop.training import KLSchedule, Sparsifier

from common import markdown_table, save
from tests.test_learning import EPOCHS, FINETUNE_EPOCHS, FINETUNE_LR, GATE_LR, fit


def run(family: str, noise: str, seed: int, data) -> dict:
    torch.manual_seed(seed)
    model = build_model("lenet300", data.input_shape)
    sp = Sparsifier(
        model,
        len(data.x_train),
        gate=family,
        schedule=KLSchedule(beta=1.0, warmup=10),
        gate_kwargs={"noise": noise},
    )
    t0 = time.perf_counter()
    fit(model, sp, data, EPOCHS, 1e-3, GATE_LR[family], seed)
    seconds = time.perf_counter() - t0
    kept, total = sp.units()
    slim = sp.finish()
    pruned = evaluate(slim, data.x_test, data.y_test).accuracy
    fit(slim, None, data, FINETUNE_EPOCHS, FINETUNE_LR, 0.0, seed)
    return {
        "family": family,
        "noise": noise,
        "seed": seed,
        "pruned share": 1 - kept / total,
        "architecture": slim.prune_report.architecture(),
        "acc pruned": pruned,
        "acc fine-tuned": evaluate(slim, data.x_test, data.y_test).accuracy,
        "train s": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--families", default=",".join(GATES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for family in args.families.split(","):
        for noise in ("example", "batch"):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run(family, noise, seed, data))
                print(rows[-1], flush=True)
    summary = []
    for family in args.families.split(","):
        for noise in ("example", "batch"):
            rs = [r for r in rows if r["family"] == family and r["noise"] == noise]
            row = {"family": family, "noise": noise}
            for key in ("pruned share", "acc pruned", "acc fine-tuned", "train s"):
                vals = [r[key] for r in rs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[key] = f"{statistics.mean(vals):.4g} ± {sd:.2g}"
            summary.append(row)
    cols = ["family", "noise", "pruned share", "acc pruned", "acc fine-tuned", "train s"]
    table = markdown_table(summary, cols)
    print(table)
    save("noise_mode", {"args": vars(args), "rows": rows, "summary": summary, "table": table})


if __name__ == "__main__":
    main()
