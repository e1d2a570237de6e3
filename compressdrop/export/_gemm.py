"""Linear layers written to ONNX as one ``Gemm`` each, bias included.

The exporter writes ``nn.Linear`` on an input of more than two dimensions (a transformer's
(batch, tokens, features)) as ``MatMul`` and a separate ``Add`` of the bias: onnxruntime fuses the
two into a ``Gemm`` only for two-dimensional inputs, and a dynamic batch dimension keeps it from
reshaping the input itself. In a pruned transformer those ``Add`` nodes are a cost per layer
that pruning does not remove. Exported over the input's rows flattened to
two dimensions (:func:`compressdrop.runtime.linear`), each such layer is a ``Reshape``, a ``Gemm``
and a ``Reshape`` back: the same values. On this project's machine, at one thread and batch 64,
the tiny ViTs of BENCHMARKS §1 ran 3–7 % (dense) and 11–15 % (slim, the mean of twelve) faster in
onnxruntime; two-thread timings there moved more between runs than that. onnxruntime's
``BiasGelu`` fusion no longer applies (``Gemm`` + ``Gelu`` instead), which was the slower on that
CPU; other hardware is not measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import runtime

__all__: list[str] = []  # internal: export_onnx uses it

_STOCK = (nn.Linear, NonDynamicallyQuantizableLinear)


class _GemmLinear(nn.Linear):
    """A stock linear layer for the length of an export: its rows flattened (see the module)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``F.linear`` through :func:`compressdrop.runtime.linear`. The argument keeps
        ``nn.Linear.forward``'s name: a model may pass it by keyword (``fc(input=x)``), and a
        call that fails here fails the first export (the retry keeps only the attention's swap)."""
        return runtime.linear(input, self.weight, self.bias)


@contextlib.contextmanager
def gemm_linears(model: nn.Module) -> Iterator[int]:
    """Every stock ``nn.Linear`` of ``model`` with a bias exported as one ``Gemm`` (and
    :func:`compressdrop.runtime.linear` flattening, for compressdrop's own attention) inside this
    context; yields how many layers were switched. The layers keep their identity, parameters and
    hooks (only their class changes, and is put back); subclasses (a forward of their own or not,
    a parametrized layer's class among them) are left alone."""
    layers = [m for m in model.modules() if type(m) in _STOCK and m.bias is not None]
    classes = [type(m) for m in layers]
    runtime._GEMM[0] += 1
    try:
        for m in layers:
            m.__class__ = _GemmLinear
        yield len(layers)
    finally:
        runtime._GEMM[0] -= 1
        for m, cls in zip(layers, classes, strict=True):
            m.__class__ = cls
