"""The language-model benchmark's reports (``bench_lm.py --summarize``, ``--recount``,
``--generate``): the seeds' tables and the chosen settings, FLOPs per token counted again, and
greedy generation speed. ``bench_lm.py``'s docstring says what the runs are and how a setting is
chosen."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from compressdrop.checkpoint import load_model
from compressdrop.evaluation.model_size import count_flops
from compressdrop.models import build_model
from compressdrop.recipes import load_recipe

from common import machine, markdown_table, save

# the shipped net's FLOPs per token at context 128 counted with the attention scores
# (count_flops since 2026-12-05); the JSON of earlier runs holds 712,704 without them
DENSE_FLOPS_WITH_SCORES = 860_160


def _fam(family: str) -> str:
    """The results-name infix of a gate family: empty for log-normal (the first one run)."""
    return "" if family == "lognormal" else f"_{family}"


def _config(r: dict) -> tuple[float, float]:
    """A gated run's setting: (β, the factor on the heads' KL; 1 for runs from before it)."""
    return r["beta"], r.get("head_scale", 1.0)


def _label(r: dict) -> str:
    b, hs = _config(r)
    return f"β = {b:g}" + (f", heads' KL ×{hs:g}" if hs != 1 else "")


def summarize(
    seeds: list[int],
    family: str,
    tag: str = "",
    extra_tags: tuple = (),
    shares: tuple[float, float] = (0.0, 0.0),
) -> None:
    """Per seed: the dense net and every setting (extra runs included, and those of
    ``extra_tags``: ``--head-scale`` runs over the same dense net); the setting chosen on
    validation among those every seed ran, by the rule in the module docstring, among the runs
    that remove at least ``shares`` = (heads, MLP neurons) if any does; mean ± std."""
    results = Path(__file__).parent / "results"
    per_seed = []
    for s in seeds:
        # the dense net has no gates: a family run with --extra only shares log-normal's
        own = results / f"lm_{family}{tag}_seed{s}.json"
        d = json.loads(
            (own if own.exists() else results / f"lm_lognormal{tag}_seed{s}.json").read_text()
        )
        runs = list(d["runs"]) if own.exists() else []
        for t in (tag, *(f"_{e}" for e in extra_tags)):
            for f in sorted(results.glob(f"lm_extra{_fam(family)}{t}_seed{s}_beta*.json")):
                runs.append(json.loads(f.read_text()))
        per_seed.append((s, d["dense"], runs))
    grid = set.intersection(*({_config(r) for r in runs} for _, _, runs in per_seed))
    rows, chosen = [], []
    for s, dense, runs in per_seed:
        ok = [r for r in runs if _config(r) in grid and r["val_bpb"] <= 1.05 * dense["val_bpb"]]
        enough = [
            r for r in ok if r["heads_removed"] >= shares[0] and r["neurons_removed"] >= shares[1]
        ]
        ok = enough or ok
        pick = min(ok, key=lambda r: r["flops_per_token"]) if ok else None
        chosen.append((dense, pick))
        rows.append(
            {
                "seed": s,
                "run": "dense",
                "val bpb": dense["val_bpb"],
                "test bpb": dense["test_bpb"],
                "kFLOPs/token": dense["flops_per_token"] / 1e3,
            }
        )
        for r in sorted(runs, key=_config):
            rows.append({
                "seed": s,
                "run": _label(r) + (" (chosen)" if r is pick else "")
                + ("" if _config(r) in grid else " (this seed only)"),
                "heads": r["heads"], "neurons": r["neurons"], "val bpb": r["val_bpb"],
                "test bpb": r["test_bpb"], "kFLOPs/token": r["flops_per_token"] / 1e3,
                "FLOPs ×": r["flops_reduction"],
                "test vs dense": f"{r['test_bpb'] / dense['test_bpb'] - 1:+.1%}",
            })  # fmt: skip
    cols = [
        "seed",
        "run",
        "heads",
        "neurons",
        "val bpb",
        "test bpb",
        "test vs dense",
        "kFLOPs/token",
        "FLOPs ×",
    ]
    print(markdown_table(rows, cols))

    def ms(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.4g} ± {sd:.2g}"

    picked = [(d, c) for d, c in chosen if c is not None]
    print(f"\ngrid (every seed): {sorted(grid)}; chosen: {[_label(c) for _, c in picked]}")
    print("dense test bpb", ms([d["test_bpb"] for d, _ in chosen]))
    if picked:
        print("chosen test bpb", ms([c["test_bpb"] for _, c in picked]))
        print("worse than dense", ms([c["test_bpb"] / d["test_bpb"] - 1 for d, c in picked]))
        print("heads removed", ms([c["heads_removed"] for _, c in picked]))
        print("neurons removed", ms([c["neurons_removed"] for _, c in picked]))
        # each run's own reduction (its report's dense and slim counted alike: runs from before
        # the count_flops fix of 2026-12-05 leave the attention scores out of both)
        print("FLOPs/token reduction", ms([c["flops_reduction"] for _, c in picked]))
    dense_by_seed = dict(zip(seeds, (d for d, _ in chosen)))
    _summarize_tp(results, seeds, dense_by_seed, ms)
    _summarize_scratch(results, seeds, dense_by_seed, ms)


def _summarize_tp(results: Path, seeds: list[int], dense: dict, ms) -> None:
    """The Torch-Pruning runs (``--tp``) of these seeds, per (method, target): test bpb against
    the seed's dense net and FLOPs per token, counted with attention scores, as they were run."""
    by: dict[tuple, list] = {}
    for s in seeds:
        for f in sorted(results.glob(f"lm_tp_*_seed{s}.json")):
            r = json.loads(f.read_text())
            by.setdefault((r["method"], r["target"]), []).append((s, r))
    for (method, target), runs in sorted(by.items()):
        print(f"\nTorch-Pruning {method}, target {target:g}x, seeds {[s for s, _ in runs]}:")
        for s, r in runs:
            print(
                f"  seed {s}: neurons {r['neurons']}, test bpb {r['test_bpb']:.3f} "
                f"({r['test_bpb'] / dense[s]['test_bpb'] - 1:+.1%}), "
                f"{r['flops_per_token'] / 1e3:.1f} kFLOPs/token, reached {r['target_reached']}"
            )
        print("  worse than dense", ms([r["test_bpb"] / dense[s]["test_bpb"] - 1 for s, r in runs]))
        print("  FLOPs/token reduction (with scores)",
              ms([DENSE_FLOPS_WITH_SCORES / r["flops_per_token"] for _, r in runs]))  # fmt: skip


