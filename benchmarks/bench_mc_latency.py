"""Issue 19 benchmark: what Monte-Carlo from a slim ONNX model costs, and what it answers.

    python benchmarks/bench_mc_latency.py --seeds 0 1 2

For LeNet-300-100 and LeNet-5-Caffe on Fashion-MNIST, per seed: plain epochs, then log-normal
gates trained on NLL + β·KL/N (gate lr 1e-2, β warmed up to 1 over 2 epochs), pruned at SNR 1.
Then, in onnxruntime (CPU, one intra-op thread):

* ``deterministic``: the slim ONNX model, one pass;
* ``mc_all_input_repeat``: every kept unit's noise, 30 samples, the input repeated 30 times;
* ``mc_all``: the same posterior, the layers before the first gate run once per input;
* ``mc_last``: only the last gated layer keeps its noise (the layers before it run once).

Latency: median of 50 calls on a batch of 64 test images (after 5 warm-up calls). Quality: NLL,
ECE and accuracy of each on the test split, clean and rotated 60° (30 samples).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import compressdrop
from compressdrop.data import load_dataset
from compressdrop.evaluation.onnx_eval import evaluate_onnx
from compressdrop.export import export_onnx
from compressdrop.gating import named_gates
from compressdrop.models import build_model
from compressdrop.runtime import ort_session
from compressdrop.training.runner import seed_everything
from compressdrop.uncertainty import (
    expected_calibration_error,
    export_mc_onnx,
    keep_noise,
    mc_evaluate_onnx,
    shifted,
)

from common import save

ARCHS = {"lenet300": (3, 7), "lenet5": (2, 4)}  # plain epochs, gated epochs


def train(arch: str, x, y, seed: int) -> torch.nn.Module:
    pre, gated_epochs = ARCHS[arch]
    seed_everything(seed)
    net = build_model(arch, input_shape=(1, 28, 28))
    for stage, n in (("plain", pre), ("gated", gated_epochs)):
        if stage == "gated":
            compressdrop.attach(net, "lognormal", example_inputs=x[:2])
        gate_params = [p for n_, p in net.named_parameters() if ".gate." in n_]
        rest = [p for n_, p in net.named_parameters() if ".gate." not in n_]
        groups = [{"params": rest, "lr": 1e-3}]
        if gate_params:
            groups.append({"params": gate_params, "lr": 1e-2})
        opt = torch.optim.Adam(groups)
        for e in range(n):
            net.train()
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100 + e))
            for i in range(0, len(x), 64):
                idx = perm[i : i + 64]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                if stage == "gated":
                    loss = loss + min(1.0, (e + i / len(x)) / 2) * compressdrop.kl(net) / len(x)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def latency(path: Path, xb: np.ndarray, runs: int = 50) -> float:
    session, _ = ort_session(path, "cpu", threads=1)
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: xb})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: xb})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(arch: str, seed: int, data, samples: int) -> dict[str, Any]:
    train_split, _ = data.split_validation(0.1, seed=seed)
    t0 = time.perf_counter()
    gated = train(arch, train_split.x_train, train_split.y_train, seed)
    t_train = time.perf_counter() - t0
    slim = compressdrop.prune(gated)
    x64 = data.x_test[:64]
    last = [n for n, _ in named_gates(gated)][-1]
    variants = {
        "mc_all_input_repeat": (keep_noise(gated, slim), False),
        "mc_all": (keep_noise(gated, slim), True),
        "mc_last": (keep_noise(gated, slim, layers=[last]), True),
    }
    rotated = shifted(data.x_test, "rotation", 60)
    out: dict[str, Any] = {
        "arch": arch,
        "seed": seed,
        "train_s": round(t_train, 1),
        "architecture": slim.prune_report.architecture(),
        "last_gate": last,
    }
    with tempfile.TemporaryDirectory() as tmp:
        det = Path(tmp) / "slim.onnx"
        export_onnx(slim, x64, det, providers="cpu")
        xb = x64.numpy()
        out["deterministic"] = {"latency_s": latency(det, xb)}
        for test_name, xs in (("clean", data.x_test), ("rotated60", rotated)):
            r = evaluate_onnx(det, xs, data.y_test, device="cpu")
            session, _ = ort_session(det, "cpu")
            logits = torch.from_numpy(
                session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0]
            )
            ece = expected_calibration_error(torch.softmax(logits, -1), data.y_test)
            out["deterministic"][test_name] = {
                "accuracy": r["accuracy"],
                "nll": r["nll"],
                "ece": ece,
            }
        for name, (model, late) in variants.items():
            path = Path(tmp) / f"{name}.onnx"
            export_mc_onnx(model, x64, path, samples, providers="cpu", repeat_late=late)
            entry: dict[str, Any] = {"latency_s": latency(path, xb)}
            entry["ratio"] = entry["latency_s"] / out["deterministic"]["latency_s"]
            for test_name, xs in (("clean", data.x_test), ("rotated60", rotated)):
                r = mc_evaluate_onnx(path, xs, data.y_test, samples, device="cpu", batch_size=256)
                entry[test_name] = {k: r[k] for k in ("accuracy", "nll", "ece", "nll_change")}
            out[name] = entry
            print(f"{arch} seed {seed} {name}: ratio {entry['ratio']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_dataset("fashion-mnist")
    rows = [measure(arch, s, data, args.samples) for arch in ARCHS for s in args.seeds]
    path = save(
        "mc_latency",
        {
            "samples": args.samples,
            "seeds": args.seeds,
            "epochs": ARCHS,
            "rows": rows,
            "total_s": round(time.perf_counter() - t0, 1),
        },
    )
    print(path)


if __name__ == "__main__":
    main()
