"""Probe: does the fine-tuning schedule decide how much accuracy a strongly pruned LeNet-5 gets
back? From one gated model (a ``bench_accuracy_size.py`` job's ``gated.pt``), prune at the
recipe's threshold once, then fine-tune copies of the same slim net for the same epochs with
each schedule, in the runner's way (Adam, the runner's batch order for the fine-tune stage, the
rate set per step), and read the validation accuracy after every epoch (the test split is not
touched). Issue 18's LeNet-5 target (≥ 20× at ≤ 1 point) hangs on about half a point here.

Run: python benchmarks/probe_finetune_schedule.py --gated RUNS/lenet5/seed1/lognormal-b48/gated.pt
     --seed 1 [--epochs 5] [--arms constant:0.0003,cosine:0.001] [--out NAME]

An arm ``schedule:lr:alpha:T`` (with ``--teacher`` the seed's dense net) distils as well: the loss
is (1 − alpha)·NLL + alpha·T²·KL(teacher ‖ slim) on logits divided by T (Hinton et al. 2015).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, evaluate
from compressdrop.evaluation.metrics import prediction_loss
from compressdrop.pruning import prune
from compressdrop.recipes.schedule import lr_factor

from common import save


def tune(slim, train, val, epochs, schedule, lr, seed, batch=64, teacher=None, alpha=0.0, T=1.0):
    """The runner's fine-tune stage (stage index 2), with ``schedule`` and ``lr``; distilled from
    ``teacher`` with weight ``alpha`` at temperature ``T`` when alpha > 0."""
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
            out = model(x[idx])
            loss = prediction_loss(out, y[idx])
            if alpha > 0:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x[idx]) / T, -1)
                kd = F.kl_div(F.log_softmax(out / T, -1), soft, log_target=True,
                              reduction="batchmean")  # fmt: skip
                loss = (1 - alpha) * loss + alpha * T * T * kd
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
    ap.add_argument("--teacher", help="the dense net to distil from (arms with alpha, T)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=args.seed)
    gated = load_model(args.gated).eval()
    teacher = load_model(args.teacher).eval() if args.teacher else None
    if teacher is not None:
        print("teacher val", evaluate(teacher, val.x_test, val.y_test).accuracy, flush=True)
    example = data.x_test[:4]
    slim = prune(gated, None, example_inputs=example)
    start = evaluate(slim, val.x_test, val.y_test).accuracy
    rows = []
    for arm in args.arms.split(","):
        schedule, lr, *kd = arm.split(":")
        alpha, T = (float(kd[0]), float(kd[1])) if kd else (0.0, 1.0)
        if alpha > 0 and teacher is None:
            ap.error(f"arm {arm!r} distils: give --teacher")
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        accs = tune(slim, train, val, args.epochs, schedule, float(lr), args.seed,
                    teacher=teacher, alpha=alpha, T=T)  # fmt: skip
        rows.append({"seed": args.seed, "schedule": schedule, "lr": float(lr),
                     "distill": {"alpha": alpha, "T": T} if alpha > 0 else None,
                     "units": slim.prune_report.architecture_after,
                     "flops": count_flops(slim, example[:1]), "val_after_prune": start,
                     "val_per_epoch": accs, "seconds": time.perf_counter() - t0})  # fmt: skip
        print(rows[-1], flush=True)
    if args.out:
        save(args.out, {"gated": args.gated, "teacher": args.teacher, "epochs": args.epochs,
                        "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