def _summarize_scratch(results: Path, seeds: list[int], dense: dict, ms) -> None:
    """Smaller nets trained from scratch (``--dense-only --tag T``, other widths or depths) with
    the same epochs: test bpb against the seed's dense net and FLOPs per token (with the attention
    scores, as counted when they ran). ``--tag recheck`` (the shipped net again) is shown apart."""
    by: dict[str, list] = {}
    for s in seeds:
        for f in sorted(results.glob(f"lm_dense_*_seed{s}.json")):
            tag = f.name.removeprefix("lm_dense_").removesuffix(f"_seed{s}.json")
            by.setdefault(tag, []).append((s, json.loads(f.read_text())))
    for tag, runs in sorted(by.items()):
        print(f"\nFrom scratch, --tag {tag} ({runs[0][1]['model']}), seeds {[s for s, _ in runs]}:")
        for s, r in runs:
            d = r["dense"]
            print(
                f"  seed {s}: val bpb {d['val_bpb']:.3f}, test bpb {d['test_bpb']:.3f} "
                f"({d['test_bpb'] / dense[s]['test_bpb'] - 1:+.1%}), "
                f"{d['flops_per_token'] / 1e3:.1f} kFLOPs/token, {d['seconds']:.0f} s"
            )
        print("  worse than dense", ms([r["dense"]["test_bpb"] / dense[s]["test_bpb"] - 1
                                        for s, r in runs]))  # fmt: skip
        print("  FLOPs/token reduction (with scores)",
              ms([DENSE_FLOPS_WITH_SCORES / r["dense"]["flops_per_token"] for _, r in runs]))  # fmt: skip


def recount(paths: list[str]) -> None:
    """FLOPs per token of saved slim models with today's ``count_flops`` (attention scores
    included), for runs whose JSON was written before that fix; saved to lm_flops_recount."""
    rows = []
    for path in paths:
        x = torch.randint(0, 256, (1, 128))  # one window of the benchmark's context
        f = count_flops(load_model(path), x) / x.shape[1]
        rows.append({"path": path, "flops_per_token": f, "reduction": DENSE_FLOPS_WITH_SCORES / f})
        print(json.dumps(rows[-1]), flush=True)
    print(save("lm_flops_recount", {"command": " ".join(sys.argv), "rows": rows}))


def generation(paths: list[str], new_tokens: int = 112, repeats: int = 7) -> None:
    """Greedy generation speed (key/value cache on, one thread) of the dense net and of saved slim
    models: ``new_tokens`` after a 16-byte prompt, batch 1 and 16, the median of ``repeats``
    timings taken in turns (dense, slim, dense, ...), so that a change of load hits both."""
    torch.set_num_threads(1)
    recipe = load_recipe("gpt-lognormal")
    torch.manual_seed(0)
    models = {"dense": build_model(recipe.model.arch, (128,), 256, **recipe.model.kwargs).eval()}
    models |= {path: load_model(path).eval() for path in paths}
    rows = []
    for batch in (1, 16):
        ids = torch.randint(0, 256, (batch, 16))
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats + 1):  # the first round warms up
            for k, m in models.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            med = statistics.median(ts[1:])
            rows.append({"model": k, "batch": batch, "seconds": med,
                         "tokens_per_s": batch * new_tokens / med,
                         "flops_per_token": count_flops(models[k], torch.zeros(1, 128, dtype=torch.long)) / 128})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(
        save("lm_generation", {"command": " ".join(sys.argv), "machine": machine(), "rows": rows})
    )
