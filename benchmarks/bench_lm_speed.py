"""Issue 18: onnxruntime speed of BENCHMARKS §10's language model, dense against slim.

    python benchmarks/bench_lm_speed.py /tmp/bench_lm_hs4/seed{0,1,2}/beta64/slim.pt

Each model (the dense decoder of the shipped ``gpt-lognormal`` recipe, random weights, and each
slim model given) is exported with ``compressdrop.export.export_onnx`` (checked against PyTorch
at batches 1 and 7) and timed in onnxruntime's CPU provider with 2 threads on windows of 128
token ids at each ``--batches``. The models take turns: ``--rounds`` rounds, each model one
session a round (2 warm-up runs, the median of ``--repeats``), so that a change of load hits
them all; a cell is the median over the rounds, with the rounds' range. The speed-up against the
dense net is set beside the FLOPs-per-token reduction (``count_flops`` of one window, attention
scores included): issue 18 asks for a speed-up of at least 0.7 times the FLOP reduction at
batch 64. Results: ``results/lm_ort_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from torchvision_models import import_torchvision

import_torchvision()  # transformers imports torchvision (see tests/torchvision_models.py)

import torch  # noqa: E402

from compressdrop.checkpoint import load_model  # noqa: E402
from compressdrop.evaluation import count_flops  # noqa: E402
from compressdrop.export import export_onnx  # noqa: E402
from compressdrop.models import build_model  # noqa: E402
from compressdrop.recipes import load_recipe  # noqa: E402

from common import machine, ort_in_turns, save  # noqa: E402

CONTEXT = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("slim", nargs="+", help="slim models (.pt) of the gpt-lognormal decoder")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    recipe = load_recipe("gpt-lognormal")
    torch.manual_seed(0)
    dense = build_model(recipe.model.arch, (CONTEXT,), 256, **recipe.model.kwargs).eval()
    models = {"dense": dense} | {path: load_model(path).eval() for path in args.slim}
    window = torch.zeros(1, CONTEXT, dtype=torch.long)
    flops = {k: count_flops(m, window) / CONTEXT for k, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        for i, (k, m) in enumerate(models.items()):
            onnx[k] = Path(tmp) / f"m{i}.onnx"
            export_onnx(m, torch.randint(0, 256, (2, CONTEXT)), onnx[k], check_batch_sizes=(1, 7))
        for batch in args.batches:
            ms = ort_in_turns(onnx, batch, args.rounds, args.repeats, warmup=2)
            base = statistics.median(ms["dense"])
            for k, t in ms.items():
                med = statistics.median(t)
                rows.append({
                    "model": k, "batch": batch, "ms": med, "ms_range": [min(t), max(t)],
                    "tokens_per_s": batch * CONTEXT / (med / 1e3),
                    "flops_per_token": flops[k], "flop_reduction": flops["dense"] / flops[k],
                    "speedup": base / med,
                    "speedup_over_flop_reduction": (base / med) / (flops["dense"] / flops[k]),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    print(save("lm_ort_speed", {"command": " ".join(sys.argv), "machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
