"""The attention heads of Hugging Face decoders whose attention is LLaMA's (the families of
:data:`compressdrop._families.DECODERS`: LLaMA, Qwen, Mistral, Gemma, OLMo, Granite, Cohere,
StableLM, StarCoder2, Phi, Mixtral, Qwen-MoE, GPT-OSS, GLM and GLM-4; OLMo-2's and OLMoE's,
whose q/k norms span all heads, only to say why they stay), and Phi-3's packed ``qkv_proj``:
where they are, how they are removed, and the widths the config describes after surgery.
GPT-OSS's attention adds a learned sink logit per query head (``sinks``), which goes with its
head.

Grouped-query attention: the query heads of one key/value head are consecutive, and every
key/value head keeps as many; with one key/value head per query head, a head's key and value
rows go with it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._families import DECODERS, Decoder
from ..errors import InputError
from .heads import HeadSpec, cut_features, head_features, hf_module, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating

#: attention class name → its family's layout
ATTENTIONS: dict[str, Decoder] = {f"{d.prefix}Attention": d for d in DECODERS.values()}


def _q_width(m: Any) -> int:
    """The query features: ``q_proj``'s outputs, or the query part of Phi-3's packed ``qkv_proj``."""
    if hasattr(m, "qkv_proj"):
        return int(m.qkv_proj.out_features - 2 * m.num_key_value_heads * m.head_dim)
    return int(m.get_submodule("q_proj").out_features)


def query_heads(m: Any) -> int:
    """The attention's query heads (its module records none it keeps up to date)."""
    return _q_width(m) // int(m.head_dim)


