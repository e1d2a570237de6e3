"""Probe: the peak memory of the CLI's jobs against the bytes of the model they load, the numbers
behind the factors of ``compressdrop/workflows/memory.py`` (BENCHMARKS.md §12).

Each job runs as its own process, which reports its peak resident set (``VmHWM`` of
``/proc/self/status``) as it exits. Models, random weights: a LLaMA-style
decoder (Hugging Face folder, safetensors) at two widths, the wider one also saved in bfloat16,
and torchvision's ResNet-18 and ResNet-152 as state dicts (``--arch``). The factor of a job is
the slope between two sizes of one family: (peak − peak of the smaller) / (float32 weights −
the smaller's), which leaves out what every run holds whatever the model (torch, transformers,
the data). ``estimate / growth`` checks the factors as the memory check uses them: its estimate
for the run over what the run took beyond its resident set at the check (already counted in the
memory available); below 1, a machine without that much would truly not have run it.

Run: python benchmarks/probe_model_memory.py [--only NAMES] [--jobs JOBS] [--out NAME]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from compressdrop.workflows._weights import weights_of
from compressdrop.workflows.memory import FACTORS

from common import markdown_table, save

#: a short sparsify run: the memory of training is there from its first step
RECIPE = """
data: {batch_size: 8}
stages:
  pretrain: {epochs: 0}
  sparsify: {epochs: 1}
  finetune: {epochs: 0}
"""


#: the memory check's job for each job run here
JOB_KEYS = {
    "eval": "eval",
    "export onnx": "export onnx",
    "prune (sparsify)": "sparsify",
    "prune (gated)": "prune",
}


def llama(folder: Path, width: int, layers: int, dtype: torch.dtype) -> int:
    """A random LLaMA-style decoder saved with ``save_pretrained``; its float32 bytes."""
    from compressdrop._torchvision import import_torchvision

    import_torchvision()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=width * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return 4 * sum(p.numel() for p in model.parameters())


def resnet(path: Path, name: str) -> int:
    """torchvision's ``name`` (10 classes, random weights) as a state dict; its float32 bytes."""
    from compressdrop._torchvision import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=10)
    torch.save(model.state_dict(), path)
    return 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def make_gated(src: Path, out: Path, is_lm: bool) -> None:
    """The model at ``src`` with log-normal gates attached (untrained), as a checkpoint."""
    import compressdrop as cd

    arch = {"arch": f"torchvision.models:{src.stem}", "arch_kwargs": {"num_classes": 10}}
    arch["input_shape"] = (3, 32, 32)
    model = cd.load_model(src, **({} if is_lm else arch))
    x = torch.randint(0, 256, (2, 32)) if is_lm else torch.randn(2, 3, 32, 32)
    cd.attach(model, example_inputs=x)
    cd.save_model(model, out)


#: the command, reporting its own peak (VmHWM, at exit) and its resident set when the memory
#: check first asks what is available (VmRSS: the memory check's baseline, already taken) into
#: the file $PROBE_HWM; a child's ``ru_maxrss`` would start from its parent's resident set at
#: the fork, which exec keeps
CHILD = """
import atexit, os, sys
from compressdrop.data import dataset
def status(key):
    return [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key)][0]
at_check = []
ask = dataset.available_memory
def asked():
    at_check.append(at_check[0] if at_check else status("VmRSS:"))
    return ask()
dataset.available_memory = asked
def hwm():
    open(os.environ["PROBE_HWM"], "w").write(f"{status('VmHWM:')} {at_check[0]}")
atexit.register(hwm)
from compressdrop.cli import main
sys.argv[0] = "compressdrop"
main()
"""


def peak(args: list[str], tmp: Path) -> tuple[int, int]:
    """Peak resident bytes of ``compressdrop ARGS`` in a process of its own (it must succeed),
    and its resident bytes at the memory check."""
    report = tmp / "hwm"
    env = {**os.environ, "PROBE_HWM": str(report)}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: compressdrop {' '.join(args)}\n{proc.stderr.decode()[-2000:]}")
    hwm, at_check = report.read_text().split()
    return int(hwm) * 1024, int(at_check) * 1024


