"""Benchmark 1 (and 2): accuracy against size on Fashion-MNIST, each gate family against
Torch-Pruning (L1 magnitude, Taylor, group-norm; uniform or global), same data and same total
epochs, over several seeds.

Two phases, so that the training can run anywhere (a GPU box, several processes) and the
measurements that must be comparable (test accuracy once, CPU latency) run in one place:

    # 1. train, per seed: the dense net, then one job per (family, beta) and per peer setting
    python benchmarks/bench_accuracy_size.py train --net lenet5 --seed 1 \
        --jobs lognormal-b32,lognormal-b64,l1-r10,taylor-r10,groupnorm-r10,taylor-global-r25
    # 2. report: per seed, beta per family chosen on the validation split, test accuracy once,
    #    latency; then mean ± std over the seeds, tables and a plot with error bars
    python benchmarks/bench_accuracy_size.py report --net lenet5 --seeds 0,1,2

Protocol. For each seed, every method starts from the same dense net pretrained for --pretrain
epochs with that seed. A Bayesian family trains its gates for --sparsify epochs with the shipped
recipe's settings and a KL weight beta, is pruned at its default SNR threshold and fine-tuned for
--finetune epochs. The Torch-Pruning jobs (``tp_baselines.py`` says how each is pruned and
trained) reach dense_FLOPs / r by binary search on the pruning ratio, in the same total epochs.
Results go to results/jobs/<net>/seed<S>/ (one JSON per job) and results/runs/ (models). The
job ``dense-full`` is the control: the same dense net trained on, without gates or pruning, for the
gated runs' remaining epochs and learning rates, so that every net in the table has had the same
total epochs (the dense row itself has only --pretrain).

Selection (report phase): for each seed and family, among its betas whose slim model keeps
validation accuracy within 1 point of that seed's dense net (``--select-against dense-full``: of
the control), the one with the largest FLOP reduction; if none does, the one with the best
validation accuracy. Only the selected models (and the Torch-Pruning curves and the dense nets)
are given a test accuracy; the validation numbers of every job are in the JSON. The validation split is 10 % of the training set, drawn with the run's
seed (the recipe runner splits with the recipe's seed, so the dense net, the gated jobs, the
Torch-Pruning jobs and the selection all see the same split). Latency: onnxruntime CPU
provider, 2 threads, at the --latency-batches (1 and 256 by default; the speed-up column is at
the last), on the machine that runs the report: a seed's models take turns over five rounds, one
session each a round, and a model's time is the median over the rounds of its sessions' medians.

Nets: lenet5 and lenet300 (their shipped recipe per family), vit (``build_model("vit")``; the
``vit-lognormal`` recipe with each family swapped in). On the ViT, Torch-Pruning 1.6.1 prunes
the MLP neurons only: it has no head pruning for ``nn.MultiheadAttention`` (``num_heads`` with
``prune_num_heads`` leaves it whole), and with the class token and positions declared
(``unwrapped_parameters``) it leaves the residual stream whole too (undeclared, it cuts the
stream to widths the heads do not divide, and the model fails). Its FLOPs reduction stops near
1.85×; a job whose target lies beyond records ``target_reached: false``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compressdrop.checkpoint import build_arch, load_model, save_model
from compressdrop.data import load_dataset
from compressdrop.evaluation import count_flops, count_params, evaluate
from compressdrop.export import export_onnx
from compressdrop.recipes import StageConfig, list_recipes, load_recipe
from compressdrop.training.runner import run_recipe, seed_everything

import tp_baselines
from common import RESULTS, markdown_table, ort_in_turns, save

FAMILIES = ("lognormal", "variational", "concrete", "hardconcrete")
# job: the dense net trained on for --sparsify epochs at 1e-3 and --finetune at 3e-4 (the gated
# runs' schedule) without gates: the reference at the same total epochs as every pruned net
DENSE_FULL = "dense-full"


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


def _dirs(net: str, seed: int) -> tuple[Path, Path]:
    runs = RESULTS / "runs" / net / f"seed{seed}"
    jobs = RESULTS / "jobs" / net / f"seed{seed}"
    runs.mkdir(parents=True, exist_ok=True)
    jobs.mkdir(parents=True, exist_ok=True)
    return runs, jobs


def _job_names(args) -> list[str]:
    names = [f"{f}-b{b:g}" for f in args.families.split(",") for b in _floats(args.betas)]
    names += [f"{m}-r{r:g}" for m in args.tp_methods.split(",") for r in _floats(args.tp_ratios)]
    return names


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def gated_job(name: str) -> tuple[str, float, dict[str, float]]:
    """A gated job's family, beta and extra ``gates.kl_scale`` from its name:
    ``<family>-b<beta>``, then ``@<key>=<factor>`` for each factor on a unit kind or layer-name
    glob, e.g. ``lognormal-b64@features.0=0.5`` (the first convolution's KL at half weight)."""
    base, *extra = name.split("@")
    family, beta = base.rsplit("-b", 1)
    kl_scale = {}
    for item in extra:
        key, _, factor = item.partition("=")
        if not key or not factor:
            raise SystemExit(f"job {name!r}: expected @<kind or glob>=<factor>, got @{item}")
        kl_scale[key] = float(factor)
    return family, float(beta), kl_scale


def _dense(args, data, train, runs: Path, device: str):
    path = runs / f"dense-{args.pretrain}ep.pt"
    if path.exists():
        return load_model(path).to(device)
    seed_everything(args.seed)
    dense = build_arch(
        {"name": args.net, "input_shape": list(data.input_shape), "num_classes": 10, "kwargs": {}}
    ).to(device)
    t0 = time.perf_counter()
    finetune(dense, train, args.pretrain, 1e-3, seed=args.seed, device=device)
    save_model(dense.cpu(), path)
    print(f"dense: {args.pretrain} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    return dense.to(device)


def _torch_pruning_job(args, name, dense, train, example, runs: Path) -> tuple[Path, dict]:
    method, global_, ratio = tp_baselines.parse(name)
    start, epochs = copy.deepcopy(dense).cpu(), args.sparsify + args.finetune
    if method == "groupnorm":  # DepGraph: sparse training first, then prune, then fine-tune
        tp_baselines.sparse_train_(
            start, train, example.cpu(), args.sparsify, 1e-3, args.seed, global_
        )
        epochs = args.finetune
    base, prune_ratio = tp_baselines.prune_to_flops(
        start, train, example.cpu(), name, count_flops, seed=args.seed
    )
    # a global ranking can stop short of the target (no layer emptied past 95 %): say so
    reached = count_flops(base, example.cpu()) <= 1.01 * count_flops(start, example.cpu()) / ratio
    finetune(base.to(args.device), train, epochs, 3e-4, seed=args.seed, device=args.device)
    path = runs / f"{name}.pt"
    save_model(base.cpu(), path)
    return path, {"method": method, "global": global_, "target_ratio": ratio,
                  "pruning_ratio": prune_ratio, "target_reached": reached}  # fmt: skip


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    # the recipe runner splits with the recipe's seed: the same split here, or the gated jobs
    # would train on part of the validation set that selects their beta
    train, val = data.split_validation(0.1, seed=args.seed)
    runs, jobs = _dirs(args.net, args.seed)
    dense = _dense(args, data, train, runs, args.device)
    if args.jobs == "dense":
        return
    names = _job_names(args) if args.jobs == "all" else args.jobs.split(",")
    example = data.x_test[:2].to(args.device)
    for name in names:
        t0 = time.perf_counter()
        record: dict = {"job": name, "device": args.device, "seed": args.seed}
        if name == DENSE_FULL:  # the control: no gates, no pruning, the same total epochs
            path = runs / f"{name}.pt"
            model = finetune(copy.deepcopy(dense), train, args.sparsify, 1e-3, seed=args.seed,
                             device=args.device)  # fmt: skip
            finetune(model, train, args.finetune, 3e-4, seed=args.seed + 1, device=args.device)
            save_model(model.cpu(), path)
            record |= {"method": DENSE_FULL, "units": "unpruned"}
        elif tp_baselines.is_job(name):
            path, info = _torch_pruning_job(args, name, dense, train, example, runs)
            record |= info
        else:
            family, beta, kl_scale = gated_job(name)
            recipe = _recipe(args.net, family)
            if kl_scale:
                gates = recipe.gates
                recipe = recipe.replace(
                    gates=type(gates)(**{**vars(gates), "kl_scale": gates.kl_scale | kl_scale})
                )
            # the recipe's own fine-tuning unless --finetune-lr / --finetune-schedule say otherwise
            finetune_stage = {
                k: v
                for k, v in (("lr", args.finetune_lr), ("lr_schedule", args.finetune_schedule))
                if v is not None
            }
            stages = type(recipe.stages)(
                pretrain=StageConfig(epochs=0),
                sparsify=StageConfig(**{**vars(recipe.stages.sparsify), "epochs": args.sparsify}),
                finetune=StageConfig(
                    **{**vars(recipe.stages.finetune), "epochs": args.finetune, **finetune_stage}
                ),
            )
            kl = type(recipe.kl)(**{**vars(recipe.kl), "beta": beta})
            recipe = recipe.replace(
                stages=stages, kl=kl, data=type(recipe.data)(name=args.data), seed=args.seed
            )
            # a job killed mid-run (its session ended) continues from its last epoch
            resume = (runs / name / "checkpoint.pt").exists()
            result = run_recipe(
                recipe, data, runs / name, device=args.device, model=copy.deepcopy(dense),
                resume=resume,
            )  # fmt: skip
            path = Path(result.slim_path)
            record |= {
                "resumed": resume,  # then train_seconds counts only the resumed part
                "method": family,
                "beta": beta,
                "kl_scale": dict(recipe.gates.kl_scale),
                "finetune": {k: getattr(recipe.stages.finetune, k) for k in ("lr", "lr_schedule")},
                "units": result.report["architecture_after"],
            }
        model = load_model(path).to(args.device)
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


def _recipe(net: str, family: str):
    """The shipped ``<net>-<family>`` recipe; for a net that ships only ``<net>-lognormal`` (the
    ViT), that recipe with the family swapped in (same epochs, learning rates, KL cost)."""
    if f"{net}-{family}" in list_recipes():
        return load_recipe(f"{net}-{family}")
    return load_recipe(f"{net}-lognormal").override({"gates.family": family})


def _train_seconds(record: dict) -> float:
    """A job's training wall time; for a job resumed after a kill (whose ``train_seconds`` counts
    only the resumed part) the sum of its run's epoch times (``report.json``'s history)."""
    if not record.get("resumed"):
        return record["train_seconds"]
    report = json.loads((RESULTS / record["path"]).with_name("report.json").read_text())
    return sum(h["seconds"] for h in report["history"])


def pick_beta(cands: list[dict], ref_val: float) -> dict:
    """The selection rule: among a family's jobs (one per β) whose validation accuracy lies within
    1 point of ``ref_val``, the one with the fewest FLOPs; if none does, the best on validation."""
    ok = [r for r in cands if r["val_acc"] >= ref_val - 0.01]
    return min(ok, key=lambda r: r["flops"]) if ok else max(cands, key=lambda r: r["val_acc"])


def _latencies(paths: dict[str, Path], batches: list[int], rounds: int = 5) -> dict[str, dict]:
    """Per model and batch size, milliseconds a batch: the median over ``rounds`` rounds in which
    the models take turns (``common.ort_in_turns``)."""
    lat: dict[str, dict[int, float]] = {k: {} for k in paths}
    for b in batches:
        for k, t in ort_in_turns(paths, b, rounds, repeats=50 if b == 1 else 20).items():
            lat[k][b] = statistics.median(t)
    return lat


def _seed_rows(args, seed: int, data, val, example) -> tuple[list[dict], list[dict]]:
    """One seed's rows: the dense net, each family's β chosen on validation, every Torch-Pruning
    job; test accuracy read once per model. Also every job's record (the validation search)."""
    runs, jobs = _dirs(args.net, seed)
    records = [json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))]
    if not records:
        raise SystemExit(f"no job results under {jobs}; run the train phase with --seed {seed}")
    dense = load_model(runs / f"dense-{args.pretrain}ep.pt").eval()
    d_flops, d_val = count_flops(dense, example), evaluate(dense, val.x_test, val.y_test).accuracy
    batches = args.latency_batches
    big = batches[-1]
    dense_row = {
        "key": "dense",
        "method": "dense",
        "seed": seed,
        "epochs": args.pretrain,
        "val acc": d_val,
        "test acc": evaluate(dense, data.x_test, data.y_test).accuracy,
        "params": count_params(dense),
        "FLOPs": d_flops,
        "FLOPs ×": 1.0,
    }
    rows, chosen = [dense_row], []
    ref_val = d_val  # the validation accuracy a chosen β must keep within 1 point of
    if args.select_against == DENSE_FULL:
        full = [r for r in records if r["method"] == DENSE_FULL]
        if not full:
            raise SystemExit(f"--select-against {DENSE_FULL}: no such job for seed {seed}")
        ref_val = full[0]["val_acc"]
    for family in FAMILIES:
        cands = [r for r in records if r["method"] == family]
        if cands:
            chosen.append({**pick_beta(cands, ref_val), "key": family})
    peers = sorted(
        ({**r, "key": r["job"]} for r in records if r["method"] in tp_baselines.METHODS),
        key=lambda r: (r["job"].rsplit("-r", 1)[0], r["target_ratio"]),
    )
    controls = [{**r, "key": DENSE_FULL} for r in records if r["method"] == DENSE_FULL]
    picked = controls + chosen + peers
    models = {"dense": dense} | {r["job"]: load_model(RESULTS / r["path"]).eval() for r in picked}
    onnx = {k: runs / f"{k}.onnx" for k in models}
    for k, m in models.items():
        export_onnx(m, example, onnx[k], check_batch_sizes=(1, 7))
    lat = _latencies(onnx, batches)
    dense_row |= {**{f"ms@{b}": lat["dense"][b] for b in batches}, "speed-up": 1.0}
    for r in picked:
        model = models[r["job"]]
        if r["method"] == DENSE_FULL:
            label = f"dense, {r['epochs']} epochs (no pruning)"
        elif "beta" in r:
            label = f"{r['method']} (Bayesian, β={r['beta']:g})"
        else:
            label = f"Torch-Pruning {r['job'].rsplit('-r', 1)[0]}, target {r['target_ratio']:g}×"
        rows.append(
            {
                "key": r["key"],
                "method": label,
                "seed": seed,
                "beta": r.get("beta"),
                "epochs": r["epochs"],
                "units": r.get("units", f"ratio {r.get('pruning_ratio', 0):.3f}"),
                "val acc": r["val_acc"],
                "test acc": evaluate(model, data.x_test, data.y_test).accuracy,
                "params": r["params"],
                "FLOPs": r["flops"],
                "FLOPs ×": d_flops / r["flops"],
                **{f"ms@{b}": lat[r["job"]][b] for b in batches},
                "speed-up": dense_row[f"ms@{big}"] / lat[r["job"]][big],
                "train s": _train_seconds(r),
                "trained on": r["device"],
                "reached": r.get("target_reached", True),
            }
        )
        print(rows[-1], flush=True)
    search = [{**r, "seed": seed, "FLOPs ×": d_flops / r["flops"]} for r in records]
    return rows, search


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _aggregate(rows: list[dict]) -> list[dict]:
    """Per method (dense, a family at its per-seed β, a Torch-Pruning job): mean ± std over seeds."""
    out = []
    for key in dict.fromkeys(r["key"] for r in rows):
        rs = [r for r in rows if r["key"] == key]
        acc, flops = [r["test acc"] for r in rs], [r["FLOPs ×"] for r in rs]
        out.append(
            {
                "method": key,
                "seeds": len(rs),
                "β per seed": ", ".join(f"{r['beta']:g}" for r in rs if r.get("beta")),
                "units per seed": "; ".join(str(r["units"]) for r in rs if r.get("units")),
                "test acc %": _mean_std(acc, 100),
                "FLOPs ×": _mean_std(flops, 1, 1),
                "params": round(statistics.mean(r["params"] for r in rs)),
                "speed-up": _mean_std([r["speed-up"] for r in rs], 1, 2),
                "train s": round(statistics.mean(r.get("train s", 0.0) for r in rs)),
                "acc": acc,
                "flops_x": flops,
                "reached": all(r.get("reached", True) for r in rs),
            }
        )
    return out


