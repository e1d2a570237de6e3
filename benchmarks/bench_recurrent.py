"""Issue 6 benchmark: a 2-layer LSTM reading Fashion-MNIST row by row (28 steps of 28 features)
with each recurrent dropout scheme and without dropout; and a log-normal-gated LSTM, pruned and
exported to ONNX.

    python benchmarks/bench_recurrent.py --epochs 8 --device cpu

Protocol: hidden size 128, Adam (lr 1e-3), batch 128, gradient norm clipped at 1, seed 0, drop rate
--p for every scheme. Each run trains --epochs epochs and keeps the epoch with the best accuracy on
the validation split (10 % of the training set, seed 0); the test split is evaluated once, on that
epoch's weights. The gated run is the shipped recipe ``lstm-lognormal`` (stages from the recipe;
--beta overrides its KL weight); --report-only re-summarizes a finished gated run from its files.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import build_arch, load_checkpoint, load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, count_params, evaluate
from compressdrop.models import build_model
from compressdrop.recipes import load_recipe
from compressdrop.training.runner import run_recipe, seed_everything

from common import RESULTS, markdown_table, save

SCHEMES = ("none", "zaremba", "moon", "semeniuta", "gal")


def train_scheme(scheme, p, data, train, val, epochs, device, batch=128):
    seed_everything(0)
    model = build_model(
        "lstm_rows",
        input_shape=data.input_shape,
        hidden=128,
        layers=2,
        stacked=False,
        scheme=scheme,
        p=0.0 if scheme == "none" else p,
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.x_train.to(device), train.y_train.to(device)
    best, best_state, curve = -1.0, None, []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        acc = evaluate(model, val.x_test, val.y_test).accuracy
        curve.append(acc)
        print(
            f"{scheme} epoch {epoch + 1}: val {acc:.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test = evaluate(model, data.x_test, data.y_test)
    return {
        "scheme": scheme,
        "p": 0.0 if scheme == "none" else p,
        "best epoch": curve.index(best) + 1,
        "val acc": best,
        "test acc": test.accuracy,
        "test NLL": test.nll,
        "train s": time.perf_counter() - t0,
        "val curve": curve,
    }


def gated_summary(run_dir, data) -> dict:
    """Hidden units, accuracy and size of a finished ``lstm-lognormal`` run, from its files.

    Sizes are recounted from ``slim.pt`` and the dense architecture it records, so that they
    follow :func:`compressdrop.evaluation.count_flops` as it is now (it counts the fused LSTM
    kernel since 0.1.0; the run's own report.json may predate that).
    """
    r = json.loads((run_dir / "report.json").read_text())
    slim = load_model(run_dir / "slim.pt")
    dense = build_arch(slim.arch)
    x = data.x_test[:1]
    return {
        "recipe": r["recipe"],
        "beta": load_checkpoint(run_dir / "gated.pt")["recipe"]["kl"]["beta"],
        "epochs": r["epochs"],
        "hidden units before": r["architecture_before"],
        "hidden units after": r["architecture_after"],
        "dense test acc": r["dense"].get("test_accuracy"),
        "slim test acc": evaluate(slim, data.x_test, data.y_test).accuracy,
        "params before": count_params(dense),
        "params after": count_params(slim),
        "FLOPs before": count_flops(dense, x),
        "FLOPs after": count_flops(slim, x),
        "FLOPs ×": count_flops(dense, x) / count_flops(slim, x),
        "ONNX bytes": (run_dir / "slim.onnx").stat().st_size,
        "wall s": r["wall_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--gated", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--beta", type=float, default=None, help="KL weight (default: the recipe's)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="summarize the finished gated run under results/runs/lstm-lognormal, no training",
    )
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="recurrent_fashion_mnist", help="result file name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=0)
    t_start = time.perf_counter()
    rows = [
        train_scheme(s, args.p, data, train, val, args.epochs, args.device)
        for s in args.schemes.split(",")
        if s
    ]
    table = markdown_table(
        rows, ["scheme", "p", "best epoch", "val acc", "test acc", "test NLL", "train s"]
    )
    print(table, flush=True)
    gated = None
    if args.gated:
        run_dir = RESULTS / "runs" / "lstm-lognormal"
        recipe = load_recipe("lstm-lognormal")
        recipe = recipe.replace(data=type(recipe.data)(**{**vars(recipe.data), "name": args.data}))
        if args.beta is not None:
            recipe = recipe.replace(kl=type(recipe.kl)(**{**vars(recipe.kl), "beta": args.beta}))
        t0 = time.perf_counter()
        if not args.report_only:
            run_recipe(recipe, data, run_dir, device=args.device)
        gated = gated_summary(run_dir, data)
        if not args.report_only:
            gated["wall s"] = time.perf_counter() - t0
        print(gated)
    save(
        args.name,
        {
            "args": vars(args),
            "rows": rows,
            "table": table,
            "gated": gated,
            "seed": 0,
            "wall_seconds": time.perf_counter() - t_start,
        },
    )


if __name__ == "__main__":
    main()
