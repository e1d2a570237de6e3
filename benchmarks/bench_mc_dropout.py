"""Issue 6 benchmark: Monte-Carlo dropout on LeNet-5-Caffe trained on Fashion-MNIST, against the
same net used deterministically; out-of-distribution detection with scikit-learn's digits
(all 1,797 images, upscaled from 8×8 to 28×28).

    python benchmarks/bench_mc_dropout.py --epochs 10 --samples 30

Protocol: LeNet-5-Caffe with dropout p=0.5 before each fully connected layer, Adam (lr 1e-3), batch
64, seed 0; the epoch with the best validation accuracy (10 % of the training set) is kept, and the
test split is evaluated once with it. ``--gated PATH`` adds a gated checkpoint (e.g. a
``gated.pt`` of the lenet5-lognormal recipe), whose gate noise is the Monte-Carlo noise.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset, load_digits
from compressdrop.evaluation import evaluate
from compressdrop.models import build_model
from compressdrop.training.runner import seed_everything
from compressdrop.uncertainty import mc_evaluate, resize_images

from common import markdown_table, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--gated", default=None)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=0)
    digits = load_digits()
    x_ood = resize_images(torch.cat([digits.x_train, digits.x_test]), tuple(data.input_shape))

    seed_everything(0)
    net = build_model("lenet5", input_shape=data.input_shape, dropout=args.p).to(args.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = train.x_train.to(args.device), train.y_train.to(args.device)
    best, best_state, curve = -1.0, None, []
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).to(
            args.device
        )
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = evaluate(net, val.x_test, val.y_test).accuracy
        curve.append(acc)
        print(f"epoch {epoch + 1}: val {acc:.4f}", flush=True)
        if acc > best:
            best, best_state = acc, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    t_train = time.perf_counter() - t_start

    results = {"dropout": mc_evaluate(net, data.x_test, data.y_test, args.samples, x_ood)}
    if args.gated:
        gated = load_model(args.gated).to(args.device)
        results["gated"] = mc_evaluate(gated, data.x_test, data.y_test, args.samples, x_ood)
    rows = []
    for name, r in results.items():
        label = f"LeNet-5 + dropout {args.p}" if name == "dropout" else f"gated ({args.gated})"
        rows.append(
            {
                "model": label,
                "mode": "deterministic",
                "accuracy": r["deterministic_accuracy"],
                "NLL": r["deterministic_nll"],
                "ECE": r["deterministic_ece"],
                "OOD AUROC (entropy)": r["deterministic_ood_auroc_entropy"],
                "OOD AUROC (MI)": "",
            }
        )
        rows.append(
            {
                "model": label,
                "mode": f"MC, {args.samples} samples",
                "accuracy": r["accuracy"],
                "NLL": r["nll"],
                "ECE": r["ece"],
                "OOD AUROC (entropy)": r["ood_auroc_entropy"],
                "OOD AUROC (MI)": r["ood_auroc_mutual_information"],
            }
        )
    cols = ["model", "mode", "accuracy", "NLL", "ECE", "OOD AUROC (entropy)", "OOD AUROC (MI)"]
    table = markdown_table(rows, cols)
    print(table)
    save(
        "mc_dropout_lenet5",
        {
            "args": vars(args),
            "best_epoch": curve.index(best) + 1,
            "val_curve": curve,
            "results": results,
            "table": table,
            "seed": 0,
            "train_seconds": t_train,
            "wall_seconds": time.perf_counter() - t_start,
        },
    )


if __name__ == "__main__":
    main()
