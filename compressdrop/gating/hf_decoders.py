"""The attention heads of Hugging Face decoders whose attention is LLaMA's (the families of
:data:`compressdrop._families.DECODERS`: LLaMA, Qwen, Mistral, Gemma, OLMo, Granite, Cohere,
StableLM, StarCoder2, Phi, Mixtral, Qwen-MoE, GPT-OSS, GLM, GLM-4, GLM-4-MoE, Llama-4, SmolLM3,
ERNIE-4.5, EXAONE-4 and the others listed there; OLMo-2's, OLMo-3's and OLMoE's, whose q/k
norms span all heads, only to say why they stay), Phi-3's packed ``qkv_proj``, and multi-latent
attention (DeepSeek-V2/V3, MiniCPM3): where they are, how they are removed, and the widths the
config describes after surgery. GPT-OSS's and GraniteSWA's attention adds a learned sink logit
per query head (``sinks``), which goes with its head.

Grouped-query attention: the query heads of one key/value head are consecutive, and every
key/value head keeps as many; with one key/value head per query head, a head's key and value
rows go with it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._families import DECODERS, Decoder, hf_module
from ..errors import InputError
from .heads import HeadSpec, cut_features, head_features, register_attention_at

__all__: list[str] = []  # internal to compressdrop.gating

#: attention class name → its family's layout
ATTENTIONS: dict[str, Decoder] = {f"{d.prefix}Attention": d for d in DECODERS.values()}


def _q_width(m: Any) -> int:
    """The query features: ``q_proj``'s outputs, or the query part of Phi-3's packed ``qkv_proj``."""
    if hasattr(m, "qkv_proj"):
        return int(m.qkv_proj.out_features - 2 * m.num_key_value_heads * m.head_dim)
    return int(m.get_submodule("q_proj").out_features)


def _q_rows(m: Any) -> int:
    """Rows of the query projection per head feature: 2 where each head's query is followed by
    its output gate's rows (:attr:`~compressdrop._families.Decoder.q_gate`), else 1."""
    d = ATTENTIONS.get(type(m).__name__)
    return 2 if d is not None and d.q_gate else 1


