"""The checks of a training run's resume file (``checkpoint.pt``, ``format: compressdrop-run``):
each field the runner reads is there, of its type, so that a damaged or foreign file is refused
with the field named, not with a ``KeyError`` or ``ValueError`` from inside the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch

from ..errors import CheckpointError
from ..recipes.config import Stages
from ._common import _among, _what
from .sites import check_sites

__all__ = ["check_run_state"]

#: the stages a run resumes in
_STAGES = tuple(f.name for f in fields(Stages))


def _state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


#: the fields the runner reads: whether a value will do, and what it must be
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stage": (lambda v: _among(v, _STAGES), f"a stage's name ({', '.join(_STAGES)})"),
    "epoch": (lambda v: type(v) is int and v >= 0, "a whole number ≥ 0"),
    "recipe": (lambda v: isinstance(v, Mapping), "a recipe's mapping"),
    "model": (_state_dict, "a state_dict"),
    "optimizer": (lambda v: isinstance(v, Mapping), "an optimizer's state_dict"),
    "rng": (
        lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8,
        "a random generator's state (a uint8 tensor)",
    ),
    "history": (lambda v: isinstance(v, list), "a list of epoch records"),
}


def check_run_state(payload: Mapping[str, Any], path: Any) -> None:
    """Refuse a resume file whose fields the runner could not use.

    Raises:
        CheckpointError: naming ``path``, the field and what it holds.
    """
    for key, (fits, want) in _FIELDS.items():
        if not fits(payload.get(key)):
            raise CheckpointError(
                f"{path}: a damaged run checkpoint: its {key} is {_what(payload.get(key))}, not "
                f"{want}; start the run again without --resume (or in a new --out folder)"
            )
    for key in ("dense_metrics", "prune_info"):
        if key not in payload:
            raise CheckpointError(
                f"{path}: a damaged run checkpoint: it has no {key}; start the run again "
                "without --resume (or in a new --out folder)"
            )
    try:  # optional: a file written before the sites were recorded plans the gates afresh
        check_sites(payload.get("sites"), payload["model"])
    except CheckpointError as e:
        raise CheckpointError(
            f"{path}: a damaged run checkpoint: {e}; start the run again without --resume (or in "
            "a new --out folder)"
        ) from None
