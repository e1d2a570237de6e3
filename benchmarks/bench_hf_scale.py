"""Issue 16 benchmark: attach, prune and export time of Hugging Face decoders on the CPU, against
the number of layers, and the peak memory of attach against the model's own size.

    python benchmarks/bench_hf_scale.py                 # GPT-2-small at 2, 4, 8, 12 layers + 0.5 B
    python benchmarks/bench_hf_scale.py --only gpt2-12  # one configuration

Each configuration runs in its own process: build the model (random weights, float32), attach
log-normal gates (example: 1 sequence of 32 tokens), spread the SNRs at random and prune at the
median (heads and MLP neurons), export the slim model to ONNX and check it in onnxruntime at two
sequence lengths (GPT-2 only, unless BENCH_EXPORT_ALL=1: the 0.5 B model's file is 1.3 GB).
Peak memory: the process's peak resident set during attach (Linux VmHWM, reset after the build)
minus its resident set before the model was built, over the model's parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import save

GPT2 = {"n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
# Qwen2-0.5B's shape as a LLaMA decoder: 24 layers of 896, 14 query and 2 key/value heads
LLAMA = {
    "hidden_size": 896,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "vocab_size": 151936,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
CONFIGS = {
    **{
        f"gpt2-{n}": ("GPT2Config", "GPT2LMHeadModel", {**GPT2, "n_layer": n})
        for n in (2, 4, 8, 12)
    },
    "llama-0.5b": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(name: str) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torchvision_models import import_torchvision

    import_torchvision()  # the CUDA torchvision build transformers imports
    import torch
    import transformers

    import compressdrop as cd
    from compressdrop.export import export_onnx

    torch.set_num_threads(2)
    config_cls, model_cls, sizes = CONFIGS[name]
    rss0 = _rss_kb("VmRSS")
    torch.manual_seed(0)
    t = time.perf_counter()
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes)).eval()
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    ids = torch.randint(0, sizes["vocab_size"], (1, 32))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cd.attach(model, "lognormal", example_inputs=ids)
    attach_s = time.perf_counter() - t
    peak_kb = _rss_kb("VmHWM")
    gates = list(cd.named_gates(model))
    with torch.no_grad():
        for _, g in gates:
            g.log_sigma.uniform_(-3, 1)
    thr = float(torch.cat([g.snr().detach() for _, g in gates]).median())
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = cd.prune(model, thr, example_inputs=ids)
    prune_s = time.perf_counter() - t
    out: dict[str, Any] = {
        "name": name,
        "params": params,
        "params_slim": sum(p.numel() for p in slim.parameters()),
        "gates": len(gates),
        "heads_gated": sum(1 for n, _ in gates if "attn" in n),
        "build_s": round(build_s, 2),
        "attach_s": round(attach_s, 2),
        "prune_s": round(prune_s, 2),
        "prune_max_rel_error": slim.prune_report.max_rel_error,
        "model_mb": round(model_bytes / 2**20, 1),
        "attach_peak_over_model": round((peak_kb - rss0) * 1024 / model_bytes, 3),
        "rss_before_build_mb": round(rss0 / 1024, 1),
        "attach_peak_mb": round(peak_kb / 1024, 1),
    }
    if name.startswith("gpt2") or os.environ.get("BENCH_EXPORT_ALL"):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            rep = export_onnx(
                slim,
                ids,
                Path(tmp) / "slim.onnx",
                check_batch_sizes=(1,),
                check_lengths=(16, 48),
                providers="cpu",
            )
            out["export_s"] = round(time.perf_counter() - t, 2)
            out["export_peak_mb"] = round(_rss_kb("VmHWM") / 1024, 1)
            out["onnx_max_rel_error"] = max(rep.max_rel_error.values())
            out["onnx_mb"] = round(rep.bytes / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--child")
    ap.add_argument("--out", default="hf_scale", help="results/OUT.json")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    rows = []
    t0 = time.perf_counter()
    for name in args.only or list(CONFIGS):
        res = subprocess.run(
            [sys.executable, __file__, "--child", name],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"name": name, "error": res.stderr[-1500:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(args.out, {"rows": rows, "total_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
