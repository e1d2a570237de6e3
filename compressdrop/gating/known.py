"""What compressdrop knows about the layers of other libraries (Hugging Face transformers;
torchvision's Swin and MaxViT attention, in :mod:`compressdrop.gating.vision`),
registered the first time a model built from that library is gated: GPT-2's ``Conv1D`` as a
producer (:func:`~compressdrop.gating.register_layer`, with an input fold for a gate on its
input), BERT's and GPT-2's attention heads (:func:`~compressdrop.gating.register_attention`;
GPT-2's packed ``c_attn`` is cut per head), and activations written out as formulas that
are traced as the one op they equal.

A model's classes say which library it comes from, so nothing is imported for a model that does
not use one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .._families import BERT_LIKE, MLP_WIDTHS, hf_module
from .experts import experts_widths
from .heads import HeadSpec, register_attention, register_attention_at
from .hf_bigcode import register_bigcode
from .hf_codegen import register_codegen
from .hf_deberta import register_deberta
from .hf_decoders import decoder_shapes, register_decoders
from .hf_falcon import register_falcon
from .hf_interleaved import register_interleaved
from .hf_position_bias import register_position_bias
from .registry import LayerSpec, fold_columns, kept_indices, linear_positions, register_layer

__all__: list[str] = []  # internal to compressdrop.gating

#: how :func:`sync_config` begins its answer for layers pruned to different widths
DIFFERENT_WIDTHS = "the layers keep different widths"

_DONE: set[str] = set()
# modules traced as one equivalent op: a formula written out in Python (GPT-2's tanh GELU, 0.5 · x
# · (1 + tanh(...))) adds a constant on the way, which the path check cannot see is multiplied
# by x again; F.gelu(x, approximate="tanh") is the same function as one op that maps 0 to 0
_TRACE_AS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {}


@contextlib.contextmanager
def traced_as_known(model: nn.Module) -> Iterator[None]:
    """While tracing ``model``'s graph, run known activation modules as their one-op equivalents."""
    swapped = [m for m in model.modules() if type(m) in _TRACE_AS]
    for m in swapped:
        m.forward = _TRACE_AS[type(m)]
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def register_for(model: nn.Module) -> None:
    """Register the head specs of the libraries ``model``'s modules come from (once each)."""
    libraries = {type(m).__module__.split(".")[0] for m in model.modules()}
    if "transformers" in libraries and "transformers" not in _DONE:
        _register_transformers()
        _DONE.add("transformers")
    if "torchvision" in libraries and "torchvision" not in _DONE:
        from .vision import register_torchvision

        register_torchvision()
        _DONE.add("torchvision")


def _conv1d_costs(m: nn.Module, out: bool) -> tuple[float, float]:
    """GPT-2's ``Conv1D`` is a Linear with its weight stored ``(in, out)``: output unit j is
    column j (and bias j), input unit i is row i."""
    n_in, n_out = m.get_parameter("weight").shape
    return (float(n_in + 1), float(n_in)) if out else (float(n_out), float(n_out))


def _fold_conv1d_inputs(m: nn.Module, scale: torch.Tensor) -> None:
    """Scale a ``Conv1D``'s input features: its weight's rows (weight ``(in, out)``)."""
    weight = m.get_parameter("weight")
    weight.mul_(scale.to(weight.dtype).unsqueeze(1))


def _conv1d_pruner() -> Any:
    import torch_pruning as tp

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        """Slices a ``Conv1D``'s ``(in, out)`` weight and its bias, and sets ``nf``/``nx``."""

        def prune_out_channels(self, layer: Any, idxs: list[int]) -> Any:
            keep = kept_indices(layer.weight.shape[1], idxs)
            layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
            layer.bias = nn.Parameter(layer.bias.data[keep].clone())
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: Any, idxs: list[int]) -> Any:
            keep = kept_indices(layer.weight.shape[0], idxs)
            layer.weight = nn.Parameter(layer.weight.data[keep].clone())
            layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[1])

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[0])

    return Conv1DPruner()


