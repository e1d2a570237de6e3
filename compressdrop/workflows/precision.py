"""A model brought in another floating-point dtype than float32 (bfloat16, float16, float64),
used in float32 by the CLI's jobs: the data's and the runner's dtype (training a bfloat16 model
wants float32 master weights; a recipe's ``precision: bf16`` autocasts)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import Factory
from ..checkpoint import load_model
from ..errors import InputError

__all__ = ["PrecisionWarning", "load_float32"]


class PrecisionWarning(UserWarning):
    """A model's bfloat16, float16 or float64 weights are used in float32 by a CLI job."""


def load_float32(
    model_path: str | Path,
    arch: Factory | str | None,
    arch_kwargs: Mapping[str, Any] | None,
    trust_code: bool,
) -> nn.Module:
    """:func:`~compressdrop.checkpoint.load_model`, its floating-point weights in float32, with a
    :class:`PrecisionWarning` saying so.

    Raises:
        InputError: the model does not run in float32 (a program that casts to its own dtype
            inside, as bfloat16 code often does).
    """
    model = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    tensors = [*model.parameters(), *model.buffers()]
    other = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
    other = [d for d in other if d != "float32"]
    if not other:
        return model
    warnings.warn(
        f"{model_path}: its {' and '.join(other)} weights are used in float32 (the data, any "
        "training and the files written are float32); convert the result with "
        "model.to(torch.bfloat16) or the like if you need its dtype back",
        PrecisionWarning,
        stacklevel=3,
    )
    model = model.float()
    _runs_in_float32(model, model_path, other)
    return model


@torch.no_grad()
def _runs_in_float32(model: nn.Module, model_path: str | Path, dtypes: list[str]) -> None:
    from ..gating import example_input_for

    try:
        x = example_input_for(model, batch=2)
    except InputError:  # no shape to try it with: the job's own data will
        return
    was = model.training
    model.eval()
    try:
        model(x)
    except RuntimeError as e:
        if "dtype" not in str(e).lower():
            return  # not a dtype problem: the job says what it is with the data
        raise InputError(
            f"{model_path}: the model does not run in float32 ({str(e).splitlines()[0][:160]}): "
            f"its graph casts to {' or '.join(dtypes)} inside; export it from the model in "
            "float32 (model.float() before torch.export)"
        ) from None
    finally:
        model.train(was)
