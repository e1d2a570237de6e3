"""Probe: does the fine-tuning schedule decide how much accuracy a strongly pruned LeNet-5 gets
back? From one gated model (a ``bench_accuracy_size.py`` job's ``gated.pt``), prune at the
recipe's threshold once, then fine-tune copies of the same slim net for the same epochs with
each schedule, in the runner's way (Adam, the runner's batch order for the fine-tune stage, the
rate set per step), and read the validation accuracy after every epoch (the test split is not
touched). Issue 18's LeNet-5 target (≥ 20× at ≤ 1 point) hangs on about half a point here.

Run: python benchmarks/probe_finetune_schedule.py --gated RUNS/lenet5/seed1/lognormal-b48/gated.pt
     --seed 1 [--epochs 5] [--arms constant:0.0003,cosine:0.001] [--out NAME]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, evaluate
from compressdrop.evaluation.metrics import prediction_loss
from compressdrop.pruning import prune
from compressdrop.recipes.schedule import lr_factor

from common import save


def tune(slim, train, val, epochs, schedule, lr, seed, batch=64):
    """The runner's fine-tune stage (stage index 2), with ``schedule`` and ``lr``."""
    model = copy.deepcopy(slim).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train.x_train, train.y_train
    n, steps = len(x), -(-len(x) // batch)
    accs = []
    for epoch in range(epochs):
        model.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * 10_007 + epoch)
        perm = torch.randperm(n, generator=gen)
        for i, lo in enumerate(range(0, n, batch)):
            idx = perm[lo : lo + batch]
            loss = prediction_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, (epoch + i / steps) / epochs)
            opt.step()
        accs.append(evaluate(model.eval(), val.x_test, val.y_test).accuracy)
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gated", required=True)
    ap.add_argument("--seed", type=int, required=True, help="the job's seed (its split)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--arms", default="constant:0.0003,cosine:0.001,cosine:0.0003,constant:0.001")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=args.seed)
    gated = load_model(args.gated).eval()
    example = data.x_test[:4]
    slim = prune(gated, None, example_inputs=example)
    start = evaluate(slim, val.x_test, val.y_test).accuracy
    rows = []
    for arm in args.arms.split(","):
        schedule, lr = arm.split(":")
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        accs = tune(slim, train, val, args.epochs, schedule, float(lr), args.seed)
        rows.append({"seed": args.seed, "schedule": schedule, "lr": float(lr),
                     "units": slim.prune_report.architecture_after,
                     "flops": count_flops(slim, example[:1]), "val_after_prune": start,
                     "val_per_epoch": accs, "seconds": time.perf_counter() - t0})  # fmt: skip
        print(rows[-1], flush=True)
    if args.out:
        save(args.out, {"gated": args.gated, "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