def _packed_heads(m: Any) -> int:
    """Heads of a ``[q; k; v]`` projection ``Wqkv`` of ``head_dim`` features each."""
    return int(m.Wqkv.out_features // (3 * m.head_dim))


def _register_transformers() -> None:
    from transformers.activations import FastGELUActivation, NewGELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu

    for act in (NewGELUActivation, FastGELUActivation, BloomGelu):
        _TRACE_AS[act] = lambda x: nn.functional.gelu(x, approximate="tanh")

    # GPT-2's Conv1D: a producer like Linear, weight (in, out)
    from transformers.pytorch_utils import Conv1D

    register_layer(
        Conv1D,
        LayerSpec(
            "producer",
            "neuron",
            -1,
            _conv1d_costs,
            fold_columns,
            output_positions=linear_positions,
            pruner=_conv1d_pruner,
            fold_in=_fold_conv1d_inputs,
        ),
    )
    # GPT-2: one packed Conv1D c_attn ([q; k; v] columns), split by split_size in its forward
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    register_attention(
        GPT2Attention,
        HeadSpec(
            o="c_proj",
            qkv="c_attn",
            heads="num_heads",
            widths=("split_size",),
            why_not=lambda m: (
                "cross-attention (its query is q_attn)"
                if getattr(m, "is_cross_attention", False)
                else None
            ),
        ),
    )
    # LLaMA-style decoders (grouped-query attention) and Phi-3 (packed qkv_proj)
    register_decoders()
    # GPT-NeoX and Persimmon: one query_key_value, each head's q, k and v rows together
    register_interleaved()
    # Falcon: one query_key_value in one of three layouts (gating/hf_falcon.py); GPT-BigCode:
    # one c_attn in one of two (gating/hf_bigcode.py)
    register_falcon()
    register_bigcode()
    # BLOOM and MPNet: a position bias built for all heads, each layer's part selected by its
    # attention (gating/hf_position_bias.py); CodeGen: qkv_proj packed in mp_num blocks
    register_position_bias()
    register_codegen()
    # DistilBERT: separate projections, n_heads read by nothing but the reshape by -1
    register_attention_at(
        hf_module("distilbert"),
        "DistilBertSelfAttention",
        HeadSpec(o="out_lin", q="q_lin", k="k_lin", v="v_lin", heads="n_heads"),
    )
    # ALBERT: BERT's projections in one module (its layers share their weights: a head goes from
    # every pass through them), all_head_size read by nothing but reshapes by -1
    register_attention_at(
        hf_module("albert"),
        "AlbertAttention",
        HeadSpec(
            o="dense", q="query", k="key", v="value", heads="num_attention_heads",
            widths=("all_head_size",),
        ),
    )  # fmt: skip
    # ModernBERT: Wqkv packed [q; k; v], its reshapes by -1 (the head count is the layer's)
    register_attention_at(
        hf_module("modernbert"),
        "ModernBertAttention",
        HeadSpec(o="Wo", qkv="Wqkv", heads=_packed_heads),
    )
    # XLM and FlauBERT: separate projections, their reshapes read n_heads and head_dim; CTRL:
    # reshapes by -1 of head_dim; OpenAI GPT: GPT-2's packed c_attn, split by split_size
    xlm = HeadSpec(o="out_lin", q="q_lin", k="k_lin", v="v_lin", heads="n_heads")
    for family in ("xlm", "flaubert"):
        register_attention_at(hf_module(family), "MultiHeadAttention", xlm)
    register_attention_at(
        hf_module("ctrl"), "MultiHeadAttention", HeadSpec(o="dense", q="Wq", k="Wk", v="Wv")
    )
    register_attention_at(
        hf_module("openai"),
        "Attention",
        HeadSpec(o="c_proj", qkv="c_attn", heads="n_head", widths=("split_size",)),
    )
    # ModernBERT-decoder: separate projections into Wo, reshapes by -1 of head_dim
    register_attention_at(
        hf_module("modernbert_decoder"),
        "ModernBertDecoderAttention",
        HeadSpec(o="Wo", q="q_proj", k="k_proj", v="v_proj", widths=("all_head_size",)),
    )
    # XGLM: its reshapes read num_heads and embed_dim
    register_attention_at(
        hf_module("xglm"),
        "XGLMAttention",
        HeadSpec(o="out_proj", q="q_proj", k="k_proj", v="v_proj", widths=("embed_dim",)),
    )
    # DeBERTa and DeBERTa-v2/v3 (gating/hf_deberta.py)
    register_deberta()
    # BERT: the heads live in BertSelfAttention (query, key, value; num_attention_heads and
    # all_head_size read by its forward), their projection in the sibling BertSelfOutput.dense;
    # RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA have the same attention
    bert = HeadSpec(
        o="output.dense",
        q="self.query",
        k="self.key",
        v="self.value",
        heads="self.num_attention_heads",
        widths=("self.all_head_size",),
    )
    for family, prefix in BERT_LIKE.items():
        register_attention_at(hf_module(family), f"{prefix}Attention", bert)


#: attention classes whose library derives the head size from the width and the head count
#: (their config cannot describe fewer heads of the same size): how, and the module that holds
#: the heads (what attach's ``exclude`` names to leave them ungated)
_HEADS_FIXED = {
    "GPT2Attention": ("n_embd / n_head", "GPT2Attention"),
    "DistilBertSelfAttention": ("dim / n_heads", "DistilBertSelfAttention"),
    "StableLmAttention": ("hidden_size / num_attention_heads", "StableLmAttention"),
    "BloomAttention": ("hidden_size / n_head", "BloomAttention"),
    "CodeGenAttention": ("n_embd / n_head", "CodeGenAttention"),
    "MPNetSelfAttention": ("hidden_size / num_attention_heads", "MPNetSelfAttention"),
    "FalconAttention": ("hidden_size / num_attention_heads", "FalconAttention"),
    **{
        f"{prefix}SelfAttention": ("hidden_size / num_attention_heads", f"{prefix}Attention")
        for prefix in BERT_LIKE.values()
    },
}


def heads_fixed_by_config(model: nn.Module) -> tuple[str, str] | None:
    """Where ``model``'s config cannot describe pruned heads (GPT-2, BERT and its kin): how its library
    derives the head size (``"n_embd / n_head"``) and the attention class that holds the heads;
    else ``None``."""
    kinds = {type(m).__name__ for m in model.modules()}
    return next((fixed for kind, fixed in _HEADS_FIXED.items() if kind in kinds), None)


def sync_config(model: nn.Module) -> str | None:
    """After surgery on a Hugging Face model: set the per-layer attributes its modules keep
    (LLaMA's ``mlp.intermediate_size``), and, where every layer has the same shape, the config
    (LLaMA: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``intermediate_size``; a mixture of experts: its experts' ``moe_intermediate_size`` or
    ``intermediate_size``; GPT-2: ``n_inner``; BERT: ``intermediate_size``; Falcon:
    ``ffn_hidden_size``; the MLP width of :data:`~compressdrop._families.MLP_WIDTHS`' families,
    GPT-NeoX's ``intermediate_size`` to OPT's ``ffn_dim``), so that ``save_pretrained`` writes
    a folder ``from_pretrained`` loads.

    Returns:
        ``None`` when the config describes the slim model (or the model is not one of these),
        else why it cannot (per-layer widths differ, or the library derives the head size from
        the head count): the config is then left describing the dense model.
    """
    config = getattr(model, "config", None)
    if config is None or type(config).__module__.split(".")[0] != "transformers":
        return None
    found, experts = _shapes(model), experts_widths(model)
    if found is None and not experts:
        return None
    want, fixed = found or ({}, {})  # config field → per-layer values; fields it cannot change
    # each fused experts module's neurons per expert, with any shared expert's of that field
    want = {k: want.get(k, []) + experts.get(k, []) for k in {**want, **experts}}
    if any(len(set(v)) > 1 for v in want.values()):
        sizes = ", ".join(f"{k} {v}" for k, v in want.items() if len(set(v)) > 1)
        return (
            f"{DIFFERENT_WIDTHS} ({sizes}), which a {type(config).__name__} "
            "cannot describe: save_pretrained would write a folder from_pretrained cannot "
            "load; prune with uniform=True for a standard config, or keep this shape as .pt2, "
            "ONNX or a compressdrop checkpoint"
        )
    for field, (values, now, what) in fixed.items():
        if set(values) != {now}:
            return (
                f"{type(config).__name__} cannot describe {what} of {values[0]} ({field} is "
                f"{now}): keep this shape as .pt2, ONNX or a compressdrop checkpoint, or leave "
                "those units ungated (attach's exclude)"
            )
    for key, values in want.items():
        if values:  # a mixture of experts has no dense MLP
            setattr(config, key, values[0])
    return None


def _shapes(
    model: nn.Module,
) -> tuple[dict[str, list[int]], dict[str, tuple[list, int, str]]] | None:
    """Per-layer widths of a known Hugging Face family, by config field; and the fields the
    config cannot change: their per-layer values, the config's own, and what they are."""
    mods: list[Any] = list(model.modules())
    kinds = {type(m).__name__ for m in mods}
    config: Any = model.config
    decoder = decoder_shapes(model)
    if decoder is not None:
        return decoder
    if "DistilBertSelfAttention" in kinds:
        selfs = [m for m in mods if type(m).__name__ == "DistilBertSelfAttention"]
        ffns = [m.lin1 for m in mods if type(m).__name__ == "FFN"]
        heads = [int(s.n_heads) for s in selfs]
        how = _HEADS_FIXED["DistilBertSelfAttention"][0]
        return {"hidden_dim": [int(f.out_features) for f in ffns]}, {
            "n_heads": (heads, config.n_heads, f"heads (it derives their size from {how})")
        }
    if "FalconMLP" in kinds:  # (a pruned ALiBi attention is a KeptHeadsFalconAttention)
        attns = [m for m in mods if type(m).__name__.endswith("FalconAttention")]
        heads = [int(a.num_heads) for a in attns]
        how = _HEADS_FIXED["FalconAttention"][0]
        mlps = [m.dense_h_to_4h for m in mods if type(m).__name__ == "FalconMLP"]
        return {"ffn_hidden_size": [int(m.out_features) for m in mlps]}, {
            "num_attention_heads": (
                heads,
                config.num_attention_heads,
                f"heads (it derives their size from {how})",
            )
        }
    if "GPT2Attention" in kinds:
        attns = [m for m in mods if type(m).__name__ == "GPT2Attention"]
        mlps = [m for m in mods if type(m).__name__ == "GPT2MLP"]
        heads = [int(a.num_heads) for a in attns]
        return {"n_inner": [int(m.c_fc.nf) for m in mlps]}, {
            "n_head": (
                heads,
                config.n_head,
                f"heads (it derives their size from {_HEADS_FIXED['GPT2Attention'][0]})",
            )
        }
    bert = next((p for p in BERT_LIKE.values() if f"{p}SelfAttention" in kinds), None)
    if bert is not None:
        selfs = [m for m in mods if type(m).__name__ == f"{bert}SelfAttention"]
        inter = [m for m in mods if type(m).__name__ == f"{bert}Intermediate"]
        heads = [int(s.num_attention_heads) for s in selfs]
        how = _HEADS_FIXED[f"{bert}SelfAttention"][0]
        fixed = {
            "num_attention_heads": (
                heads,
                config.num_attention_heads,
                f"heads (it derives their size from {how})",
            )
        }
        poolers = [m for m in mods if type(m).__name__ == f"{bert}Pooler"]
        if poolers:
            widths = [int(p.dense.out_features) for p in poolers]
            fixed["hidden_size"] = (widths, config.hidden_size, "a pooler width")
        return {"intermediate_size": [m.dense.out_features for m in inter]}, fixed
    kind = next((k for k in MLP_WIDTHS if k in kinds), None)
    if kind is not None:  # the MLP width alone; a head cut is left to the config's own misfit
        at = MLP_WIDTHS[kind]
        ups = [m.get_submodule(at.up) for m in mods if type(m).__name__ == kind]
        return {at.width: [int(u.out_features) // at.rows for u in ups]}, {}
    return None
