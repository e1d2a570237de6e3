"""Write a (slim) model as a ``torch.export`` program (``.pt2``), checked by loading it back.

The file loads with plain ``torch.export.load(path).module()``: no compressdrop, no model code.
Reading ``.pt2`` files in, safely, is :mod:`compressdrop.programs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write
from ._check import (
    ExportError,
    compare_at_batches,
    dynamic_batch,
    eval_on_cpu,
    fixed_gate_factors,
    output_arrays,
)
from .onnx import _quiet_exporter

__all__ = ["ProgramReport", "export_program"]


@dataclass(frozen=True)
class ProgramReport:
    """What was written and how closely the reloaded program reproduced the model."""

    path: Path
    bytes: int
    max_rel_error: dict[int, float]


def export_program(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    check_batch_sizes: Sequence[int] = (1, 7, 64),
    rtol: float = 1e-5,
) -> ProgramReport:
    """Write ``model`` (eval mode, CPU) as a ``torch.export`` program with a dynamic batch.

    The file is written to a temporary path, loaded back with ``torch.export.load`` and run at
    every batch size in ``check_batch_sizes``; only when it matches the model to ``rtol``
    (max|Δ| / max|y|) does it move to ``path``.

    Raises:
        ExportError: ``torch.export`` failed on the model.
        ExportMismatchError: the reloaded program differs from the model.
    """
    path = Path(path)
    # a copy: a slice of a data set is a view of all of it, which torch.export.save would
    # store as the program's sample input (a 150 kB LeNet's .pt2 held 169 MB of training images)
    x = example_input.detach().cpu().clone()
    with eval_on_cpu(model) as model_cpu, atomic_write(path) as tmp:
        try:
            with _quiet_exporter(), fixed_gate_factors(model_cpu):
                program = torch.export.export(
                    model_cpu, (x,), dynamic_shapes=({0: dynamic_batch()},)
                )
        except Exception as e:  # the exporter raises many types; report them as one
            raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
        with open(tmp, "wb") as f:  # a file object: torch wants a name ending in .pt2
            torch.export.save(program, f)
        with open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        errors = compare_at_batches(
            model_cpu,
            lambda xb: output_arrays(loaded(xb)),
            x,
            check_batch_sizes,
            rtol,
            "the reloaded .pt2",
        )
    return ProgramReport(path, path.stat().st_size, errors)
