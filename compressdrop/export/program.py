"""Write a (slim) model as a ``torch.export`` program (``.pt2``), checked by loading it back.

The file loads with plain ``torch.export.load(path).module()``: no compressdrop, no model code.
Reading ``.pt2`` files in, safely, is :mod:`compressdrop.programs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..gating.inputs import run_example
from ..programs.records import META_FILE
from ..runtime import max_length, no_cache
from ._check import (
    ExportError,
    as_inputs,
    compare_at_batches,
    errors_at_lengths,
    eval_on_cpu,
    export_shapes,
    fixed_gate_factors,
    made_by,
    output_arrays,
)
from ._experts import exportable_experts
from .onnx import _quiet_exporter

__all__ = ["META_FILE", "ProgramReport", "export_program"]


@dataclass(frozen=True)
class ProgramReport:
    """What was written and how closely the reloaded program reproduced the model."""

    path: Path
    bytes: int
    max_rel_error: dict[int | str, float]


def export_program(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    check_batch_sizes: Sequence[int] = (1, 7, 64),
    rtol: float = 1e-5,
    check_lengths: Sequence[int] = (),
) -> ProgramReport:
    """Write ``model`` (eval mode, CPU) as a ``torch.export`` program with a dynamic batch.

    The file is written to a temporary path, loaded back with ``torch.export.load`` and run at
    every batch size in ``check_batch_sizes`` (and, with ``check_lengths``, for token ids
    ``(batch, length)``, with the length dynamic too, at each of those lengths); only when it
    matches the model to ``rtol`` (max|Δ| / max|y|) does it move to ``path``. The archive's
    :data:`META_FILE` records the version, how a slim model was pruned and the outputs' class
    names, which :func:`compressdrop.load_model` reads back.

    The program loads with plain ``torch.export.load``: an output that is a mapping of a class of
    its own (a Hugging Face model's ``ModelOutput``, whose pytree only ``transformers`` can
    rebuild) is written as a plain ``dict`` of its tensors (``out["logits"]``), and a Hugging Face
    model is exported with ``config.use_cache`` off, as for ONNX.

    Raises:
        InputError: the model does not run on ``example_input`` (its shapes and dtypes named).
        ExportError: ``torch.export`` failed on the model.
        ExportMismatchError: the reloaded program differs from the model.
    """
    path = Path(path)
    # a copy: a slice of a data set is a view of all of it, which torch.export.save would
    # store as the program's sample input (a 150 kB LeNet's .pt2 held 169 MB of training images)
    xs = tuple(t.detach().cpu().clone() for t in as_inputs(example_input))
    dims = export_shapes(xs, check_lengths, max_length(model))
    with eval_on_cpu(model) as model_cpu, no_cache(model_cpu), atomic_write(path) as tmp:
        try:
            with _quiet_exporter(), fixed_gate_factors(model_cpu), exportable_experts(model_cpu):
                target = _plain(model_cpu, xs)
                # the wrapper takes *xs: one parameter, the tuple of inputs
                shapes = (dims,) if isinstance(target, _PlainOutput) else dims
                program = torch.export.export(target, xs, dynamic_shapes=shapes)
        except Exception as e:  # the exporter raises many types; report them as one
            run_example(model_cpu, xs, "example_input")  # an input that does not fit: named
            raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
        with open(tmp, "wb") as f:  # a file object: torch wants a name ending in .pt2
            torch.export.save(program, f, extra_files={META_FILE: json.dumps(made_by(model))})
        with open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        run = lambda *xb: output_arrays(loaded(*xb))  # noqa: E731
        what = "the reloaded .pt2"
        errors: dict[int | str, float] = dict(
            compare_at_batches(model_cpu, run, xs, check_batch_sizes, rtol, what).items()
        )
        errors.update(errors_at_lengths(model_cpu, run, xs[0], check_lengths, rtol, what))
    return ProgramReport(path, path.stat().st_size, errors)


def _plain(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> nn.Module:
    """``model`` itself, or wrapped in :class:`_PlainOutput` where its output is a mapping of a
    class of its own (so that only such a program's names gain the wrapper's ``inner.``)."""
    with torch.no_grad():
        out = model(*xs)
    return _PlainOutput(model) if isinstance(out, Mapping) and type(out) is not dict else model


class _PlainOutput(nn.Module):
    """``inner`` with a mapping output of a class of its own turned into a plain ``dict``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: torch.Tensor) -> Any:
        """``inner(*xs)``; a ``ModelOutput`` (or any non-``dict`` mapping) as a ``dict``."""
        out = self.inner(*xs)
        if isinstance(out, Mapping) and type(out) is not dict:
            return {k: v for k, v in out.items() if v is not None}
        return out
