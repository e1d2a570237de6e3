"""A compressdrop checkpoint's records, checked before anything is built from them.

:func:`compressdrop.load_model` rebuilds a model from the plain data a file holds. A file is
anyone's, so each record it reads is checked for its type and its size before any model, gate or
tensor is made from it, and one that does not fit is a one-line
:class:`~compressdrop.errors.CheckpointError` naming the record (as
:class:`~compressdrop.arch.ArchRecord` is for the ``arch`` record).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "INPUT_DTYPES",
    "MAX_INPUT_VALUES",
    "check_inputs",
    "input_values_cap",
    "recorded_inputs",
]

#: values per example, over all of a gated model's inputs, at most: 16.7 million (128 MB of
#: float32 in the batch of two that re-attaching the gates traces). Where the ``arch`` record
#: gives one example's shape, at most 64 times its values (an image traced at 8 times its side),
#: and at least 65,536 (a token model traced at a longer sequence than it records).
MAX_INPUT_VALUES = 1 << 24
_PER_ARCH_VALUE, _FLOOR = 64, 1 << 16
_MAX_INPUTS, _MAX_DIMS = 64, 16
#: the dtypes an input may be drawn in (:func:`compressdrop.gating.random_inputs`)
INPUT_DTYPES = (
    *("float16", "bfloat16", "float32", "float64"),
    *("uint8", "int8", "int16", "int32", "int64", "bool"),
)
_SPEC_KEYS = {"shape", "dtype", "high"}


def _what(value: Any) -> str:
    """``value`` in a few words for an error message: short plain data as it is, else its type."""
    if value is None or isinstance(value, bool | int | float | str | list | tuple):
        text = repr(value)
        return text if len(text) <= 80 else f"{text[:77]}..."
    return f"a {type(value).__name__}"


def input_values_cap(arch_shape: tuple[int, ...] | None) -> int:
    """The most values per example a gated file's inputs may hold (see :data:`MAX_INPUT_VALUES`)."""
    if arch_shape is None:
        return MAX_INPUT_VALUES
    return min(MAX_INPUT_VALUES, max(_PER_ARCH_VALUE * math.prod(arch_shape), _FLOOR))


def check_inputs(
    specs: Any, arch_shape: tuple[int, ...] | None = None, record: str = "inputs"
) -> list[dict[str, Any]]:
    """A gated file's input specs (what :func:`compressdrop.gating.input_specs` records), checked
    before :func:`~compressdrop.gating.random_inputs` draws them: a list of at most 64 mappings,
    each with a ``shape`` (a list of at most 16 non-negative sizes), a ``dtype`` of
    :data:`INPUT_DTYPES` (float32 if none) and a ``high`` (``None``, or for token ids an integer
    within the dtype), their values per example together at most :func:`input_values_cap`.

    Args:
        specs: the record as the file holds it.
        arch_shape: one example's shape as the ``arch`` record gives it, if it does.
        record: the record's name, for messages (``input_shape`` for a file that has only that).

    Returns:
        The specs as plain dicts with all three keys.

    Raises:
        CheckpointError: anything else, in one line naming the record.
    """
    if not isinstance(specs, list | tuple) or not specs or len(specs) > _MAX_INPUTS:
        raise CheckpointError(
            f"{record} record: expected a list of 1 to {_MAX_INPUTS} input specs, got {_what(specs)}"
        )
    cap, total, out = input_values_cap(arch_shape), 0, []
    for i, spec in enumerate(specs):
        where = f"{record} record, input {i}"
        if record == "input_shape":  # an older file's shapes alone
            spec = {"shape": spec}
        if not isinstance(spec, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {_what(spec)}")
        unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
        if unknown:
            raise CheckpointError(
                f"{where}: unknown key(s) {unknown} (known: {sorted(_SPEC_KEYS)})"
            )
        shape = spec.get("shape")
        if not (
            isinstance(shape, list | tuple)
            and len(shape) <= _MAX_DIMS
            and all(type(d) is int and 0 <= d <= cap for d in shape)
        ):
            raise CheckpointError(
                f"{where}: shape must be a list of at most {_MAX_DIMS} sizes from 0 to {cap:,}, "
                f"got {_what(shape)}"
            )
        dtype = spec.get("dtype", "float32")
        if dtype not in INPUT_DTYPES:
            raise CheckpointError(
                f"{where}: dtype must be one of {INPUT_DTYPES}, got {_what(dtype)}"
            )
        high = spec.get("high")
        kind = getattr(torch, dtype)
        top = torch.iinfo(kind).max + 1 if not (kind.is_floating_point or kind == torch.bool) else 0
        if high is not None and not (type(high) is int and (not top or high <= top)):
            raise CheckpointError(
                f"{where}: high (the bound of token ids) must be an integer"
                f"{f' of at most {top}' if top else ''} or None, got {_what(high)}"
            )
        total += math.prod(shape)
        out.append({"shape": list(shape), "dtype": dtype, "high": high})
    if total > cap:
        of = "" if arch_shape is None else f" for the arch record's input_shape {list(arch_shape)}"
        raise CheckpointError(
            f"{record} record: the inputs hold {total:,} values per example, more than the "
            f"{cap:,} allowed{of}"
        )
    return out


def recorded_inputs(
    payload: Mapping[str, Any], arch_shape: tuple[int, ...] | None
) -> list[dict[str, Any]]:
    """A gated file's input specs, checked (:func:`check_inputs`): its ``inputs`` record, else
    the ``input_shape`` of a file from before dtypes were recorded.

    Raises:
        CheckpointError: neither is there, or the one read does not pass the check.
    """
    if payload.get("inputs") is not None:
        return check_inputs(payload["inputs"], arch_shape)
    if payload.get("input_shape") is not None:
        return check_inputs(payload["input_shape"], arch_shape, "input_shape")
    raise CheckpointError("a gated checkpoint without its inputs record (nor input_shape)")
