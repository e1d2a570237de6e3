"""Benchmark 4: surgery and export time for a ResNet-18-sized net (about 11 M parameters), CPU.

Run: .venv/bin/python benchmarks/bench_surgery.py
The gates get random parameters and the threshold is their median SNR: about half the units go.
"""

from __future__ import annotations

import time

import torch

import compressdrop as cd
from compressdrop.evaluation import count_flops, count_params
from compressdrop.models import build_model

from common import markdown_table, save


def main() -> None:
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = build_model("resnet", shape, 10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)).eval()
    x = torch.randn(2, *shape)
    dense_params, dense_flops = count_params(model), count_flops(model, x)
    t0 = time.perf_counter()
    cd.attach(model, gate="lognormal", example_inputs=x)
    t_attach = time.perf_counter() - t0
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.mu.uniform_(-3, 0.5)
            g.log_sigma.uniform_(-3, 0.5)
    threshold = float(torch.cat([g.snr().detach() for _, g in cd.named_gates(model)]).median())
    t0 = time.perf_counter()
    slim = cd.prune(model, threshold, example_inputs=x)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = cd.export_onnx(slim, x, "/tmp/compressdrop-bench-resnet18.onnx")
    t_export = time.perf_counter() - t0
    row = {
        "params dense": dense_params,
        "params slim": count_params(slim),
        "FLOPs dense": dense_flops,
        "FLOPs slim": count_flops(slim, x),
        "attach s": t_attach,
        "prune s (incl. parity check)": t_prune,
        "export s (incl. onnxruntime checks)": t_export,
        "ONNX MB": report.bytes / 1e6,
        "max rel error": slim.prune_report.max_rel_error,
    }
    table = markdown_table([row], list(row))
    print(table)
    save("surgery", {"rows": [row], "table": table})


if __name__ == "__main__":
    main()
