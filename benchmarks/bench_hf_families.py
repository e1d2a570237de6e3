"""Survey compressdrop on every Hugging Face transformers family that builds from a small config:
attach log-normal gates, spread their SNRs at random, prune at the median, and check the slim
model against the masked one (logits; greedy ``generate`` for decoders), the parameters removed,
and ``export_onnx`` checked in onnxruntime.

Each family runs in a child process (one at a time, with a timeout) that writes its results step
by step to a JSON file, so a crash leaves the steps it passed and the one that failed. The summary
goes to ``benchmarks/results/hf_families.json`` (a family's row replaces its earlier one, the
other rows stay) and a markdown table to stdout.

usage: python benchmarks/bench_hf_families.py [--only opt,phi3] [--timeout 180]
       python benchmarks/bench_hf_families.py --child NAME --json PATH   (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_families.json")
VOCAB = 64
TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# 2 layers of width 32, 4 heads (2 key/value heads where the family has grouped-query attention)
LLAMA = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
PLAIN = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
GPT = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
ENC = {**PLAIN, "num_labels": 3}
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
# family -> (config class, model class, config fields); "ForCausalLM"/"LMHead" classes are decoders
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA, "head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**LLAMA, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA, "head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**LLAMA, "head_dim": 8, "sliding_window": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT),
    "opt": ("OPTConfig", "OPTForCausalLM", {"hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "ffn_dim": 48, "max_position_embeddings": 64,
            "word_embed_proj_dim": 32}),
    "phi": ("PhiConfig", "PhiForCausalLM", {**LLAMA, "num_key_value_heads": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**LLAMA, "pad_token_id": 0}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4}),
    "falcon_new": ("FalconConfig", "FalconForCausalLM", {"hidden_size": 32,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
                   "new_decoder_architecture": True}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", PLAIN),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**GPT, "rotary_dim": 4}),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", {"hidden_size": 32, "num_layers": 2,
                "num_heads": 4, "attention_types": [[["global", "local"], 1]],
                "max_position_embeddings": 64, "window_size": 4}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {**GPT, "rotary_dim": 4, "n_ctx": 64}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA),
    "cohere": ("CohereConfig", "CohereForCausalLM", LLAMA),
    "granite": ("GraniteConfig", "GraniteForCausalLM", LLAMA),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", LLAMA),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", PLAIN),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA, **MOE}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**LLAMA, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 48}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**LLAMA, "num_experts": 4,
              "num_experts_per_tok": 2}),
    # GLM and GLM-4: an explicit head_dim (its default is 128), a packed gate_up_proj
    "glm": ("GlmConfig", "GlmForCausalLM", {**LLAMA, "head_dim": 8}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {**LLAMA, "head_dim": 8}),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", {"d_model": 32, "num_layers": 2,
             "attention_heads": 4, "ffn_dim": 48, "max_position_embeddings": 64}),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", PLAIN),
    "bert": ("BertConfig", "BertForSequenceClassification", ENC),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", ENC),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**ENC, "embedding_size": 16}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", {"dim": 32,
                   "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "max_position_embeddings": 64,
                   "num_labels": 3}),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", {**ENC, "embedding_size": 16}),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", ENC),
    # DeBERTa-v3's settings (relative positions, p2c and c2p, shared position keys)
    "deberta_v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {**ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                    "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True}),
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", ENC),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", ENC),
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", ENC),
    "megatron_bert": ("MegatronBertConfig", "MegatronBertForSequenceClassification", ENC),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", {**ENC,
                   "global_attn_every_n_layers": 1}),
    "t5": ("T5Config", "T5ForSequenceClassification", {"d_model": 32, "d_kv": 8, "d_ff": 48,
           "num_layers": 2, "num_heads": 4, "num_labels": 3, "decoder_start_token_id": 0}),
    "bart": ("BartConfig", "BartForSequenceClassification", {"d_model": 32, "encoder_layers": 2,
             "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "max_position_embeddings": 64,
             "num_labels": 3}),
}  # fmt: skip


def is_decoder(model_cls: str) -> bool:
    return "CausalLM" in model_cls or "LMHead" in model_cls


def short_exc(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


class Recorder:
    """A JSON file written anew after every step (what a crash leaves is what passed)."""

    def __init__(self, path: str, base: dict) -> None:
        self.path, self.data = path, base
        self.flush()

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def flush(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def _padded_batch(torch):
    """Two prompts of 5 and 8 tokens, left-padded, with their attention mask."""
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    ids[:, -1] = 2  # end of sequence
    return ids, mask


def child(name: str, json_path: str) -> None:
    t0 = time.perf_counter()
    import compressdrop as cd

    cd.import_torchvision()  # transformers imports torchvision when it is installed
    import torch
    import transformers

    config_cls, model_cls, sizes = FAMILIES[name]
    rec = Recorder(json_path, {"family": name, "class": model_cls, "step": "build"})
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TOKENS, **sizes})
    model = getattr(transformers, model_cls)(config).eval()
    check(model, is_decoder(model_cls), rec, t0)


def check(model, decoder: bool, rec: Recorder, t0: float) -> None:
    """Attach, prune, compare slim and masked (and their greedy generations), export ONNX:
    each step's results into ``rec`` as it passes."""
    import warnings

    import torch

    import compressdrop as cd
    from compressdrop.gating.gated import HeadGated

    dense = sum(p.numel() for p in model.parameters())
    rec.set(params_dense=dense, step="attach")
    ids = torch.randint(3, VOCAB, (2, 8))
    ids[:, -1] = 2  # an end-of-sequence token: T5's and BART's classifiers read its state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cd.attach(model, "lognormal", example_inputs=ids)
    gates = list(cd.named_gates(model))
    heads = [n for n, m in model.named_modules() if isinstance(m, HeadGated)]
    # neuron gates inside a layer (a per-layer index in the path) that are not head gates
    inner = [n for n, _ in gates if re.search(r"\.\d+\.", n) and n not in heads]
    rec.set(
        gates=[n for n, _ in gates],
        heads_gated=bool(heads),
        mlp_gated=bool(inner),
        attach_warnings=sorted({str(w.message).splitlines()[0][:200] for w in caught}),
        step="prune",
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for _, g in gates:
            for p in g.parameters():
                p.add_(torch.empty_like(p).uniform_(-2, 2))
    thr = float(torch.cat([g.snr().detach() for _, g in gates]).median())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = cd.prune(model, thr, example_inputs=ids)
    rec.set(
        params_slim=sum(p.numel() for p in slim.parameters()),
        prune_warnings=sorted({str(w.message).splitlines()[0][:200] for w in caught}),
        step="masked",
    )
    cd.mask_(model, thr)
    ids2, mask = _padded_batch(torch)
    with torch.no_grad():
        got = slim(input_ids=ids2, attention_mask=mask).logits
        want = model(input_ids=ids2, attention_mask=mask).logits
    keep = mask.bool() if decoder else torch.ones(got.shape[0], dtype=torch.bool)
    rel = float((got - want)[keep].abs().max() / want[keep].abs().max())
    rec.set(slim_vs_masked=rel, exact=rel <= 1e-5, step="generate" if decoder else "onnx")
    if decoder:
        kw = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False}
        kw |= {"pad_token_id": 0, "use_cache": True}
        rec.set(
            generate_equal=bool(torch.equal(slim.generate(ids2, **kw), model.generate(ids2, **kw)))
        )
        rec.set(step="onnx")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cd.ExportWarning)
        rep = cd.export_onnx(slim, ids, os.path.join(tmp, "slim.onnx"), check_batch_sizes=(1, 3),
                             check_lengths=(5, 13))  # fmt: skip
    said = sorted(
        {str(w.message)[:300] for w in caught if issubclass(w.category, cd.ExportWarning)}
    )
    rec.set(onnx_ok=True, onnx_error=max(rep.max_rel_error.values()), step="done")
    rec.set(onnx_warnings=said, onnx_input_dims=rep.metadata.get("input_dims"))
    rec.set(seconds=round(time.perf_counter() - t0, 1))


