"""Issue 16 learning check (and issue 18's language model): a byte-level GPT-2-style decoder on the
Python standard library's source, gated heads and MLP neurons against the same net without gates.

    python benchmarks/bench_lm.py --seed 0 --betas 8 32     # one seed: dense + one run per β
    python benchmarks/bench_lm.py --seed 0 --betas 128 --extra  # more β, the dense run reused
    python benchmarks/bench_lm.py --summarize 0 1 2          # table of the seeds' JSON files
    # the heads' KL × 4 (gates.kl_scale) over the same dense runs, then all settings together,
    # chosen among the runs that remove a quarter of the heads and a third of the neurons
    python benchmarks/bench_lm.py --seed 0 --betas 64 --head-scale 4 --tag hs4 --extra
    python benchmarks/bench_lm.py --summarize 0 1 2 --extra-tags hs4 --shares 0.25 0.33
    # another gate family over the same dense runs (its runs named lm_extra_<family>_...)
    python benchmarks/bench_lm.py --seed 0 --family hardconcrete --betas 32 --head-scale 4 \
        --tag hs4 --extra --out /tmp/bench_lm_hc
    python benchmarks/bench_lm.py --summarize 0 1 2 --family hardconcrete --extra-tags hs4
    # a smaller net trained from scratch with the same epochs (width 64: 2.0x fewer FLOPs/token)
    python benchmarks/bench_lm.py --seed 0 --width 64 --dense-only --tag w64

Corpus: the ``*.py`` files of /usr/lib/python3.11 (Debian's libpython3.11-minimal/-stdlib) in
path order up to 2 MB, split by file (hash order) 80/10/10 into train/validation/test; its size
and SHA-256 are recorded. Tokens are bytes, so NLL in bits per token is bits per byte.

Model: the shipped ``gpt-lognormal`` recipe's decoder with ``--layers``/``--width``/``--heads``.
Dense: the same net without gates, trained with the gated run's epochs, learning rates and batch
order, stage by stage. Gated: pretrain,
sparsify with β·KL/N (N = training tokens, KL weighted by each unit's multiply-adds), prune at
the family's default SNR threshold, fine-tune. The setting (β, the heads' KL factor) is chosen per
seed on the validation split: the run with the fewest FLOPs whose validation bits per byte is
within 5 % of the dense net's (with ``--shares``: among those that also remove at least those
shares of heads and neurons, if any does); test bits per byte are read once, for the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from torchvision_models import import_torchvision

import_torchvision()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compressdrop.data import load_dataset  # noqa: E402
from compressdrop.evaluation.metrics import evaluate, logits_of, prediction_loss  # noqa: E402
from compressdrop.evaluation.model_size import count_flops, count_params  # noqa: E402
from compressdrop.models import build_model  # noqa: E402
from compressdrop.recipes import load_recipe  # noqa: E402
from compressdrop.training.runner import run_recipe, seed_everything  # noqa: E402

import tp_baselines  # noqa: E402
from common import machine, save  # noqa: E402
from lm_report import _fam, generation, recount, summarize  # noqa: E402

DATA = "text:/usr/lib/python3.11,glob=**/*.py,max_bytes={max_bytes},context={context}"
LN2 = 0.6931471805599453


def _shares(report: dict[str, Any]) -> dict[str, Any]:
    heads = [r for r in report["layers"] if r["name"].endswith("attn.c_proj")]
    mlp = [r for r in report["layers"] if r["name"].endswith("mlp.c_fc")]
    h0, h1 = sum(r["before"] for r in heads), sum(r["after"] for r in heads)
    n0, n1 = sum(r["before"] for r in mlp), sum(r["after"] for r in mlp)
    return {
        "heads": f"{h1}/{h0}",
        "heads_removed": 1 - h1 / h0 if h0 else 0.0,
        "neurons": f"{n1}/{n0}",
        "neurons_removed": 1 - n1 / n0 if n0 else 0.0,
        "heads_per_layer": [r["after"] for r in heads],
    }


def one_run(recipe, ds, out: Path, label: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_recipe(recipe, ds, out / label)
    rep = res.report
    last = rep["history"][-1]
    row = {
        "label": label,
        "val_bpb": last["val_nll"] / LN2,
        "test_bpb": rep["slim"]["test_bits_per_byte"],
        "dense_test_bpb": rep["dense"].get("test_bits_per_byte"),
        "params": rep["slim"]["params"],
        "flops_per_token": rep["slim"]["flops"] / ds.input_shape[0],
        "flops_reduction": rep["flops_reduction"],
        "seconds": time.perf_counter() - t0,
        "epoch_seconds": [round(h["seconds"], 1) for h in rep["history"]],
        **(_shares(rep) if rep["layers"] else {}),
    }
    print(json.dumps(row), flush=True)
    return row


STAGES = ("pretrain", "sparsify", "finetune")


def fit(model, recipe, train, stages: tuple[str, ...]) -> list[float]:
    """Train ``model`` plainly through ``stages`` with the gated run's epochs, learning rates and
    batch order (a fresh Adam per stage, as the runner does); the seconds of each epoch."""
    bs, n = recipe.data.batch_size, len(train.x_train)
    epoch_seconds = []
    for name in stages:
        k, cfg = STAGES.index(name), getattr(recipe.stages, name)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        for epoch in range(cfg.epochs):
            t1 = time.perf_counter()
            model.train()
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + k * 10_007 + epoch)
            perm = torch.randperm(n, generator=gen)
            for lo in range(0, n, bs):
                idx = perm[lo : lo + bs]
                loss = prediction_loss(model(train.x_train[idx]), train.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epoch_seconds.append(round(time.perf_counter() - t1, 1))
    return epoch_seconds


def _scores(model, ds, val, label: str, t0: float, epoch_seconds: list[float]) -> dict[str, Any]:
    v = evaluate(model, val.x_test, val.y_test)
    t = evaluate(model, ds.x_test, ds.y_test)
    return {
        "label": label,
        "val_bpb": v.bits,
        "test_bpb": t.bits,
        "params": count_params(model),
        "flops_per_token": count_flops(model, ds.x_train[:1]) / ds.input_shape[0],
        "seconds": time.perf_counter() - t0,
        "epoch_seconds": epoch_seconds,
    }


def _dense_model(recipe, ds):
    seed_everything(recipe.seed)
    return build_model(recipe.model.arch, ds.input_shape, ds.num_classes, **recipe.model.kwargs)


def dense_run(recipe, ds) -> dict[str, Any]:
    """The recipe's net without gates, trained with the gated run's stages' epochs, learning rates
    and batches."""
    t0 = time.perf_counter()
    model = _dense_model(recipe, ds)
    train, val = ds.split_validation()
    row = _scores(model, ds, val, "dense", t0, fit(model, recipe, train, STAGES))
    print(json.dumps(row), flush=True)
    return row


def conv1d_to_linear_(model: nn.Module) -> nn.Module:
    """GPT-2's ``Conv1D`` layers (weight stored ``(in, out)``) replaced by equal ``nn.Linear`` s.

    Torch-Pruning's importance criteria know torch's layer types only: on ``Conv1D`` they return
    nothing and nothing is pruned. This is the patch a Torch-Pruning user writes first.
    """
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child).__name__ == "Conv1D":
                w = child.weight
                lin = nn.Linear(w.shape[0], w.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(w.t())
                    lin.bias.copy_(child.bias)
                setattr(mod, name, lin)
    return model


def _mlp_neurons_only(m: nn.Module) -> dict[str, Any]:
    """Torch-Pruning's arguments for a GPT copy: every layer but the MLPs' ``c_fc`` left alone
    (the residual stream, the packed attention), the logits read from the output."""
    fcs = [mod for n, mod in m.named_modules() if n.endswith("mlp.c_fc")]
    return {
        "ignored_layers": [
            x for x in m.modules() if isinstance(x, (nn.Linear, nn.Embedding)) and x not in fcs
        ],
        "output_transform": lambda out: [logits_of(out)],
    }


def tp_run(args) -> dict[str, Any]:
    """Torch-Pruning on the same decoder: the dense net pretrained as the gated run is, its MLP
    neurons pruned (uniformly per layer, ``--tp`` importance; Taylor from the gradients of 8
    training batches) to ``dense FLOPs / --tp-target``, then trained through the gated run's
    sparsify and fine-tune epochs with their learning rates and batch order. The heads stay:
    Torch-Pruning cannot cut heads out of GPT-2's packed ``c_attn``."""
    ds, base = _base(args)
    t0 = time.perf_counter()
    model = _dense_model(base, ds)
    train, val = ds.split_validation()
    seconds = fit(model, base, train, ("pretrain",))
    conv1d_to_linear_(model)
    example = ds.x_train[:1]
    target = count_flops(model, example) / args.tp_target
    pruned, hi = tp_baselines.prune_to_flops(
        model, train, example, f"{args.tp}-r{args.tp_target:g}", count_flops, args.seed,
        configure=_mlp_neurons_only, grad_batch=32, hi=0.99, steps=12,
    )  # fmt: skip
    seconds += fit(pruned, base, train, ("sparsify", "finetune"))
    row = _scores(
        pruned, ds, val, f"Torch-Pruning {args.tp}, target {args.tp_target:g}×", t0, seconds
    )
    neurons = [m.out_features for n, m in pruned.named_modules() if n.endswith("mlp.c_fc")]
    total = sum(m.out_features for n, m in model.named_modules() if n.endswith("mlp.c_fc"))
    row |= {
        "pruning_ratio": hi,
        "neurons": f"{sum(neurons)}/{total}",
        "heads_removed": 0.0,
        "neurons_removed": 1 - sum(neurons) / total,
        "method": args.tp,
        "target": args.tp_target,
        "target_reached": row["flops_per_token"] * example.shape[-1] <= 1.001 * target,
    }
    print(json.dumps(row), flush=True)
    return row


