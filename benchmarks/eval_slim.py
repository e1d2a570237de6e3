"""Test accuracy, units and FLOP reduction of slim models that ``bench_accuracy_size.py train``
wrote, grouped by a label per results folder: for comparing two versions of the gate code on the
same protocol (BENCHMARKS.md §3, "the LeNet-5 log-normal recipe before and after").

Run: python benchmarks/eval_slim.py --out NAME LABEL=RESULTS_DIR [LABEL=RESULTS_DIR ...]
     (RESULTS_DIR: a snapshot's benchmarks/results; every runs/lenet5/seed*/lognormal-b32/slim.pt)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, evaluate

from common import markdown_table, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", help="LABEL=RESULTS_DIR")
    ap.add_argument("--job", default="lognormal-b32")
    ap.add_argument("--net", default="lenet5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default="eval_slim")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    example = data.x_test[:2]
    rows, summary = [], []
    for spec in args.folders:
        label, folder = spec.split("=", 1)
        runs = sorted(Path(folder).glob(f"runs/{args.net}/seed*/{args.job}/slim.pt"))
        group = []
        for path in runs:
            seed = int(path.parent.parent.name.removeprefix("seed"))
            dense = load_model(path.parent.parent / "dense-10ep.pt").eval()
            slim = load_model(path).eval()
            row = {
                "code": label,
                "seed": seed,
                "units": json.loads(
                    (
                        Path(folder) / "jobs" / args.net / f"seed{seed}" / f"{args.job}.json"
                    ).read_text()
                )["units"],
                "dense test acc": evaluate(dense, data.x_test, data.y_test).accuracy,
                "test acc": evaluate(slim, data.x_test, data.y_test).accuracy,
                "FLOPs ×": count_flops(dense, example) / count_flops(slim, example),
            }
            row["points below dense"] = 100 * (row["dense test acc"] - row["test acc"])
            rows.append(row)
            group.append(row)
            print(row, flush=True)
        if group:
            entry = {"code": label, "seeds": len(group)}
            for key in ("test acc", "points below dense", "FLOPs ×"):
                values = [r[key] for r in group]
                entry[key] = statistics.mean(values)
                entry[key + " std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(entry)
    cols = ["code", "seed", "units", "dense test acc", "test acc", "points below dense", "FLOPs ×"]
    table = markdown_table(rows, cols)
    print(table)
    print(markdown_table(summary, list(summary[0])))
    save(args.out, {"args": vars(args), "rows": rows, "summary": summary, "table": table})


if __name__ == "__main__":
    main()
