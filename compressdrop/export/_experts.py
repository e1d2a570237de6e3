"""Fused experts (a Hugging Face mixture of experts) in a form the exporters can write.

transformers 5 runs its experts modules through the kernel ``config._experts_implementation``
names: ``grouped_mm`` by default, which on the CPU is a custom operator that the ONNX converter
has no translation for, and ``eager``, a Python loop over the experts that routing hits (a
data-dependent ``nonzero``). ``batched_mm`` computes the same function with fixed shapes (each
routed token's expert weights gathered, one batched product; only the order of a sum differs),
which both ``torch.export`` and the ONNX converter take.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..gating.experts import is_experts

__all__: list[str] = []  # internal to compressdrop.export

EXPORTABLE = "batched_mm"


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[int]:
    """While in the block, every fused experts module of ``model`` runs ``batched_mm`` (its
    config's ``_experts_implementation``, put back on exit); yields how many configs changed."""
    configs = {}
    for m in model.modules():
        config = getattr(m, "config", None) if is_experts(m) else None
        if config is not None and hasattr(config, "_experts_implementation"):
            configs[id(config)] = config
    saved = [(c, c._experts_implementation) for c in configs.values()]
    try:
        for c, _ in saved:
            c._experts_implementation = EXPORTABLE
        yield sum(old != EXPORTABLE for _, old in saved)
    finally:
        for c, old in saved:
            c._experts_implementation = old
