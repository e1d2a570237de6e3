"""The exporter's last step, onnxscript's graph optimizer, kept from dropping small constants.

``torch.onnx.export`` ends with ``onnxscript.optimizer.optimize``, whose rewrite rules remove
``x + 0``, ``x - 0``, ``x * 1`` and ``x / 1``. Those rules match their constant to within an
absolute 1e-8 (and a relative 1e-5): ``x + 1e-8`` is removed as ``x + 0``. An RMSNorm's
``x * rsqrt(mean(x²) + eps)`` with ``eps`` ≤ 1e-8 (Helium's 1e-8, Ergo's 1e-12) lost its
``eps``, and a row of zeros (a padding token's embedding) came out of onnxruntime as NaN where
PyTorch gives zeros (onnxscript 0.7.2). onnxruntime's own no-op elimination compares exactly, and
removes a true ``x + 0`` when a session loads the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__: list[str] = []  # internal to compressdrop.export


@contextlib.contextmanager
def exact_constants() -> Iterator[int]:
    """While in the block, onnxscript's optimizer runs without its approximate no-op rules (see
    the module); yields how many rules were left out (0 where this onnxscript keeps them
    elsewhere: then nothing changes)."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _no_op
    except ImportError:  # another layout of onnxscript's rules
        yield 0
        return
    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    kept = (_no_op.dropout_zero_rule, _no_op.dropout_inference_rule)
    approximate = [r for r in _no_op.rules.rules if r not in kept]
    if not isinstance(default, tuple):
        yield 0
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default if r not in approximate)
    try:
        yield len(default) - len(rewriter._DEFAULT_REWRITE_RULES)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default
