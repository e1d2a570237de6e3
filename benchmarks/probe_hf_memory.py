"""Probe: memory a gated Hugging Face decoder keeps for its backward pass, against the same model
without gates: the bytes of the distinct storages autograd's saved-tensor hooks see in one forward
pass, plus what the gates keep outside them (``compressdrop.gates._mul.kept_tensors``). Two
decoders of BENCHMARKS §10's size, log-normal gates on heads and MLP neurons, random weights,
batch 32 of 128 tokens. ``--pairs N`` also times a training step (forward, next-token cross-entropy
plus KL/N, backward, Adam) of the plain, the gated and the gated net with the hand-offs off, in
turns on the same batch after two warm-up rounds, and gives the median ratios to plain.

Run: python benchmarks/probe_hf_memory.py [--pairs 10] [--out NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import torch

import compressdrop as cd
from compressdrop.gates._mul import kept_tensors

from common import save


def kept_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes kept for the backward pass of one forward pass of ``model`` on ``ids`` (also the
    torchvision probe's: an output with ``.logits``, a Hugging Face or Inception one, or a
    tensor)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    for t in kept_tensors(getattr(out, "logits", out)):
        pack(t)
    return sum(seen.values())


def step_time(model: torch.nn.Module, ids: torch.Tensor, off: bool = False) -> float:
    """Seconds of one training step of ``model`` on ``ids`` (with ``off``: hand-offs off)."""
    opt = model.__dict__.setdefault("_probe_opt", torch.optim.Adam(model.parameters(), lr=1e-4))
    t0 = time.perf_counter()
    with cd.gates.hand_overs_off() if off else contextlib.nullcontext():
        logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        if cd.is_gated(model):
            loss = loss + cd.kl(model) / 1_500_000
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=0, help="also time N rounds of training steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cd.import_torchvision()  # transformers imports it
    import transformers

    common = {"vocab_size": 256, "bos_token_id": None, "eos_token_id": None}
    models = {
        "gpt2 (3 layers, width 96, 4 heads, MLP 384)": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_positions=128, n_embd=96, n_layer=3, n_head=4, **common)
        ),
        "llama (3 layers, width 96, 4 heads, 2 kv, MLP 256)": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=256, max_position_embeddings=128, **common,
            )
        ),
    }  # fmt: skip
    rows = []
    for name, plain in models.items():
        torch.manual_seed(0)
        ids = torch.randint(256, (32, 128))
        gated = copy.deepcopy(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream
            cd.attach(gated, "lognormal", example_inputs=ids[:2])
        row: dict = {"model": name}
        for label, model in (("plain", plain), ("gated", gated)):
            torch.manual_seed(1)
            row[f"{label} MB"] = kept_bytes(model.train(), ids) / 2**20
        with cd.gates.hand_overs_off():
            torch.manual_seed(1)
            row["gated, hand-offs off, MB"] = kept_bytes(gated, ids) / 2**20
        row["gated/plain"] = row["gated MB"] / row["plain MB"]
        row["hand-offs off/plain"] = row["gated, hand-offs off, MB"] / row["plain MB"]
        if args.pairs:
            times: dict[str, list[float]] = {"plain": [], "gated": [], "off": []}
            for i in range(args.pairs + 2):  # two warm-up rounds
                t = {"plain": step_time(plain, ids), "gated": step_time(gated, ids),
                     "off": step_time(gated, ids, off=True)}  # fmt: skip
                for k, v in t.items():
                    if i >= 2:
                        times[k].append(v)
            row["plain step s"] = statistics.median(times["plain"])
            for k in ("gated", "off"):
                pairs = zip(times[k], times["plain"], strict=True)
                row[f"step {k}/plain"] = statistics.median(a / b for a, b in pairs)
        rows.append(row)
        print(row, flush=True)
    if args.out:
        save(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