#: the pairs of one family whose slopes give the factors
PAIRS = [("llama-256", "llama-1024"), ("llama-256", "llama-1024-bf16"), ("resnet18", "resnet152")]


def slopes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each pair's slope per job: (peak − the smaller's peak) / (float32 weights − the
    smaller's)."""
    by = {r["model"]: r for r in rows}
    found = {}
    for small, big in PAIRS:
        if small in by and big in by:
            dw = by[big]["float32 MB"] - by[small]["float32 MB"]
            found[f"{small} → {big}"] = {
                job: (by[big][f"{job} peak MB"] - by[small][f"{job} peak MB"]) / dw
                for job in JOB_KEYS
                if f"{job} peak MB" in by[big] and f"{job} peak MB" in by[small]
            }
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="models to run, comma-separated (default: all)")
    ap.add_argument("--jobs", default=None, help="jobs to run, comma-separated (default: all)")
    ap.add_argument("--out", default="model_memory")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="probe-memory-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(120)))
    text = f"text:{corpus},context=32"
    rng = np.random.default_rng(0)
    npz = tmp / "images.npz"
    np.savez(npz, x=rng.random((96, 3, 32, 32), dtype=np.float32), y=np.arange(96) % 10)
    recipe = tmp / "short.yaml"
    recipe.write_text(RECIPE)
    models = {
        "llama-256": lambda p: llama(p, 256, 4, torch.float32),
        "llama-1024": lambda p: llama(p, 1024, 8, torch.float32),
        "llama-1024-bf16": lambda p: llama(p, 1024, 8, torch.bfloat16),
        "resnet18": lambda p: resnet(p, "resnet18"),
        "resnet152": lambda p: resnet(p, "resnet152"),
    }
    rows = []
    for name, make in models.items():
        if a.only and name not in a.only.split(","):
            continue
        is_lm = name.startswith("llama")
        src = tmp / (name if is_lm else f"{name}.pt")
        weights = make(src)
        data = text if is_lm else str(npz)
        arch = (
            []
            if is_lm
            else ["--arch", f"torchvision.models:{name}", "--arch-arg", "num_classes=10"]
        )
        shape = [] if is_lm else ["--input-shape", "3,32,32"]
        on_disk = sum(f.stat().st_size for f in ([*src.iterdir()] if src.is_dir() else [src]))
        row = {"model": name, "float32 MB": weights / 1e6, "files MB": on_disk / 1e6}
        gated = tmp / f"{name}-gated.pt"
        jobs = {
            "eval": ["eval", str(src), "--data", data, *arch],
            "export onnx": ["export", str(src), "-o", str(tmp / "x.onnx"), *arch, *shape],
            "prune (sparsify)": [
                "prune",
                str(src),
                "--data",
                data,
                "--recipe",
                str(recipe),
                "-o",
                str(tmp / "slim.pt"),
                "--device",
                "cpu",
                *arch,
            ],
            "prune (gated)": ["prune", str(gated), "-o", str(tmp / "slim.pt"), *arch],
        }
        for job, args in jobs.items():
            if a.jobs and job not in a.jobs.split(","):
                continue
            if job == "prune (gated)" and name.endswith("bf16"):
                continue  # (did not load back before commit 728f17a; not measured since)
            if job == "prune (gated)":
                make_gated(src, gated, is_lm)
            top, at_check = peak(args, tmp)
            job_key = JOB_KEYS[job]
            w = weights_of(gated if job == "prune (gated)" else src)
            assert w is not None
            need = max(w.loading, int(FACTORS[job_key][0] * w.model))
            row[f"{job} peak MB"] = top / 1e6
            # what the check estimates against what the job took after it
            row[f"{job} estimate / growth"] = need / (top - at_check)
            print(name, job, f"{top / 1e6:.0f} MB", f"{need / (top - at_check):.2f}", flush=True)
        rows.append(row)
    cols = list(rows[0])
    print(markdown_table(rows, cols))
    for pair, found in slopes(rows).items():
        print(pair, ", ".join(f"{job} {v:.2f}" for job, v in found.items()))
    save(a.out, {"rows": rows, "slopes": slopes(rows)})


if __name__ == "__main__":
    main()
