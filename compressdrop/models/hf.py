"""Hugging Face causal language models built from a config alone (random weights, nothing
downloaded), as a reference net a recipe can name: ``model.arch: hf-causal-lm``.

The keyword arguments are the config's fields (``model_type`` picks one of the transformers
library's own model families; no code is ever taken from a file). ``num_classes`` is the
vocabulary, ``input_shape`` ``(T,)`` the context; the position table is made long enough for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import InputError
from .record import tag as _tag

__all__ = ["hf_causal_lm", "hub_code"]

_POSITIONS = ("n_positions", "max_position_embeddings")
# the attention implementations transformers runs from its own code and torch's ("paged|sdpa"
# too); any other is a kernel it may download from the Hub and import: an "org/repo[@rev]" id,
# and "flash_attention_2"/"_3" where the flash-attn package is missing and `kernels` is there
_OWN_ATTENTION = re.compile(r"(paged\|)?(eager|sdpa|flex_attention)")
# config fields through which transformers fetches kernels: quantization methods (fp8, mxfp4,
# eetq, ...) load theirs from the Hub
_FETCHING = ("use_kernels", "kernel_config", "quantization_config")
# families whose modules fetch a Hub kernel when built (RWKV: with CUDA and ninja, whatever
# use_kernels says)
_KERNEL_MODELS = ("rwkv",)


def hub_code(config: Mapping[str, Any], depth: int = 0) -> str | None:
    """What code a config (or a sub-config of it, in a table or a list) may make transformers
    fetch from the Hub and import: an ``attn_implementation`` other than its own (eager, sdpa,
    flex_attention), ``use_kernels``, a ``kernel_config`` or a ``quantization_config``
    (transformers follows them whatever ``trust_remote_code`` says); None for a config that
    asks for none. Nested past 32 levels is an answer too."""
    if depth > 32:
        return "sub-configs nested past 32 levels"
    if config.get("model_type") in _KERNEL_MODELS:
        return f"model_type={config['model_type']!r} (it fetches its kernel from the Hub on a GPU)"
    for key in ("attn_implementation", "_attn_implementation"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and _OWN_ATTENTION.fullmatch(value)):
            return f"{key}={str(value)[:80]!r} (a kernel it may download from the Hub and import)"
    experts = config.get("experts_implementation")  # sonicmoe, deepgemm: Hub kernels
    if experts is not None and experts not in ("eager", "grouped_mm", "batched_mm"):
        return f"experts_implementation={str(experts)[:80]!r} (a kernel it downloads and imports)"
    for key in _FETCHING:
        if config.get(key):
            return (
                f"{key}={str(config[key])[:80]!r} (kernels it downloads from the Hub and imports)"
            )
    subs = [*config.values(), *(x for v in config.values() if isinstance(v, list) for x in v)]
    tables = [v for v in subs if isinstance(v, Mapping)]
    return next((w for v in tables if (w := hub_code(v, depth + 1))), None)


def hf_causal_lm(
    input_shape: Sequence[int] = (128,),
    num_classes: int = 256,
    model_type: str = "gpt2",
    **config: Any,
) -> nn.Module:
    """A ``transformers`` ``AutoModelForCausalLM`` of ``model_type`` from its config fields.

    ``use_cache`` defaults to off (training and scoring need no key/value cache; ``generate``
    turns it on per call).

    Raises:
        InputError: transformers is not installed, ``model_type`` is not one of its families, or a
            config field is refused.

    Example:
        >>> lm = hf_causal_lm((64,), 256, "gpt2", n_layer=2, n_embd=64, n_head=4)  # doctest: +SKIP
    """
    from ..hf_files import import_transformers

    tf = import_transformers("hf-causal-lm")
    AutoConfig, AutoModelForCausalLM = tf.AutoConfig, tf.AutoModelForCausalLM
    if not isinstance(model_type, str):
        raise InputError(f"hf-causal-lm: model_type must be a string, got {model_type!r}")
    if "auto_map" in config or config.get("trust_remote_code"):
        raise InputError("hf-causal-lm: a config that names remote code is refused")
    if code := hub_code({**config, "model_type": model_type}):
        raise InputError(f"hf-causal-lm: a config that names code to download is refused: {code}")
    context = int(input_shape[-1])
    # GPT-2's special tokens sit at 50256, outside a small vocabulary: none unless configured
    fields = {
        "vocab_size": int(num_classes),
        "use_cache": False,
        "bos_token_id": None,
        "eos_token_id": None,
        **config,
    }
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise InputError(f"hf-causal-lm: {e}") from None
    defaults = type(cfg)().to_dict()
    for name in _POSITIONS:
        if name in defaults and name not in config:
            setattr(cfg, name, max(context, int(getattr(cfg, name, 0) or 0)))
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise InputError(f"hf-causal-lm: {e}") from None
    return _tag(model, "hf-causal-lm", input_shape, num_classes, model_type=model_type, **config)
