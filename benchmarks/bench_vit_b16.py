"""ViT-B/16 on the CPU: attach, prune and verified ONNX export times (issue 15's goals: prune
≤ 2 s, verified export ≤ 30 s).

Run: .venv/bin/python benchmarks/bench_vit_b16.py [--repeats 2]

torchvision's ``vit_b_16`` (random weights, 10 classes, its zero-initialized head drawn from
N(0, 0.02) so that the checks mean something), 224×224 inputs, batch 2. ``attach`` gates the 144
heads and the 12 MLP hidden layers (log-normal); the SNRs are spread at random (log σ ~ U(−3, 1))
and ``prune`` cuts at the median. Export is ``export_onnx``'s full check: the dynamo exporter,
``onnx.checker``, then onnxruntime against PyTorch at batches 1, 7 and 64 (and, separately, 1
and 7). Each step is timed ``--repeats`` times in one process, on a fresh model each time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compressdrop as cd

from common import save
from tests.torchvision_models import import_torchvision


def once(tv, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = tv.models.vit_b_16(num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, 224, 224)
    params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the LayerNorm stream stays ungated
        cd.attach(model, example_inputs=x)
    attach_s = time.perf_counter() - t
    gates = list(cd.named_gates(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, g in gates:
            g.log_sigma.uniform_(-3, 1)
    thr = float(torch.cat([g.snr().detach() for _, g in gates]).median())
    t = time.perf_counter()
    slim = cd.prune(model, thr, example_inputs=x)
    prune_s = time.perf_counter() - t
    row = {
        "gates": len(gates),
        "params": params,
        "params_after": sum(p.numel() for p in slim.parameters()),
        "architecture": slim.prune_report.architecture(),
        "parity": slim.prune_report.max_rel_error,
        "attach_s": attach_s,
        "prune_s": prune_s,
    }
    for batches in ((1, 7, 64), (1, 7)):
        t = time.perf_counter()
        report = cd.export_onnx(slim, x, tmp / "vit.onnx", check_batch_sizes=batches)
        key = ",".join(map(str, batches))
        row[f"export_s[{key}]"] = time.perf_counter() - t
        row[f"onnx_err[{key}]"] = max(report.max_rel_error.values())
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tv = import_torchvision()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            rows.append(once(tv, Path(tmp)))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})
    save("vit_b16", {"args": vars(args), "torchvision": tv.__version__, "rows": rows})


if __name__ == "__main__":
    main()
