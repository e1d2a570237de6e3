"""Survey compressdrop on every model type of transformers' causal-LM mapping
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), each built from its own config class at small sizes
(width 32, 2 layers, 4 heads, 2 key/value heads, MLP width 48, vocabulary 64: whatever fields
the config names them by), with the checks of ``bench_hf_families.py``: attach log-normal gates,
prune at the median SNR, slim against masked logits, greedy ``generate`` with the cache, ONNX.

A model type is skipped, with the reason, where its config is an encoder-decoder's or holds
sub-configs (a multimodal model), or where the model needs a package that is not installed.
Each type runs in a child process forked from the survey's (one at a time, with a timeout); the results go to
``benchmarks/results/hf_causal_lm_survey.json`` (``--only`` merges its types into that file).

``--task sequence-classification`` surveys the sequence-classification mapping instead
(``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``: the encoders, BERT's kin, and decoders
with a classifier head), 3 labels, the slim logits against the masked ones (no ``generate``);
its results go to ``benchmarks/results/hf_seq_cls_survey.json``.

usage: python benchmarks/survey_hf_causal_lm.py [--only glm4_moe,jamba] [--timeout 120]
       python benchmarks/survey_hf_causal_lm.py --task sequence-classification [--only ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hf_families import TOKENS, Recorder, check, passed, short_exc

RESULTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "hf_causal_lm_survey.json"
)
# task -> (transformers' auto mapping of its model classes, its results file)
TASKS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", RESULTS),
    "sequence-classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        RESULTS.replace("hf_causal_lm_survey", "hf_seq_cls_survey"),
    ),
}
TASK = "causal-lm"  # (main sets it; the forked children inherit it)
# each size under the names configs give it; a field is set only where the config has it
SIZES: dict[int | None, tuple[str, ...]] = {
    32: ("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "dim", "model_dim"),
    2: ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
        "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
        "num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_k", "expand", "mamba_expand",
        "attn_layer_period", "expert_layer_period", "o_groups", "indexer_n_heads"),
    4: ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads",
        "decoder_attention_heads", "num_local_experts", "num_experts", "n_routed_experts",
        "moe_num_experts", "rotary_dim", "qk_rope_head_dim", "qk_nope_head_dim",
        "conv_kernel", "mamba_d_conv", "linear_num_heads", "indexer_compress_ratio"),
    48: ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "hidden_dim", "d_ff",
         "shared_intermediate_size",
         "decoder_ffn_dim", "shared_expert_intermediate_size", "intermediate_size_mlp"),
    24: ("moe_intermediate_size", "expert_intermediate_size"),
    8: ("head_dim", "v_head_dim", "state_size", "mamba_d_state", "ssm_state_size",
        "mamba_d_head", "mamba_head_dim", "time_step_rank", "mamba_dt_rank", "mamba_n_heads",
        "linear_head_dim", "qk_head_dim", "indexer_head_dim"),
    16: ("kv_lora_rank", "q_lora_rank", "sliding_window", "attention_chunk_size",
         "hidden_size_per_layer_input", "laurel_rank", "o_lora_rank", "indexer_budget"),
    64: ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "mamba_d_ssm",
         "vocab_size_per_layer_input"),
    1: ("n_shared_experts", "num_shared_experts", "first_k_dense_replace", "n_group",
        "num_expert_group",
        "topk_group", "num_nextn_predict_layers", "mamba_n_groups", "n_groups",
        "attn_layer_offset", "expert_layer_offset", "indexer_kv_heads"),
}  # fmt: skip


# fields set even where their default is None (elsewhere None means "off": no sliding window);
# Qwen4-Exp's attention layers all need its token indexer's (its attention_type "indexed")
NEEDED = {"head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
          "num_local_experts", "num_experts", "indexer_n_heads", "indexer_kv_heads",
          "indexer_head_dim", "indexer_budget", "indexer_compress_ratio"}  # fmt: skip


def sizes_for(defaults: dict[str, Any]) -> dict[str, Any]:
    """The small sizes under the fields this config has (a field left ``None`` stays so)."""
    out: dict[str, Any] = {}
    for value, fields in SIZES.items():
        for f in fields:
            if f in defaults and (defaults[f] is not None or f in NEEDED):
                out[f] = value
    if "kv_lora_rank" in out:  # multi-latent attention: a key and value per query head
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
        if "head_dim" in out:  # (its rotary part)
            out["head_dim"] = out.get("qk_rope_head_dim", 4)
    return out


def model_types() -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    return dict(sorted(getattr(modeling_auto, TASKS[TASK][0]).items()))


def build(model_type: str, rec: Recorder) -> Any:
    """The model of ``model_type`` at small sizes; ``None`` (with ``skipped`` recorded) where it
    is out of the survey's scope."""
    import importlib.util

    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_name = CONFIG_MAPPING_NAMES[model_type]
    model_name = model_types()[model_type]
    rec.set(config=config_name)
    config_cls = getattr(transformers, config_name)
    defaults = config_cls().to_dict()
    if defaults.get("is_encoder_decoder"):
        rec.set(skipped="encoder-decoder")
        return None
    parts = set(getattr(config_cls, "sub_configs", None) or ())
    if parts - {"attn_config", "ffn_config"}:  # (DBRX's two are its own layers' settings)
        rec.set(skipped=f"multimodal or of several models (sub-configs {sorted(parts)})")
        return None
    kw = {**sizes_for(defaults), **{k: v for k, v in TOKENS.items() if k in defaults}}
    if TASK == "sequence-classification":
        kw["num_labels"] = 3
        kw["pad_token_id"] = 0  # (a decoder's classifier reads the last token that is not one)
    if "layer_types" in defaults:  # derived from the layer count when not given
        kw["layer_types"] = None
    if "attention_types" in defaults:  # GPT-Neo's, one entry per layer
        kw["attention_types"] = [[["global", "local"], 1]]
    if "attn_layer_indices" in defaults:  # a hybrid's attention layers (Bamba's): the second
        kw["attn_layer_indices"] = [1]
    if defaults.get("languages") and "default_language" in defaults:  # X-MOD's adapters
        kw["default_language"] = defaults["languages"][0]
    if "qk_dim_factor" in defaults:  # xLSTM: its config rounds the q/k and v widths up to a
        kw["qk_dim_factor"] = kw["v_dim_factor"] = 2.0  # multiple of 64 (its cache's), its
        # layers do not (width · factor): at width 32 they agree at 64 alone
    if "block_types" in defaults:  # RecurrentGemma's pattern, repeated: (recurrent, recurrent,
        kw["block_types"] = ["recurrent", "attention"]  # attention) left 2 layers none
    rec.set(sizes=kw)
    torch.manual_seed(0)
    try:
        config = config_cls(**kw)
        kinds = set(defaults.get("layer_types") or [])
        other = sorted(kinds - {"full_attention", "sliding_attention"})
        if other and "full_attention" in kinds and "full_attention" not in config.layer_types:
            # a hybrid whose attention layers the 2-layer pattern left out (Kimi-Linear's)
            kw["layer_types"] = [other[0], "full_attention"]
            config = config_cls(**kw)
        elif kw.get("layer_types", 0) is None and set(config.layer_types) == {"linear_attention"}:
            # a hybrid whose attention layers the 2-layer pattern (Qwen4-Exp's: one in 4) or the
            # default (GraniteMoeHybrid's: all Mamba) left out; none runs in transformers
            attention = sorted(kinds - {"linear_attention"}) or ["full_attention"]
            kw["layer_types"] = ["linear_attention", attention[0]]
            config = config_cls(**kw)
        rec.set(sizes=kw)
        model = getattr(transformers, model_name)(config).eval()
    except ImportError as e:  # a package the model needs
        missing = [p for p in ("mamba_ssm", "causal_conv1d", "xlstm") if p in str(e)]
        if missing or "pip install" in str(e):
            rec.set(skipped=f"needs a package: {short_exc(e)}")
            return None
        raise
    for p in ("mamba_ssm", "causal_conv1d", "fla"):
        if importlib.util.find_spec(p) is not None:  # (the slow paths are what runs here)
            rec.set(note=f"{p} installed")
    return model


