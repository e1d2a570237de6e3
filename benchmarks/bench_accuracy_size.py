"""Benchmark 1 (and 2): accuracy against size on Fashion-MNIST, each gate family against
Torch-Pruning's L1-magnitude structured pruning, same data and same total epochs.

Two phases, so that the training can run anywhere (a GPU box, several processes) and the
measurements that must be comparable (test accuracy once, CPU latency) run in one place:

    # 1. train: the shared dense net, then one job per (family, beta) and per L1 ratio
    python benchmarks/bench_accuracy_size.py train --net lenet5 --jobs all --device cpu
    # 2. report: pick beta per family on the validation split, then test + latency, table, plot
    python benchmarks/bench_accuracy_size.py report --net lenet5

Protocol. Every method starts from the same dense net pretrained for --pretrain epochs (seed 0).
A Bayesian family trains its gates for --sparsify epochs with the shipped recipe's settings and a
KL weight beta from --betas, is pruned at its default SNR threshold and fine-tuned for --finetune
epochs. The magnitude baseline prunes the same dense net with Torch-Pruning's MetaPruner and L1
importance, uniformly per layer, to dense_FLOPs / r for each r in --l1-ratios (binary search on the
pruning ratio), then fine-tunes for --sparsify + --finetune epochs: the same total.

Selection (report phase): for each family, among its betas whose slim model keeps validation
accuracy within 1 point of the dense net's, the one with the largest FLOP reduction; if none does,
the one with the best validation accuracy. Only the selected models (and the L1 curve and the dense
net) are given a test accuracy in the table; the validation numbers of every job are in the JSON.
The validation split is 10 % of the training set (seed 0). Latency: onnxruntime CPU provider,
2 threads, batch 1 and 256, median over repeats, on the machine that runs the report.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import build_arch, load_model, save_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, count_params, evaluate, ort_latency
from compressdrop.export import export_onnx
from compressdrop.pruning import PruneReport
from compressdrop.recipes import StageConfig, load_recipe
from compressdrop.training.runner import run_recipe, seed_everything

from common import RESULTS, markdown_table, save

FAMILIES = ("lognormal", "variational", "concrete", "hardconcrete")


def finetune(model, train, epochs, lr, batch=64, seed=0, device="cpu"):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train.x_train.to(device), train.y_train.to(device)
    n = len(x)
    for epoch in range(epochs):
        model.train()
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
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
        # the history lets save_model/load_model rebuild the structure without pickled code
        m.prune_report = PruneReport("l1-magnitude", None, [], pruner.DG.pruning_history(), 0.0)
        return m

    lo, hi = 0.0, 0.995
    for _ in range(14):
        mid = (lo + hi) / 2
        if count_flops(pruned(mid), example) > target_flops:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


def _dirs(net: str) -> tuple[Path, Path]:
    runs = RESULTS / "runs" / net
    jobs = RESULTS / "jobs" / net
    runs.mkdir(parents=True, exist_ok=True)
    jobs.mkdir(parents=True, exist_ok=True)
    return runs, jobs


def _job_names(args) -> list[str]:
    names = [f"{f}-b{b:g}" for f in args.families.split(",") for b in _floats(args.betas)]
    names += [f"l1-r{r:g}" for r in _floats(args.l1_ratios)]
    return names


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _dense(args, data, train, runs: Path, device: str):
    path = runs / f"dense-{args.pretrain}ep.pt"
    if path.exists():
        return load_model(path).to(device)
    seed_everything(0)
    dense = build_arch(
        {"name": args.net, "input_shape": list(data.input_shape), "num_classes": 10, "kwargs": {}}
    ).to(device)
    t0 = time.perf_counter()
    finetune(dense, train, args.pretrain, 1e-3, device=device)
    save_model(dense.cpu(), path)
    print(f"dense: {args.pretrain} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    return dense.to(device)


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    train, val = data.split_validation(0.1, seed=0)
    runs, jobs = _dirs(args.net)
    dense = _dense(args, data, train, runs, args.device)
    if args.jobs == "dense":
        return
    names = _job_names(args) if args.jobs == "all" else args.jobs.split(",")
    example = data.x_test[:2].to(args.device)
    d_flops = count_flops(dense, example)
    for name in names:
        t0 = time.perf_counter()
        record: dict = {"job": name, "device": args.device, "seed": 0}
        if name.startswith("l1-r"):
            ratio = float(name[4:])
            base, prune_ratio = l1_prune_to_flops(dense, example, d_flops / ratio)
            finetune(base, train, args.sparsify + args.finetune, 3e-4, device=args.device)
            path = runs / f"{name}.pt"
            save_model(base.cpu(), path)
            record |= {"method": "l1", "target_ratio": ratio, "pruning_ratio": prune_ratio}
            model = base
        else:
            family, beta = name.rsplit("-b", 1)
            recipe = load_recipe(f"{args.net}-{family}")
            stages = type(recipe.stages)(
                pretrain=StageConfig(epochs=0),
                sparsify=StageConfig(**{**vars(recipe.stages.sparsify), "epochs": args.sparsify}),
                finetune=StageConfig(**{**vars(recipe.stages.finetune), "epochs": args.finetune}),
            )
            kl = type(recipe.kl)(**{**vars(recipe.kl), "beta": float(beta)})
            recipe = recipe.replace(stages=stages, kl=kl, data=type(recipe.data)(name=args.data))
            result = run_recipe(
                recipe, data, runs / name, device=args.device, model=copy.deepcopy(dense)
            )
            path = Path(result.slim_path)
            model = load_model(path).to(args.device)
            record |= {
                "method": family,
                "beta": float(beta),
                "units": result.report["architecture_after"],
            }
        record |= {
            "path": str(path.relative_to(RESULTS)),
            "val_acc": evaluate(model, val.x_test, val.y_test).accuracy,
            "params": count_params(model),
            "flops": count_flops(model, example),
            "epochs": args.pretrain + args.sparsify + args.finetune,
            "train_seconds": time.perf_counter() - t0,
        }
        (jobs / f"{name}.json").write_text(json.dumps(record, indent=2))
        print(record, flush=True)


def _latency(model, example, path: Path) -> dict[int, float]:
    export_onnx(model, example, path, check_batch_sizes=(1, 7))
    return {
        b: ort_latency(path, b, threads=2, provider="cpu", repeats=50 if b == 1 else 20).median_ms
        for b in (1, 256)
    }


def cmd_report(args) -> None:
    torch.set_num_threads(2)
    data = load_dataset(args.data)
    _, val = data.split_validation(0.1, seed=0)
    runs, jobs = _dirs(args.net)
    records = [json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))]
    if not records:
        raise SystemExit(f"no job results under {jobs}; run the train phase first")
    example = data.x_test[:2]
    dense = load_model(runs / f"dense-{args.pretrain}ep.pt").eval()
    d_flops, d_val = count_flops(dense, example), evaluate(dense, val.x_test, val.y_test).accuracy
    lat = _latency(dense, example, runs / "dense.onnx")
    dense_row = {
        "method": "dense",
        "epochs": args.pretrain,
        "val acc": d_val,
        "test acc": evaluate(dense, data.x_test, data.y_test).accuracy,
        "params": count_params(dense),
        "FLOPs": d_flops,
        "FLOPs ×": 1.0,
        "ms@1": lat[1],
        "ms@256": lat[256],
        "speed-up@256": 1.0,
    }
    rows = [dense_row]
    chosen = []
    for family in FAMILIES:
        cands = [r for r in records if r["method"] == family]
        if not cands:
            continue
        ok = [r for r in cands if r["val_acc"] >= d_val - 0.01]
        pick = (
            max(ok, key=lambda r: d_flops / r["flops"])
            if ok
            else max(cands, key=lambda r: r["val_acc"])
        )
        chosen.append(pick)
    l1 = sorted((r for r in records if r["method"] == "l1"), key=lambda r: r["target_ratio"])
    for r in chosen + l1:
        model = load_model(RESULTS / r["path"]).eval()
        lat = _latency(model, example, runs / f"{r['job']}.onnx")
        label = (
            f"{r['method']} (Bayesian, β={r['beta']:g})"
            if r["method"] != "l1"
            else f"L1 magnitude (Torch-Pruning), target {r['target_ratio']:g}× FLOPs"
        )
        rows.append(
            {
                "method": label,
                "epochs": r["epochs"],
                "units": r.get("units", f"ratio {r.get('pruning_ratio', 0):.3f}"),
                "val acc": r["val_acc"],
                "test acc": evaluate(model, data.x_test, data.y_test).accuracy,
                "params": r["params"],
                "FLOPs": r["flops"],
                "FLOPs ×": d_flops / r["flops"],
                "ms@1": lat[1],
                "ms@256": lat[256],
                "speed-up@256": dense_row["ms@256"] / lat[256],
                "train s": r["train_seconds"],
                "trained on": r["device"],
            }
        )
        print(rows[-1], flush=True)
    cols = ["method", "epochs", "units", "val acc", "test acc", "params", "FLOPs", "FLOPs ×"]
    cols += ["ms@1", "ms@256", "speed-up@256", "train s", "trained on"]
    table = markdown_table(rows, cols)
    search = markdown_table(
        sorted(
            ({**r, "FLOPs ×": d_flops / r["flops"]} for r in records if r["method"] != "l1"),
            key=lambda r: (r["method"], r["beta"]),
        ),
        ["method", "beta", "units", "val_acc", "params", "FLOPs ×", "train_seconds", "device"],
    )
    print(table)
    print("\nvalidation search:\n" + search)
    save(
        f"accuracy_size_{args.net}",
        {"args": vars(args), "rows": rows, "jobs": records, "table": table, "search": search},
    )
    _plot(rows, RESULTS / f"accuracy_size_{args.net}.png", args.net)


def _plot(rows, path: Path, net: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key in ((axes[0], "params"), (axes[1], "FLOPs")):
        l1 = [r for r in rows if r["method"].startswith("L1")]
        ax.plot([r[key] for r in l1], [100 * r["test acc"] for r in l1], "s-", c="tab:red")
        for r in rows:
            if r["method"] == "dense":
                ax.scatter(r[key], 100 * r["test acc"], marker="*", c="black", s=200)
            elif "Bayesian" in r["method"]:
                ax.scatter(r[key], 100 * r["test acc"], marker="o", c="tab:blue", s=50)
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
    axes[0].scatter([], [], marker="o", c="tab:blue", label="Bayesian gates (β chosen on val)")
    axes[0].plot([], [], "s-", c="tab:red", label="L1 magnitude (Torch-Pruning) + fine-tune")
    axes[0].scatter([], [], marker="*", c="black", label="dense")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{net} on Fashion-MNIST: test accuracy against size")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("phase", choices=("train", "report"))
    ap.add_argument("--net", default="lenet5")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--betas", default="1,4,16")
    ap.add_argument("--l1-ratios", default="1.5,2.5,4,7,12,20")
    ap.add_argument("--jobs", default="all", help="'all', 'dense', or comma-separated job names")
    ap.add_argument("--pretrain", type=int, default=10)
    ap.add_argument("--sparsify", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cmd_train(args) if args.phase == "train" else cmd_report(args)


if __name__ == "__main__":
    main()