def cmd_report(args) -> None:
    torch.set_num_threads(2)
    data = load_dataset(args.data)
    example = data.x_test[:2]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, search = [], []
    for seed in seeds:
        _, val = data.split_validation(0.1, seed=seed)  # the split the seed trained with
        r, s = _seed_rows(args, seed, data, val, example)
        rows += r
        search += s
    batches = args.latency_batches
    cols = ["seed", "method", "epochs", "units", "val acc", "test acc", "params", "FLOPs"]
    cols += ["FLOPs ×", *(f"ms@{b}" for b in batches), "speed-up", "train s", "trained on"]
    table = markdown_table(rows, cols)
    agg = _aggregate(rows)
    summary = markdown_table(
        agg, ["method", "seeds", "β per seed", "units per seed", "test acc %", "FLOPs ×", "params",
              "speed-up", "train s"]
    )  # fmt: skip
    search_table = markdown_table(
        sorted(search, key=lambda r: (r["seed"], r["method"], r.get("beta", 0), r["job"])),
        ["seed", "job", "units", "val_acc", "params", "FLOPs ×", "train_seconds", "device"],
    )
    print(table + "\n\nmean ± std over seeds " + str(seeds) + ":\n" + summary)
    print("\nvalidation search:\n" + search_table)
    name = f"accuracy_size_{args.net}" + (
        "" if seeds == [0] else "_seeds" + "".join(map(str, seeds))
    )
    if args.select_against == DENSE_FULL:
        name += "_vs_dense_full"
    save(
        name,
        {"args": vars(args), "seeds": seeds, "rows": rows, "aggregate": agg, "jobs": search,
         "table": table, "summary": summary, "search": search_table},
    )  # fmt: skip
    _plot(agg, RESULTS / f"{name}.png", f"{args.net} on {args.data}", len(seeds))


