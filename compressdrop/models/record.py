"""The ``arch`` record every reference net carries (see :func:`compressdrop.models.build_model`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def tag(
    model: nn.Module, name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Set ``model.arch`` to the record of a reference net built with these arguments."""
    # torch's stubs type Module.__setattr__'s value as Tensor | Module; any value is allowed
    model.arch = {  # type: ignore[assignment]
        "name": name,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
    }
    return model
