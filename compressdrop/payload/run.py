"""The checks of a training run's resume file (``checkpoint.pt``, ``format: compressdrop-run``):
each field the runner reads is there, of its type, so that a damaged or foreign file is refused
with the field named, not with a ``KeyError`` or ``ValueError`` from inside the run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch

from ..errors import CheckpointError
from ..recipes.config import Stages
from ._common import _among, _what

__all__ = ["check_run_state"]

#: the fields the runner reads and what each must be
_FIELDS: dict[str, tuple[type, str]] = {
    "stage": (str, "a stage's name"),
    "epoch": (int, "a whole number ≥ 0"),
    "recipe": (Mapping, "a recipe's mapping"),
    "model": (Mapping, "a state_dict"),
    "optimizer": (Mapping, "an optimizer's state_dict"),
    "rng": (torch.Tensor, "a random generator's state (a uint8 tensor)"),
    "history": (list, "a list of epoch records"),
}


def check_run_state(payload: Mapping[str, Any], path: Any) -> None:
    """Refuse a resume file whose fields the runner could not use.

    Raises:
        CheckpointError: naming ``path``, the field and what it holds.
    """
    stages = [f.name for f in fields(Stages)]
    for key, (kind, want) in _FIELDS.items():
        value: Any = payload.get(key)
        ok = (
            (type(value) is int and value >= 0)
            if kind is int
            else isinstance(value, kind) and (key != "stage" or _among(value, stages))
        )
        ok = ok and (key != "rng" or value.dtype == torch.uint8)
        ok = ok and (key != "model" or all(isinstance(v, torch.Tensor) for v in value.values()))
        if not ok:
            raise CheckpointError(
                f"{path}: a damaged run checkpoint: its {key} is {_what(value)}, not {want}; "
                "start the run again without --resume (or in a new --out folder)"
            )
    for key in ("dense_metrics", "prune_info"):
        if key not in payload:
            raise CheckpointError(
                f"{path}: a damaged run checkpoint: it has no {key}; start the run again "
                "without --resume (or in a new --out folder)"
            )
