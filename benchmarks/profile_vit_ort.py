"""Where a slim ViT's onnxruntime time goes (issue 18's speed target for the vision transformer).

    python benchmarks/profile_vit_ort.py --units 4-18-1-12-1-9-1-1 --threads 1 2
    python benchmarks/profile_vit_ort.py --units 4-8-2-2-1-1-1-1 4-5-3-1-1-1-1-1 --no-profile

Builds §1's tiny ViT dense and slim with the given kept units per layer (heads, MLP neurons,
layer by layer: the first is seed 0's variational run), exports them, and measures each in
onnxruntime at batch 64 with the CPU provider: wall time with the models in turns (median of
``--rounds`` rounds of ``--repeats`` runs), with the default graph optimizations and with the
two fusions that this profile finds slow disabled (``SkipLayerNormFusion``, ``BiasGeluFusion``),
each slim net's FLOPs reduction and its speed-up over it, and (unless ``--no-profile``) the
kernel time per operator type from onnxruntime's profiler. Several ``--units`` (the
architectures of §1's table, say) are timed in the same turns. The slim nets' weights are the
dense net's random ones (biases too: a zero bias could be folded away), cut by surgery. With
``--ablate-gemm`` every model is also exported with its linear layers as ``MatMul`` + ``Add``
(``compressdrop/export/_gemm.py`` off) and timed in the same turns. Results:
``benchmarks/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import torch

import compressdrop as cd
import compressdrop.export.onnx as onnx_export
from compressdrop.evaluation import count_flops
from compressdrop.export import export_onnx
from compressdrop.gating import named_gates
from compressdrop.models import build_model

from common import save

SLOW_FUSIONS = ["SkipLayerNormFusion", "BiasGeluFusion"]


MATMUL = " (matmul+add)"  # the name suffix of a model exported without gemm_linears


@contextlib.contextmanager
def _no_gemm(model: torch.nn.Module) -> Iterator[int]:
    yield 0


def models(
    archs: list[list[int]], out: Path, ablate_gemm: bool = False
) -> tuple[dict[str, Path], dict[str, float]]:
    """The dense ViT and one that keeps each of ``archs`` (units per gate, in attach's order), as
    ONNX, with each slim net's FLOPs reduction; with ``ablate_gemm`` each also exported with its
    linear layers as ``MatMul`` + ``Add`` (``export/_gemm.py`` off), named with ``MATMUL``."""
    example = torch.randn(2, 1, 28, 28)
    torch.manual_seed(0)
    dense = build_model("vit", input_shape=(1, 28, 28))
    with torch.no_grad():  # the attention's biases start at 0, which an optimizer may fold away
        for name, p in dense.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    nets = {"dense": dense}
    for units in archs:
        nets["slim" if len(archs) == 1 else "-".join(map(str, units))] = _slim(
            dense, units, example
        )
    paths, ratios = {}, {}
    for suffix in ("", MATMUL) if ablate_gemm else ("",):
        switch = mock.patch.object(onnx_export, "gemm_linears", _no_gemm) if suffix else None
        with switch or contextlib.nullcontext():
            for name, net in nets.items():
                path = out / f"{name}{'-matmul' if suffix else ''}.onnx"
                export_onnx(net, example, path)
                paths[name + suffix] = path
                if name != "dense":
                    ratios[name + suffix] = count_flops(dense, example) / count_flops(net, example)
    return paths, ratios


def _slim(dense: torch.nn.Module, units: list[int], example: torch.Tensor) -> torch.nn.Module:
    """``dense`` cut by surgery to ``units`` (a copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = cd.attach(copy.deepcopy(dense), gate="variational", example_inputs=example)
        gates = list(named_gates(gated))
        if len(gates) != len(units):
            raise SystemExit(f"--units names {len(units)} layers' units, the ViT has {len(gates)}")
        with torch.no_grad():
            for (_, g), k in zip(gates, units):
                g.log_sigma2.fill_(5.0)  # SNR e^-5: cut
                g.log_sigma2[:k] = -10.0  # SNR e^10: kept
        slim = cd.prune(gated, 1.0, example_inputs=example)
    kept = slim.prune_report.architecture_after
    if kept != "-".join(map(str, units)):
        raise SystemExit(f"surgery kept {kept}, not {units}")
    return slim


def session(path: Path, threads: int, disabled: list[str], profile: str | None = None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def by_op(path: Path, x: np.ndarray, threads: int, disabled: list[str], runs: int = 30) -> dict:
    """Kernel microseconds a run per operator type (and node count), from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, threads, disabled, profile=f"{tmp}/p")
        name = s.get_inputs()[0].name
        for _ in range(runs):
            s.run(None, {name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    us: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            us[e["args"]["op_name"]] += e["dur"] / runs
            nodes[e["args"]["op_name"]] += 1 / runs
    return {op: {"us": round(v, 1), "nodes": round(nodes[op])} for op, v in us.most_common()}


def in_turns(paths, x, threads, rounds, repeats) -> dict[str, float]:
    """Median ms per batch of each (model, optimizations), all taking turns round by round."""
    cfgs = {"default": [], "slow fusions off": SLOW_FUSIONS}
    sessions = {(m, c): session(p, threads, d) for m, p in paths.items() for c, d in cfgs.items()}
    ms: dict = {k: [] for k in sessions}
    for r in range(rounds):
        for k in list(sessions) if r % 2 == 0 else list(sessions)[::-1]:
            s = sessions[k]
            feed = {s.get_inputs()[0].name: x}
            for _ in range(3):
                s.run(None, feed)
            t0 = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feed)
            ms[k].append((time.perf_counter() - t0) / repeats * 1e3)
    return {f"{m} / {c}": statistics.median(v) for (m, c), v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", nargs="+", default=["4-18-1-12-1-9-1-1"])
    ap.add_argument("--no-profile", action="store_true", help="wall times only")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="vit_ort_profile")
    ap.add_argument(
        "--ablate-gemm",
        action="store_true",
        help="also time every model exported with MatMul + Add (export/_gemm.py off), in turns",
    )
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.batch, 1, 28, 28), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archs = [[int(u) for u in units.split("-")] for units in args.units]
        paths, ratios = models(archs, Path(tmp), args.ablate_gemm)
        for threads in args.threads:
            ms = in_turns(paths, x, threads, args.rounds, args.repeats)
            row: dict = {"threads": threads, "ms": ms, "flops_reduction": ratios}
            for name, flops in ratios.items():
                for c in ("default", "slow fusions off"):
                    dense = "dense" + (MATMUL if name.endswith(MATMUL) else "")
                    speed = ms[f"{dense} / {c}"] / ms[f"{name} / {c}"]
                    tag = "" if name == "slim" else f" {name}"
                    row[f"speed-up{tag}, {c}"] = speed
                    row[f"speed-up / FLOPs reduction{tag}, {c}"] = speed / flops
            row["ops"] = {} if args.no_profile else {
                f"{m} / {c}": by_op(p, x, threads, d)
                for m, p in paths.items()
                for c, d in (("default", []), ("slow fusions off", SLOW_FUSIONS))
            }  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ops"}, indent=1), flush=True)
            for k, ops in row["ops"].items():
                top = ", ".join(
                    f"{op} {v['us']:.0f} ({v['nodes']})" for op, v in list(ops.items())[:8]
                )
                print(f"  {k}: {top}")
    print(save(args.out, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
