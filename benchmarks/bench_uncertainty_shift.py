"""Issue 19 benchmark: uncertainty under dataset shift, LeNet-300-100 on Fashion-MNIST.

    python benchmarks/bench_uncertainty_shift.py --seed 0        # one seed, writes its JSON
    python benchmarks/bench_uncertainty_shift.py --summarize 0 1 2   # table and plot of the seeds

Methods (every one trained 10 epochs, Adam lr 1e-3, batch 64, on 90 % of the training split):

* ``deterministic``: the plain net; ``temperature``: the same net, softmax(logits / T) with T
  fitted on the validation split (10 %); ``ensemble5``: five plain nets (seeds s, s+100, ...);
* ``dropout``: dropout before each hidden Linear's successor, p chosen on validation NLL from
  {0.1, 0.3}, Monte-Carlo;
* ``<family>``: gates of each family attached after 3 plain epochs, 7 epochs of
  NLL + β·KL/N (β = 1 after a 2-epoch warm-up, gate lr 1e-2), Monte-Carlo from the learned
  posterior (``concrete`` is concrete dropout with a learned keep probability per unit);
  ``<family>_slim``: the same model pruned at the family's default SNR threshold, its kept units
  keeping their noise (``compressdrop.uncertainty.keep_noise``), the same number of samples.

Shifts (``compressdrop.uncertainty.SHIFTS``): rotation 0–180° in 30° steps, Gaussian noise,
blur and contrast at three intensities each, on a fixed random 2,000 of the 10,000 test images;
out-of-distribution: all 1,797 scikit-learn digits upscaled to 28×28 (AUROC of predictive
entropy). 30 Monte-Carlo samples, stacked in one batch per chunk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import compressdrop
from compressdrop.data import load_dataset, load_digits
from compressdrop.training.runner import seed_everything
from compressdrop.uncertainty import (
    SHIFTS,
    auroc,
    deterministic_probs,
    fit_temperature,
    keep_noise,
    mc_samples,
    resize_images,
    scores,
    shifted,
)

from common import machine, save

FAMILIES = ("lognormal", "variational", "concrete", "hardconcrete")
RESULTS = Path(__file__).parent / "results"


def mlp(p: float = 0.0) -> nn.Module:
    """LeNet-300-100, dropout ``p`` after each hidden ReLU (none at 0)."""
    drop = (lambda: nn.Dropout(p)) if p > 0 else (lambda: nn.Identity())
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        drop(),
        nn.Linear(300, 100),
        nn.ReLU(),
        drop(),
        nn.Linear(100, 10),
    )


def epochs(net: nn.Module, x, y, n: int, seed: int, gates: bool = False, start: int = 0):
    """``n`` epochs of Adam; with ``gates``: the ELBO with β warmed up over 2 epochs."""
    weights = [p for name, p in net.named_parameters() if ".gate." not in name]
    groups: list[dict[str, Any]] = [{"params": weights, "lr": 1e-3}]
    if gates:
        gp = [p for name, p in net.named_parameters() if ".gate." in name]
        groups.append({"params": gp, "lr": 1e-2})
    opt = torch.optim.Adam(groups)
    for e in range(n):
        net.train()
        perm = torch.randperm(
            len(x), generator=torch.Generator().manual_seed(seed * 1000 + start + e)
        )
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if gates:
                beta = min(1.0, (e + i / len(x)) / 2)
                loss = loss + beta * compressdrop.kl(net) / len(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def logits_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


def run_seed(seed: int, samples: int, n_test: int, n_epochs: int = 10) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_dataset("fashion-mnist")
    train, val = data.split_validation(0.1, seed=seed)
    x, y = train.x_train, train.y_train
    g = torch.Generator().manual_seed(1234)
    pick = torch.randperm(len(data.x_test), generator=g)[:n_test]
    x_test, y_test = data.x_test[pick], data.y_test[pick]
    digits = load_digits()
    x_ood = resize_images(torch.cat([digits.x_train, digits.x_test]), (1, 28, 28))
    sets = [
        (name, float(i), shifted(x_test, name, i))
        for name, (_, ints) in SHIFTS.items()
        for i in ints
    ]
    wall: dict[str, float] = {}

    def timed(key: str, fn):
        t = time.perf_counter()
        out = fn()
        wall[key] = round(time.perf_counter() - t, 1)
        print(f"seed {seed}: {key} {wall[key]} s", flush=True)
        return out

    # methods: name → function of inputs giving probabilities (N, C)
    predictors: dict[str, Any] = {}
    members = []
    for k in range(5):
        seed_everything(seed + 100 * k)
        members.append(
            timed(f"train plain {k}", lambda k=k: epochs(mlp(), x, y, n_epochs, seed + 100 * k))
        )
    det = members[0]
    temp = fit_temperature(logits_of(det, val.x_test), val.y_test)
    predictors["deterministic"] = lambda xs: deterministic_probs(det, xs)
    predictors["temperature"] = lambda xs: torch.softmax(logits_of(det, xs) / temp, -1)
    predictors["ensemble5"] = lambda xs: torch.stack(
        [deterministic_probs(m, xs) for m in members]
    ).mean(0)

    best = None
    for p in (0.1, 0.3):
        seed_everything(seed)
        net = timed(f"train dropout {p}", lambda p=p: epochs(mlp(p), x, y, n_epochs, seed))
        v = scores(mc_samples(net, val.x_test, samples).mean(0), val.y_test)["nll"]
        if best is None or v < best[0]:
            best = (v, p, net)
    assert best is not None
    dropout_p, dropout_net = best[1], best[2]
    predictors["dropout"] = lambda xs: mc_samples(dropout_net, xs, samples).mean(0)

    slim_info = {}
    for fam in FAMILIES:
        seed_everything(seed)

        def train_gated(fam: str = fam) -> nn.Module:
            pre = max(1, round(0.3 * n_epochs))
            net = epochs(mlp(), x, y, pre, seed)
            compressdrop.attach(net, fam, example_inputs=x[:2])
            return epochs(net, x, y, n_epochs - pre, seed, gates=True, start=pre)

        gated = timed(f"train {fam}", train_gated)
        slim = compressdrop.prune(gated)
        noisy = keep_noise(gated, slim)
        slim_info[fam] = {
            "architecture": slim.prune_report.architecture(),
            "params_gated": sum(
                p.numel() for n, p in gated.named_parameters() if ".gate." not in n
            ),
            "params_slim": sum(p.numel() for n, p in slim.named_parameters()),
        }
        predictors[fam] = lambda xs, m=gated: mc_samples(m, xs, samples).mean(0)
        predictors[f"{fam}_slim"] = lambda xs, m=noisy: mc_samples(m, xs, samples).mean(0)
        predictors[f"{fam}_slim_deterministic"] = lambda xs, m=slim: deterministic_probs(m, xs)

    results: dict[str, Any] = {}
    for name, predict in predictors.items():

        def evaluate(predict=predict) -> dict[str, Any]:
            per = [{"shift": s, "intensity": i, **scores(predict(xs), y_test)} for s, i, xs in sets]
            ent = lambda p: -(p * (p + 1e-12).log()).sum(-1)  # noqa: E731
            ood = auroc(ent(predict(x_test)), ent(predict(x_ood)))
            return {"per_shift": per, "ood_auroc_entropy": ood}

        results[name] = timed(f"eval {name}", evaluate)
    return {
        "seed": seed,
        "samples": samples,
        "test_images": n_test,
        "epochs": n_epochs,
        "dropout_p": dropout_p,
        "temperature": temp,
        "slim": slim_info,
        "methods": results,
        "wall_s": wall,
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--name", default="uncertainty_shift")
    ap.add_argument("--summarize", type=int, nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.summarize is not None:
        from summarize_uncertainty import summarize

        summarize(args.summarize)
        return
    out = run_seed(args.seed, args.samples, args.test_images, args.epochs)
    path = save(f"{args.name}_seed{args.seed}", out)
    print(json.dumps({"saved": str(path), "total_s": out["total_s"]}))


if __name__ == "__main__":
    main()