def _base(args):
    data = DATA.format(max_bytes=args.max_bytes, context=args.context)
    return load_dataset(data), load_recipe("gpt-lognormal").override(
        {
            "data.name": data,
            "model.kwargs": {
                "model_type": "gpt2",
                "n_layer": args.layers,
                "n_embd": args.width,
                "n_head": args.heads,
            },
            "gates.family": args.family,
            "gates.kl_cost": "flops",
            "gates.kl_scale": {"head": args.head_scale} if args.head_scale != 1 else {},
            "stages.pretrain.epochs": args.pretrain,
            "stages.sparsify.epochs": args.sparsify,
            "stages.finetune.epochs": args.finetune,
            "export.onnx": False,
            "seed": args.seed,
        }
    )


def run_extra(args) -> None:
    """More β for a seed whose dense run is done: one JSON per run (``lm_extra_seedS_betaB``;
    another family's ``lm_extra_<family>_seedS_betaB``, with ``--tag`` after the family)."""
    ds, base = _base(args)
    fam = _fam(args.family)
    for b in args.betas:
        label = f"{args.family}-beta{b:g}" if fam else f"beta{b:g}"
        row = one_run(base.override({"kl.beta": b}), ds, Path(args.out) / f"seed{args.seed}", label)
        row["beta"], row["head_scale"], row["family"] = b, args.head_scale, args.family
        print(
            save(
                f"lm_extra{fam}{_tag(args)}_seed{args.seed}_beta{b:g}",
                {"command": " ".join(sys.argv), **row},
            )
        )