def run_one(name: str, timeout: float, script: str = __file__) -> dict:
    """One family in a child process (``script --child NAME --json PATH``); what it recorded,
    plus the failing step's error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.json")
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(script), "--child", name, "--json", path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            err = proc.stderr if proc.returncode else ""
        except subprocess.TimeoutExpired:
            err = f"timeout after {timeout:.0f} s"
        data = {"family": name, "step": "start"}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        data.setdefault("seconds", round(time.perf_counter() - t0, 1))
        if data.get("step") != "done":
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            # the exception's own line: the last line of the traceback
            data.setdefault("error", lines[-1][:300] if lines else "no output")
            data["failed_step"] = data.get("step")
        return data


def passed(r: dict) -> bool:
    """Every step ran, surgery was exact, generation agreed, and both kinds of unit got gates."""
    return (
        r.get("step") == "done"
        and bool(r.get("exact"))
        and r.get("generate_equal") is not False
        and bool(r.get("heads_gated"))
        and bool(r.get("mlp_gated"))
    )


def _mark(v) -> str:
    return "–" if v is None else ("y" if v else "**n**")


def table(rows: list[dict]) -> str:
    head = "| family | class | heads gated | MLP gated | params dense→slim | slim=masked | generate = | ONNX ok | time (s) | failed step: error |"
    out = [head, "|" + "---|" * 10]
    for r in rows:
        params = (
            f"{r.get('params_dense', '?'):,}→{r['params_slim']:,}" if "params_slim" in r else "–"
        )
        err = r.get("slim_vs_masked")
        err_s = "–" if err is None else f"{err:.1e}" + ("" if err <= 1e-5 else " **n**")
        fail = f"{r['failed_step']}: {r['error']}" if r.get("failed_step") else ""
        fail = re.sub(r"\x1b\[[0-9;]*m", "", fail)  # the exporter's colours
        gen = r.get("generate_equal")
        out.append(
            f"| {r['family']} | {r.get('class', '?')} | {_mark(r.get('heads_gated'))} | "
            f"{_mark(r.get('mlp_gated'))} | {params} | {err_s} | {_mark(gen)} | "
            f"{_mark(r.get('onnx_ok'))} | {r.get('seconds', '?')} | {fail.replace('|', '/')} |"
        )
    return "\n".join(out)


def merged(path: str, rows: list[dict]) -> list[dict]:
    """The rows already in ``path`` with this run's in place of those of the same family, and
    this run's new families after them: a run of some families (``--only``) keeps the others'
    rows, and those ``survey_hf_causal_lm.py`` added."""
    try:
        with open(path) as f:
            earlier = json.load(f).get("families", [])
    except (OSError, ValueError, AttributeError):
        earlier = []
    ours = {r.get("family"): r for r in rows}
    out = [ours.pop(r.get("family"), r) for r in earlier]
    return out + [r for r in rows if r.get("family") in ours]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated family names")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--child")
    ap.add_argument("--json")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.child:
        try:
            child(args.child, args.json)
        except BaseException as e:  # the failing step's error, in the child's own record
            with open(args.json) as f:
                data = json.load(f)
            Recorder(args.json, {**data, "error": short_exc(e)})
            raise
        return
    names = args.only.split(",") if args.only else list(FAMILIES)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_one(name, args.timeout))
        print(f"{name}: {rows[-1].get('failed_step') or 'ok'} ({rows[-1].get('seconds')} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    wall = round(time.perf_counter() - t0, 1)
    from importlib.metadata import version

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"torch": version("torch"), "transformers": version("transformers"), "wall_s": wall}
    kept = merged(args.out, rows)
    if len(kept) > len(rows):  # (a rerun of some families, or the survey's rows beside them)
        meta["rows_of_earlier_runs"] = len(kept) - len(rows)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "families": kept}, f, indent=1, default=str)
        f.write("\n")
    print(table(rows))
    print(f"\n{sum(passed(r) for r in rows)}/{len(rows)} families pass every check; "
          f"wall {wall} s")  # fmt: skip


if __name__ == "__main__":
    main()