def _plot(agg: list[dict], path: Path, title: str, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)

    def point(a: dict) -> tuple[float, float, float, float]:
        f, acc = a["flops_x"], [100 * v for v in a["acc"]]

        def sd(v: list[float]) -> float:  # a method run on fewer seeds than the report's
            return statistics.stdev(v) if len(v) > 1 else 0.0

        return statistics.mean(f), statistics.mean(acc), sd(f), sd(acc)

    peers: dict[str, list] = {}
    missed = [a["method"] for a in agg if not a.get("reached", True)]
    for a in agg:
        if not a.get("reached", True):
            continue  # a peer that stopped short of its FLOPs target: in the tables, not here
        x, y, xe, ye = point(a)
        if a["method"] == "dense":
            ax.errorbar(x, y, yerr=ye, fmt="*", c="black", ms=12, label="dense")
        elif a["method"] == DENSE_FULL:
            ax.errorbar(x, y, yerr=ye, fmt="P", c="gray", ms=10, label="dense, same total epochs")
        elif a["method"] in FAMILIES:
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=f"{a['method']} (gates)")
        else:
            peers.setdefault(a["method"].rsplit("-r", 1)[0], []).append((x, y, xe, ye))
    for method, pts in peers.items():
        pts.sort()
        ax.errorbar(*zip(*[(p[0], p[1]) for p in pts]), xerr=[p[2] for p in pts],
                    yerr=[p[3] for p in pts], fmt="s--", capsize=3, alpha=0.8,
                    label=f"Torch-Pruning {method} + fine-tune")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs reduction (×, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title=f"not plotted (target not reached): {', '.join(missed)}"
              if missed else None, title_fontsize=7)  # fmt: skip
    ax.set_title(f"{title}: mean ± std over {seeds} seed(s)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("phase", choices=("train", "report"))
    ap.add_argument("--net", default="lenet5")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--betas", default="1,4,16")
    ap.add_argument("--tp-methods", default="l1", help="of " + ",".join(tp_baselines.METHODS))
    ap.add_argument("--tp-ratios", default="1.5,2.5,4,7,12,20")
    ap.add_argument("--seed", type=int, default=0, help="train: the seed of the dense net and jobs")
    ap.add_argument("--seeds", default="0", help="report: the seeds to read and average")
    ap.add_argument("--jobs", default="all", help="'all', 'dense', or comma-separated job names")
    ap.add_argument("--pretrain", type=int, default=10)
    ap.add_argument("--sparsify", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--finetune-lr", type=float, help="train: a gated job's fine-tuning rate")
    ap.add_argument(
        "--finetune-schedule", choices=("constant", "cosine"), help="train: its lr_schedule"
    )
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument(
        "--select-against",
        choices=("dense", DENSE_FULL),
        default="dense",
        help="report: whose validation accuracy a chosen β keeps within 1 point of",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--latency-batches",
        default=[1, 256],
        type=lambda text: [int(b) for b in text.split(",")],
        help="report: onnxruntime batch sizes (1,256); the speed-up column is at the last",
    )
    args = ap.parse_args()
    cmd_train(args) if args.phase == "train" else cmd_report(args)


if __name__ == "__main__":
    main()