def run_seed(args) -> dict[str, Any]:
    ds, base = _base(args)
    out = Path(args.out) / f"seed{args.seed}"
    dense = dense_run(base, ds)
    runs = [one_run(base.override({"kl.beta": b}), ds, out, f"beta{b:g}") for b in args.betas]
    for r, b in zip(runs, args.betas):
        r["beta"], r["head_scale"] = b, args.head_scale
    ok = [r for r in runs if r["val_bpb"] <= 1.05 * dense["val_bpb"]]
    chosen = min(ok, key=lambda r: r["flops_per_token"]) if ok else None
    return {
        "seed": args.seed,
        "data": ds.source,
        "model": base.model.kwargs,
        "family": args.family,
        "epochs": {"pretrain": args.pretrain, "sparsify": args.sparsify, "finetune": args.finetune},
        "dense": dense,
        "runs": runs,
        "chosen_beta": chosen["beta"] if chosen else None,
    }


def _tag(args) -> str:
    """The results-name infix of a variant of the net (``--tag``): empty for the shipped one."""
    return f"_{args.tag}" if args.tag else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="lognormal")
    p.add_argument("--betas", type=float, nargs="+", default=[8.0, 32.0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--pretrain", type=int, default=2)
    p.add_argument("--sparsify", type=int, default=3)
    p.add_argument("--finetune", type=int, default=1)
    p.add_argument("--out", default="/tmp/bench_lm")
    p.add_argument("--summarize", type=int, nargs="*")
    p.add_argument("--tag", default="", help="names a variant's results (e.g. h8 for --heads 8)")
    p.add_argument("--head-scale", type=float, default=1.0, help="factor on the heads' KL")
    p.add_argument("--extra-tags", nargs="*", default=[], help="summarize: their runs too")
    p.add_argument(
        "--shares",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        help="summarize: choose among runs removing at least these shares of heads and neurons",
    )
    p.add_argument("--extra", action="store_true", help="only gated runs for --betas (no dense)")
    p.add_argument(
        "--dense-only",
        action="store_true",
        help="only the net without gates (lm_dense<tag>_seedS): a smaller net from scratch",
    )
    p.add_argument(
        "--tp", choices=("taylor", "l1"), help="a Torch-Pruning run instead (MLP neurons)"
    )
    p.add_argument("--tp-target", type=float, default=1.5, help="--tp: dense FLOPs / this")
    p.add_argument("--recount", nargs="*", help="slim.pt files: FLOPs per token counted today")
    p.add_argument("--generate", nargs="*", help="slim.pt files: greedy generation speed")
    args = p.parse_args()
    if args.generate is not None:
        generation(args.generate)
        return
    if args.recount:
        recount(args.recount)
        return
    if args.tp:
        row = {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "seed": args.seed,
            **tp_run(args),
        }
        print(save(f"lm_tp_{args.tp}_r{args.tp_target:g}{_tag(args)}_seed{args.seed}", row))
        return
    if args.summarize is not None:
        summarize(
            args.summarize, args.family, _tag(args), tuple(args.extra_tags), tuple(args.shares)
        )
        return
    if args.extra:
        run_extra(args)
        return
    if args.dense_only:
        ds, base = _base(args)
        row = {"command": " ".join(sys.argv), "seed": args.seed, "model": base.model.kwargs}
        row |= {"data": ds.source, "dense": dense_run(base, ds)}
        print(save(f"lm_dense{_tag(args)}_seed{args.seed}", row))
        return
    t0 = time.perf_counter()
    result = run_seed(args)
    result["wall_seconds"] = time.perf_counter() - t0
    result["command"] = " ".join(sys.argv)
    result["machine"] = machine()
    print(save(f"lm_{args.family}{_tag(args)}_seed{args.seed}", result))


if __name__ == "__main__":
    main()