def kv_heads(m: Any) -> int:
    """The attention's key/value heads: Phi-3's recorded count, else ``k_proj``'s rows."""
    if hasattr(m, "qkv_proj"):
        return int(m.num_key_value_heads)
    return int(m.get_submodule("k_proj").out_features // m.head_dim)


def _kv_blocks(m: Any) -> int:
    """One block of query heads per key/value head; none when each has its own (multi-head)."""
    return kv_heads(m) if m.num_key_value_groups > 1 else 1


def _cut_head_norms(m: Any, kept: list[int], mha: bool) -> None:
    """Per-head q/k norms: StableLM's ``q_layernorm.norms`` (one LayerNorm per head), Cohere's
    ``q_norm`` (a weight row per head); the key's too where each query head has its own."""
    names = ("q_layernorm", "q_norm") + (("k_layernorm", "k_norm") if mha else ())
    for name in names:
        norm: Any = getattr(m, name, None)
        if norm is None:
            continue
        if isinstance(getattr(norm, "norms", None), nn.ModuleList):
            norm.norms = nn.ModuleList(norm.norms[h] for h in kept)
            norm.num_heads = len(kept)
        elif getattr(norm, "weight", None) is not None and norm.weight.dim() == 2:
            norm.weight = nn.Parameter(norm.weight.data[kept].clone())
            if getattr(norm, "bias", None) is not None and norm.bias.dim() == 2:
                norm.bias = nn.Parameter(norm.bias.data[kept].clone())


def _remover(o: str) -> Any:
    def remove(m: Any, keep: torch.Tensor) -> None:
        """Remove the query heads not in ``keep``: their rows of the query projection and
        columns of ``o``; with one query head per key/value head, their key and value rows
        too; with groups, ``num_key_value_groups`` (read by ``repeat_kv``) becomes the heads
        each key/value head keeps. The module's own head counts follow; the shared config is
        left alone (it describes the dense model), except Phi-3's, whose forward reads
        ``config.num_attention_heads``: its attention gets a config of its own."""
        D, H, KV = int(m.head_dim), query_heads(m), kv_heads(m)
        kept = sorted(set(keep.tolist()))
        cut = head_features([h for h in range(H) if h not in kept], D)
        mha = m.num_key_value_groups == 1
        if mha:
            cut_kv = cut
        elif len(kept) % KV:
            raise InputError(
                f"{len(kept)} query heads do not split evenly over {KV} key/value heads"
            )
        else:
            cut_kv = []
        if hasattr(m, "qkv_proj"):  # [q (H·D); k (KV·D); v (KV·D)]
            q = H * D
            cut_features(
                m.qkv_proj,
                cut + [q + i for i in cut_kv] + [q + KV * D + i for i in cut_kv],
                out=True,
            )
            m.config = copy.copy(m.config)
            m.config.num_attention_heads = len(kept)
        else:
            cut_features(m.get_submodule("q_proj"), cut, out=True)
            for path in ("k_proj", "v_proj"):
                cut_features(m.get_submodule(path), cut_kv, out=True)
        cut_features(m.get_submodule(o), cut, out=False)
        _cut_head_norms(m, kept, mha)
        sinks = getattr(m, "sinks", None)  # GPT-OSS: one logit per query head
        if isinstance(sinks, nn.Parameter) and sinks.shape == (H,):
            m.sinks = nn.Parameter(sinks.data[kept].clone(), requires_grad=sinks.requires_grad)
        if hasattr(m, "num_heads"):
            m.num_heads = len(kept)
        if mha:
            if hasattr(m, "num_key_value_heads"):
                m.num_key_value_heads = len(kept)
        else:
            m.num_key_value_groups = len(kept) // KV

    return remove


def _norms_across_heads(m: nn.Module) -> str:
    """Why the heads of a :attr:`~compressdrop._families.Decoder.norms_across_heads` attention
    (OLMo-2's, OLMoE's) stay."""
    return (
        "its q_norm and k_norm are RMSNorms over all heads together, so removing a head would "
        "change the others' norms"
    )


def register_decoders() -> None:
    """Register the heads of every :data:`DECODERS` family this transformers has, and Phi-3's;
    those whose q/k norms span all heads with the reason they stay."""
    for family, d in {**DECODERS, "phi3": Decoder("Phi3")}.items():
        packed = family == "phi3"
        spec = HeadSpec(
            o=d.o,
            q=None if packed else "q_proj",
            qkv="qkv_proj" if packed else None,
            shared=() if packed else ("k_proj", "v_proj"),
            heads=query_heads,
            blocks=_kv_blocks,
            remove=_remover(d.o),
            why_not=_norms_across_heads if d.norms_across_heads else None,
        )
        register_attention_at(hf_module(family), f"{d.prefix}Attention", spec)


def decoder_shapes(model: nn.Module) -> tuple[dict[str, list[int]], dict] | None:
    """Per-layer widths by config field of a :data:`DECODERS` model (``None``: not one); the
    MLPs' own ``intermediate_size`` is set on the way. A mixture of experts' dense MLPs
    (Qwen-MoE's ``mlp_only_layers``) are described by ``intermediate_size`` and its shared
    experts (Qwen2-MoE's) by a field of their own. StableLM's heads are a field its config
    cannot change (it derives ``head_dim`` from ``hidden_size``)."""
    mods: list[Any] = list(model.modules())
    attns = [m for m in mods if type(m).__name__ in ATTENTIONS]
    if not attns:
        return None
    d = ATTENTIONS[type(attns[0]).__name__]
    want: dict[str, list[int]] = {"num_key_value_heads": [kv_heads(a) for a in attns]}
    heads = [query_heads(a) for a in attns]
    fixed: dict[str, tuple[list, int, str]] = {}
    config: Any = getattr(model, "config", None)
    if d.head_dim_fixed:
        how = "its size from hidden_size / num_attention_heads"
        fixed["num_attention_heads"] = (
            heads,
            config.num_attention_heads,
            f"heads (it derives {how})",
        )
    else:
        want |= {"num_attention_heads": heads, "head_dim": [int(a.head_dim) for a in attns]}
    if d.mlp is not None:
        mlps = [(n, m) for n, m in model.named_modules() if type(m).__name__ == d.prefix + d.mlp]
        for _, mlp in mlps:
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = mlp.get_submodule(d.up).out_features // d.rows
        # a shared expert's width is a field of its own (Qwen2-MoE's), not the dense layers'
        width = {n: int(m.get_submodule(d.up).out_features) // d.rows for n, m in mlps}
        shared = {n for n in width if d.shared is not None and n.rsplit(".", 1)[-1] == d.shared}
        want[d.width] = [w for n, w in width.items() if n not in shared]
        if d.shared is not None:
            want[d.shared_width] = [w for n, w in width.items() if n in shared]
    return want, fixed
