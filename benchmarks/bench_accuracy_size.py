"""Benchmark 1 (and 2): accuracy against size on Fashion-MNIST, each gate family against
Torch-Pruning's L1-magnitude structured pruning at matched FLOPs, same data and epochs.

Run (about 10 min per LeNet-5 family on two CPU cores):
    .venv/bin/python benchmarks/bench_accuracy_size.py --net lenet5 --pretrain 10 --sparsify 20 --finetune 5

Protocol: every method starts from the same dense net pretrained for --pretrain epochs (seed 0).
A Bayesian family then trains its gates for --sparsify epochs (the shipped recipe's settings), is
pruned at its default threshold and fine-tuned for --finetune epochs. The magnitude baseline is
pruned from the same dense net with Torch-Pruning's MetaPruner and L1 importance, uniformly per
layer, to the FLOPs of each Bayesian model (binary search on the ratio), then fine-tuned for
--sparsify + --finetune epochs: the same total. Hyper-parameters come from the recipes, chosen
before this benchmark; the validation split (10 % of the training set) is reported beside the test
accuracy, which is measured once per model. Latency (benchmark 2): onnxruntime CPU, batch 1 and 256.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import load_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, count_params, evaluate, ort_latency
from compressdrop.export import export_onnx
from compressdrop.recipes import StageConfig, load_recipe
from compressdrop.training.runner import run_recipe, seed_everything

from common import RESULTS, markdown_table, save


def finetune(model, train, epochs, lr, batch=64, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(train.x_train)
    for epoch in range(epochs):
        model.train()
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(train.x_train[idx]), train.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def l1_prune_to_flops(dense, example, target_flops):
    """Uniform L1-magnitude pruning (Torch-Pruning) whose FLOPs are closest to ``target_flops``."""
    import torch_pruning as tp

    def pruned(ratio):
        m = copy.deepcopy(dense)
        last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[last],
        )
        pruner.step()
        return m

    lo, hi = 0.0, 0.995
    for _ in range(14):
        mid = (lo + hi) / 2
        if count_flops(pruned(mid), example) > target_flops:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


def onnx_latency(model, example, path):
    export_onnx(model, example, path, check_batch_sizes=(1, 7))
    return {
        b: ort_latency(path, b, threads=2, provider="cpu", repeats=50 if b == 1 else 20).median_ms
        for b in (1, 256)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="lenet5")
    ap.add_argument("--families", default="lognormal,variational,concrete,hardconcrete")
    ap.add_argument("--pretrain", type=int, default=10)
    ap.add_argument("--sparsify", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--data", default="fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=0)
    runs = RESULTS / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    example = data.x_test[:2]
    rows, t_start = [], time.perf_counter()

    dense_path = runs / f"{args.net}-dense-{args.pretrain}ep.pt"
    seed_everything(0)
    from compressdrop.checkpoint import build_arch, save_model

    if dense_path.exists():
        dense = load_model(dense_path)
    else:
        dense = build_arch(
            {
                "name": args.net,
                "input_shape": list(data.input_shape),
                "num_classes": 10,
                "kwargs": {},
            }
        )
        finetune(dense, train, args.pretrain, 1e-3)
        save_model(dense, dense_path)
    d_flops, d_params = count_flops(dense, example), count_params(dense)
    lat = onnx_latency(dense, example, runs / "dense.onnx")
    rows.append(
        {
            "method": "dense",
            "epochs": args.pretrain,
            "val acc": evaluate(dense, val.x_test, val.y_test).accuracy,
            "test acc": evaluate(dense, data.x_test, data.y_test).accuracy,
            "params": d_params,
            "FLOPs": d_flops,
            "FLOPs ×": 1.0,
            "ms@1": lat[1],
            "ms@256": lat[256],
            "speed-up@256": 1.0,
        }
    )
    print(rows[-1], flush=True)

    for family in args.families.split(","):
        recipe = load_recipe(f"{args.net}-{family}")
        stages = type(recipe.stages)(
            pretrain=StageConfig(epochs=0),
            sparsify=StageConfig(**{**vars(recipe.stages.sparsify), "epochs": args.sparsify}),
            finetune=StageConfig(**{**vars(recipe.stages.finetune), "epochs": args.finetune}),
        )
        recipe = recipe.replace(stages=stages, data=type(recipe.data)(name=args.data))
        out = runs / f"{args.net}-{family}"
        t0 = time.perf_counter()
        result = run_recipe(recipe, data, out, device="cpu", model=copy.deepcopy(dense))
        t_run = time.perf_counter() - t0
        slim = load_model(result.slim_path)
        s_flops = count_flops(slim, example)
        lat = onnx_latency(slim, example, out / "bench.onnx")
        rows.append(
            {
                "method": f"{family} (Bayesian)",
                "epochs": args.pretrain + args.sparsify + args.finetune,
                "val acc": evaluate(slim, val.x_test, val.y_test).accuracy,
                "test acc": result.report["slim"]["test_accuracy"],
                "params": count_params(slim),
                "FLOPs": s_flops,
                "FLOPs ×": d_flops / s_flops,
                "ms@1": lat[1],
                "ms@256": lat[256],
                "speed-up@256": rows[0]["ms@256"] / lat[256],
                "units": result.report["architecture_after"],
                "wall s": t_run,
            }
        )
        print(rows[-1], flush=True)

        t0 = time.perf_counter()
        base, ratio = l1_prune_to_flops(dense, example, s_flops)
        finetune(base, train, args.sparsify + args.finetune, 3e-4)
        b_flops = count_flops(base, example)
        lat = onnx_latency(base, example, out / "l1.onnx")
        rows.append(
            {
                "method": f"L1 magnitude (Torch-Pruning), matched to {family}",
                "epochs": args.pretrain + args.sparsify + args.finetune,
                "val acc": evaluate(base, val.x_test, val.y_test).accuracy,
                "test acc": evaluate(base, data.x_test, data.y_test).accuracy,
                "params": count_params(base),
                "FLOPs": b_flops,
                "FLOPs ×": d_flops / b_flops,
                "ms@1": lat[1],
                "ms@256": lat[256],
                "speed-up@256": rows[0]["ms@256"] / lat[256],
                "units": f"ratio {ratio:.3f}",
                "wall s": time.perf_counter() - t0,
            }
        )
        print(rows[-1], flush=True)

    cols = [
        "method",
        "epochs",
        "units",
        "val acc",
        "test acc",
        "params",
        "FLOPs",
        "FLOPs ×",
        "ms@1",
        "ms@256",
        "speed-up@256",
        "wall s",
    ]
    table = markdown_table(rows, cols)
    print(table)
    save(
        f"accuracy_size_{args.net}",
        {
            "args": vars(args),
            "rows": rows,
            "table": table,
            "seed": 0,
            "wall_seconds": time.perf_counter() - t_start,
        },
    )
    _plot(rows, RESULTS / f"accuracy_size_{args.net}.png", args.net)


def _plot(rows, path: Path, net: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key in ((axes[0], "params"), (axes[1], "FLOPs")):
        for r in rows:
            style = (
                ("*", "black", 200)
                if r["method"] == "dense"
                else ("o", "tab:blue", 50)
                if "Bayesian" in r["method"]
                else ("s", "tab:red", 50)
            )
            ax.scatter(r[key], 100 * r["test acc"], marker=style[0], c=style[1], s=style[2])
            ax.annotate(
                r["method"].split(" ")[0],
                (r[key], 100 * r["test acc"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{key} (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].scatter([], [], marker="o", c="tab:blue", label="Bayesian gates")
    axes[0].scatter([], [], marker="s", c="tab:red", label="L1 magnitude (Torch-Pruning)")
    axes[0].scatter([], [], marker="*", c="black", label="dense")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{net} on Fashion-MNIST: accuracy against size")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