def child(model_type: str, json_path: str) -> None:
    t0 = time.perf_counter()
    import compressdrop as cd

    cd.import_torchvision()  # transformers imports torchvision when it is installed
    model_name = model_types()[model_type]
    rec = Recorder(json_path, {"family": model_type, "class": model_name, "step": "build"})
    model = build(model_type, rec)
    if model is None:
        rec.set(step="skipped", seconds=round(time.perf_counter() - t0, 1))
        return
    check(model, TASK == "causal-lm", rec, t0)


def classify(r: dict) -> str:
    """One word for a survey row: skipped, build, passed, or the first check it failed."""
    if r.get("skipped"):
        return "skipped"
    if r.get("failed_step") in ("start", "build"):
        return "build failed"
    if passed(r):
        return "passed"
    if r.get("failed_step"):
        return f"failed at {r['failed_step']}"
    if not r.get("exact"):
        return "slim != masked"
    if r.get("generate_equal") is False:
        return "generate differs"
    return "heads ungated" if not r.get("heads_gated") else "MLP ungated"


def _forked(model_type: str, json_path: str, log_path: str) -> None:
    """The child's body: its output to ``log_path``, the failing step's error to its record."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        child(model_type, json_path)
    except BaseException as e:
        data = {"family": model_type, "step": "start"}
        if os.path.exists(json_path):
            with open(json_path) as f:
                data = json.load(f)
        Recorder(json_path, {**data, "error": short_exc(e)})
        raise


def run_forked(model_type: str, timeout: float) -> dict:
    """One model type in a child forked from this process (torch, transformers and compressdrop
    imported once, here: a fresh interpreter took longer to import them than most types take to
    run), killed after ``timeout`` seconds; what it recorded, plus the failing step's error."""
    import multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path, log = os.path.join(tmp, "row.json"), os.path.join(tmp, "log.txt")
        t0 = time.perf_counter()
        proc = mp.get_context("fork").Process(target=_forked, args=(model_type, path, log))
        proc.start()
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        data = {"family": model_type, "step": "start"}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        data.setdefault("seconds", round(time.perf_counter() - t0, 1))
        if data.get("step") not in ("done", "skipped"):
            with open(log, errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            last = lines[-1][:300] if lines else f"exit code {proc.exitcode}"
            data.setdefault("error", f"timeout after {timeout:.0f} s" if timed_out else last)
            data["failed_step"] = data.get("step")
        return data


def _write(path: str, rows: dict[str, dict], wall: float) -> None:
    from importlib.metadata import version

    counts: dict[str, int] = {}
    for r in rows.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    meta = {
        "torch": version("torch"),
        "transformers": version("transformers"),
        "wall_s_last_run": round(wall, 1),
        "model_types": len(rows),
        "outcomes": dict(sorted(counts.items())),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "types": [rows[k] for k in sorted(rows)]}, f, indent=1)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model types")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--task", choices=sorted(TASKS), default="causal-lm")
    ap.add_argument("--out", default=None, help="default: the task's results file")
    args = ap.parse_args()
    global TASK
    TASK = args.task
    args.out = args.out or TASKS[TASK][1]
    import compressdrop as cd

    cd.import_torchvision()
    import torch  # noqa: F401  (imported once, for every child)
    import transformers  # noqa: F401

    names = args.only.split(",") if args.only else list(model_types())
    rows: dict[str, dict] = {}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            rows = {r["family"]: r for r in json.load(f)["types"]}
    t0 = time.perf_counter()
    for name in names:
        rows[name] = run_forked(name, args.timeout)
        rows[name]["outcome"] = classify(rows[name])
        print(f"{name}: {rows[name]['outcome']} ({rows[name].get('seconds')} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        _write(args.out, rows, time.perf_counter() - t0)  # (what ran so far survives a stop)
    with open(args.out) as f:
        print(json.dumps(json.load(f)["meta"], indent=1))


if __name__ == "__main__":
    main()
