"""Table and plot of ``bench_uncertainty_shift.py``'s seeds (mean ± std over seeds).

    python benchmarks/bench_uncertainty_shift.py --summarize 0 1 2

Writes ``results/uncertainty_shift.json`` (the summary), ``results/uncertainty_shift.png`` (ECE
and NLL against shift intensity) and prints the markdown tables BENCHMARKS.md quotes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, save

METRICS = ("nll", "ece", "brier", "accuracy")
FAMILIES = ("lognormal", "variational", "concrete", "hardconcrete")


def _load(seeds: list[int]) -> list[dict[str, Any]]:
    return [json.loads((RESULTS / f"uncertainty_shift_seed{s}.json").read_text()) for s in seeds]


def _pm(values: list[float], digits: int = 3) -> str:
    a = np.asarray(values)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0:.{digits}f}"


def summarize(seeds: list[int]) -> Path:
    runs = _load(seeds)
    methods = list(runs[0]["methods"])
    points = [
        (r["shift"], r["intensity"]) for r in runs[0]["methods"]["deterministic"]["per_shift"]
    ]
    # value[method][metric] → array (seeds, points)
    value = {
        m: {
            k: np.array([[p[k] for p in run["methods"][m]["per_shift"]] for run in runs])
            for k in METRICS
        }
        for m in methods
    }
    shifted_only = np.array([not (s == "rotation" and i == 0) for s, i in points])
    summary: dict[str, Any] = {"seeds": seeds, "points": points, "methods": {}}
    for m in methods:
        entry = {}
        for k in METRICS:
            entry[f"{k}_mean_all"] = value[m][k].mean(1).tolist()  # per seed
            entry[f"{k}_mean_shifted"] = value[m][k][:, shifted_only].mean(1).tolist()
            entry[f"{k}_clean"] = value[m][k][:, 0].tolist()
        entry["ood_auroc"] = [run["methods"][m]["ood_auroc_entropy"] for run in runs]
        summary["methods"][m] = entry
    best = min(FAMILIES, key=lambda f: np.mean(summary["methods"][f]["nll_mean_all"]))
    summary["best_family"] = best
    slim_gap = {}
    for f in FAMILIES:
        rel = (value[f"{f}_slim"]["nll"] - value[f]["nll"]) / value[f]["nll"]  # (seeds, points)
        slim_gap[f] = {
            "max_abs_rel_nll_gap_per_seed": np.abs(rel).max(1).tolist(),
            "worst_point": points[int(np.abs(rel).max(0).argmax())],
        }
    summary["slim_vs_gated"] = slim_gap
    summary["architectures"] = {
        f: [run["slim"][f]["architecture"] for run in runs] for f in FAMILIES
    }
    summary["wall_s"] = [run["total_s"] for run in runs]
    summary["dropout_p"] = [run["dropout_p"] for run in runs]
    summary["temperature"] = [run["temperature"] for run in runs]
    _plot(value, points, methods, best, seeds)
    path = save("uncertainty_shift", summary)
    _print_tables(summary, methods, best)
    return path


def _print_tables(summary: dict[str, Any], methods: list[str], best: str) -> None:
    print(
        "| method | NLL, mean over shifts | ECE, mean over shifts | Brier | accuracy | clean NLL | OOD AUROC |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        e = summary["methods"][m]
        print(
            f"| {m} | {_pm(e['nll_mean_all'])} | {_pm(e['ece_mean_all'])} | "
            f"{_pm(e['brier_mean_all'])} | {_pm(e['accuracy_mean_all'])} | "
            f"{_pm(e['nll_clean'])} | {_pm(e['ood_auroc'])} |"
        )
    print(f"\nbest family by mean NLL: {best}")
    for f, g in summary["slim_vs_gated"].items():
        print(f"{f}: slim vs gated, max |ΔNLL|/NLL per seed {g['max_abs_rel_nll_gap_per_seed']}")


def _plot(value, points, methods, best, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["deterministic", "temperature", "ensemble5", "dropout", best, f"{best}_slim"]
    shown += [f for f in FAMILIES if f != best]
    kinds = list(dict.fromkeys(s for s, _ in points))
    fig, axes = plt.subplots(2, len(kinds), figsize=(4 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        idx = [i for i, (s, _) in enumerate(points) if s == kind]
        xs = [points[i][1] for i in idx]
        for row, metric in enumerate(("nll", "ece")):
            ax = axes[row][col]
            for m in shown:
                v = value[m][metric][:, idx]
                style = "--" if m in FAMILIES and m != best else "-"
                ax.errorbar(
                    xs, v.mean(0), yerr=v.std(0, ddof=1), label=m, ls=style, capsize=2, lw=1
                )
            ax.set_title(f"{kind}: {metric.upper()}")
            ax.set_xlabel("intensity")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"LeNet-300-100 on Fashion-MNIST under shift, mean ± std over seeds {seeds}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "uncertainty_shift.png", dpi=110)