def query_heads(m: Any) -> int:
    """The attention's query heads (its module records none it keeps up to date)."""
    if hasattr(m, "kv_b_proj"):  # multi-latent: v_head_dim inputs of o_proj per head
        return int(m.o_proj.in_features // m.v_head_dim)
    return _q_width(m) // (_q_rows(m) * int(m.head_dim))


def kv_heads(m: Any) -> int:
    """The attention's key/value heads: Phi-3's recorded count, else ``k_proj``'s rows (one per
    query head in a multi-latent attention)."""
    if hasattr(m, "kv_b_proj"):
        return query_heads(m)
    if hasattr(m, "qkv_proj"):
        return int(m.num_key_value_heads)
    return int(m.get_submodule("k_proj").out_features // m.head_dim)


def _groups(m: Any) -> int:
    """Query heads per key/value head: ``num_key_value_groups``, which an attention without
    grouped-query heads may not have (GTE's: 1)."""
    return int(getattr(m, "num_key_value_groups", 1))


def _kv_blocks(m: Any) -> int:
    """One block of query heads per key/value head; none when each has its own (multi-head)."""
    return kv_heads(m) if _groups(m) > 1 else 1


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
        mha = _groups(m) == 1
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
        else:  # (a head's query and gate rows together where q_proj holds both)
            gone = [h for h in range(H) if h not in kept]
            cut_features(m.get_submodule("q_proj"), head_features(gone, _q_rows(m) * D), out=True)
            for path in ("k_proj", "v_proj"):
                cut_features(m.get_submodule(path), cut_kv, out=True)
        cut_features(m.get_submodule(o), cut, out=False)
        _cut_head_norms(m, kept, mha)
        # one value per query head: GPT-OSS's and GraniteSWA's sink logits, Beam's gate bias
        for name in ("sinks", "gate_bias"):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter) and p.shape == (H,):
                setattr(m, name, nn.Parameter(p.data[kept].clone(), requires_grad=p.requires_grad))
        gate = getattr(m, "gate_proj", None)  # Beam's, AFMoE's: a sigmoid gate per head feature
        if isinstance(gate, nn.Linear) and gate.out_features == H * D:
            cut_features(gate, cut, out=True)
        for attr in ("num_heads", "num_attention_heads"):  # (Seed-OSS, EXAONE-4 keep theirs)
            if hasattr(m, attr):
                setattr(m, attr, len(kept))
        if mha:
            if hasattr(m, "num_key_value_heads"):
                m.num_key_value_heads = len(kept)
        else:
            m.num_key_value_groups = len(kept) // KV

    return remove


#: a multi-latent attention's projections that start no unit group of their own: the per-head
#: ones, and kv_a_proj_with_mqa, whose latent reaches the heads through kv_a_layernorm and the
#: one rotary key of all heads (neither lets a unit go exactly)
_LATENT = ("q_proj", "q_b_proj", "kv_b_proj", "kv_a_proj_with_mqa")


def _remove_latent(m: Any, keep: torch.Tensor) -> None:
    """Remove the heads of a multi-latent attention not in ``keep``: their query rows
    (``qk_head_dim`` each, of ``q_proj`` or ``q_b_proj``), their key and value rows of
    ``kv_b_proj`` (``qk_nope_head_dim + v_head_dim`` each) and their ``v_head_dim`` columns of
    ``o_proj``. Its forward reshapes by ``-1``; ``num_heads`` follows."""
    kept = set(keep.tolist())
    gone = [h for h in range(query_heads(m)) if h not in kept]
    q = m.q_proj if getattr(m, "q_proj", None) is not None else m.q_b_proj
    cut_features(q, head_features(gone, int(m.qk_head_dim)), out=True)
    kv = int(m.qk_nope_head_dim + m.v_head_dim)
    cut_features(m.kv_b_proj, head_features(gone, kv), out=True)
    cut_features(m.o_proj, head_features(gone, int(m.v_head_dim)), out=False)
    if hasattr(m, "num_heads"):
        m.num_heads = len(kept)


def _norms_across_heads(m: nn.Module) -> str:
    """Why the heads of a :attr:`~compressdrop._families.Decoder.norms_across_heads` attention
    (OLMo-2's, OLMoE's; BitNet's norm of their outputs) stay."""
    if "attn_sub_norm" in m._modules:
        return (
            "its attn_sub_norm is an RMSNorm over all heads' outputs together (before o_proj), "
            "so removing a head would change the others' scale"
        )
    return (
        "its q_norm and k_norm are RMSNorms over all heads together, so removing a head would "
        "change the others' norms"
    )


def register_decoders() -> None:
    """Register the heads of every :data:`DECODERS` family this transformers has, and Phi-3's;
    those whose q/k norms span all heads with the reason they stay."""
    for family, d in {**DECODERS, "phi3": Decoder("Phi3")}.items():
        packed = family == "phi3"
        if d.latent:  # (a head's q, kv and o parts differ in width: a surgery of its own)
            spec = HeadSpec(o=d.o, heads=query_heads, remove=_remove_latent, shared=_LATENT)
            register_attention_at(hf_module(family), f"{d.prefix}Attention", spec)
            continue
        spec = HeadSpec(
            o=d.o,
            q=None if packed else "q_proj",
            qkv="qkv_proj" if packed else None,
            shared=() if packed else ("k_proj", "v_proj", "gate_proj"),  # (gate: Beam's, AFMoE's)
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
    if d.latent:  # (its head_dim is the rotary part's: it stays)
        want["num_attention_heads"] = heads
    elif d.head_dim_fixed:
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
            # a shared expert of shared_per experts' width (n_shared_experts), where it divides
            per = int(getattr(config, d.shared_per)) if d.shared_per is not None else 1
            widths = [
                w // per if w % per == 0 else w / per for n, w in width.items() if n in shared
            ]
            want[d.shared_width] = want.get(d.shared_width, []) + widths  # type: ignore[operator]
    return want, fixed
