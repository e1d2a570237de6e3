"""One family's β chosen again over a grid that grew (issue 18): the report phase of
``bench_accuracy_size.py`` for a single family, for when only that family's jobs were added and
the other methods' models are not on this machine.

    python benchmarks/select_family.py --net lenet5 --family lognormal --seeds 0,1,2 \
        --out lenet5_lognormal_grid

Per seed, with the same rule as the report: among the family's jobs (every β whose job JSON is in
``results/jobs/<net>/seed<S>/``) whose validation accuracy lies within 1 point of the seed's dense
net, the one with the largest FLOP reduction (else the best on validation). The test split is
read for the dense net and the chosen model only. The dense net's validation accuracy is computed
again from ``results/runs/<net>/seed<S>/dense-<P>ep.pt`` (a retrained one should give the value
the three-seed report recorded: printed beside it; where it does not, the family's older jobs
started from another dense net than the new ones). Latency: onnxruntime, the dense and the chosen
net in turns (``common.ort_in_turns``, five rounds, two threads) at ``--batch``. A chosen model
that the three-seed report chose too and that is not on this machine keeps that report's test
accuracy and speed-up (its row says ``"from": "report"``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_accuracy_size import pick_beta

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, evaluate
from compressdrop.export import export_onnx

from common import RESULTS, markdown_table, ort_in_turns, save


def seed_row(args, seed: int, data, recorded: dict, reported: dict) -> dict:
    jobs = RESULTS / "jobs" / args.net / f"seed{seed}"
    cands = [json.loads(p.read_text()) for p in sorted(jobs.glob(f"{args.family}-b*.json"))]
    if not cands:
        raise SystemExit(f"no {args.family} jobs under {jobs}")
    _, val = data.split_validation(0.1, seed=seed)
    example = data.x_test[:2]
    dense = load_model(RESULTS / "runs" / args.net / f"seed{seed}" / f"dense-{args.pretrain}ep.pt")
    dense = dense.eval()
    d_val = evaluate(dense, val.x_test, val.y_test).accuracy
    d_flops = count_flops(dense, example)
    pick = pick_beta(cands, d_val)
    row = {
        "seed": seed,
        "dense val acc": d_val,
        "dense val acc recorded": recorded[seed]["val acc"] if seed in recorded else None,
        "dense test acc": evaluate(dense, data.x_test, data.y_test).accuracy,
        # by job name: jobs of one β with other kl_scale factors (``name@glob=factor``) apart
        "grid": {r["job"]: (r["val_acc"], d_flops / r["flops"], r["units"]) for r in cands},
        "chosen job": pick["job"],
        "chosen β": pick["beta"],
        "units": pick["units"],
        "val acc": pick["val_acc"],
        "FLOPs ×": d_flops / pick["flops"],
        "train s": pick["train_seconds"],
    }
    old = reported.get(seed)
    if not (RESULTS / pick["path"]).exists():
        # the report chose this model before and read its test accuracy and speed then; the
        # model itself is not on this machine
        if old is None or old["units"] != pick["units"]:
            raise SystemExit(f"seed {seed}: {pick['path']} is missing and no report row has it")
        return row | {
            "test acc": old["test acc"],
            "speed-up": old["speed-up"],
            "dense test acc": recorded[seed]["test acc"],  # the dense net it was pruned from
            "from": "report",
        }
    slim = load_model(RESULTS / pick["path"]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "slim": Path(tmp) / "slim.onnx"}
        export_onnx(dense, example, paths["dense"], check_batch_sizes=(1, 7))
        export_onnx(slim, example, paths["slim"], check_batch_sizes=(1, 7))
        ms = {k: statistics.median(v) for k, v in ort_in_turns(paths, args.batch, 5, 20).items()}
    return row | {
        "test acc": evaluate(slim, data.x_test, data.y_test).accuracy,
        "speed-up": ms["dense"] / ms["slim"],
        "from": "this run",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="lenet5")
    ap.add_argument("--family", default="lognormal")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    report = RESULTS / f"accuracy_size_{args.net}_seeds012.json"
    recorded, reported = {}, {}
    if report.exists():  # the dense nets' validation accuracy as the three-seed report read it
        rows = json.loads(report.read_text())["rows"]
        recorded = {r["seed"]: r for r in rows if r["key"] == "dense"}
        reported = {r["seed"]: r for r in rows if r["key"] == args.family}
    data = load_dataset(args.data)
    rows = [seed_row(args, int(s), data, recorded, reported) for s in args.seeds.split(",")]
    for r in rows:
        print(r, flush=True)

    def ms(key: str, scale: float = 1.0) -> str:
        v = [r[key] * scale for r in rows]
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"

    drop = [100 * (r["test acc"] - r["dense test acc"]) for r in rows]
    summary = {
        "family": args.family,
        "chosen job": [r["chosen job"] for r in rows],
        "chosen β": [r["chosen β"] for r in rows],
        "test acc %": ms("test acc", 100),
        "points vs dense": f"{statistics.mean(drop):.2f} ± {statistics.stdev(drop):.2f}",
        "FLOPs ×": ms("FLOPs ×"),
        "speed-up": ms("speed-up"),
    }
    print(markdown_table(rows, ["seed", "chosen job", "units", "val acc", "test acc", "FLOPs ×"]))
    print(summary)
    print(save(args.out, {"args": vars(args), "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
