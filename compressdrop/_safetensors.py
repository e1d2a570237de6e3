"""A safetensors file (``safetensors.torch.save_file``, a Hugging Face ``model.safetensors``) read
as a ``state_dict``, checked, with no package beyond torch and no code from the file.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each
tensor's name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (an optional
``"__metadata__"`` of strings besides), then the tensors' bytes, little-endian, the offsets
counted from the end of the header.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["is_safetensors", "load_safetensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# a header longer than this is no model's (safetensors' own reader stops at 100 MB)
_MOST_HEADER = 100_000_000


def _header_length(head: bytes, size: int) -> int | None:
    """The JSON header's length if ``head`` (the file's first 9 bytes) opens a safetensors file
    of ``size`` bytes, else ``None``."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    return n if 2 <= n <= min(size - 8, _MOST_HEADER) else None


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does (a plausible header length, then
    ``{``); :func:`load_safetensors` checks the rest."""
    with path.open("rb") as f:
        head = f.read(9)
    return _header_length(head, path.stat().st_size) is not None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, by name (its metadata is left out).

    Raises:
        CheckpointError: the header is not the format's JSON, names a dtype this reader does not
            know, or gives offsets or shapes that do not fit the file (a truncated file among them).
    """
    if sys.byteorder != "little":  # the format's bytes are little-endian, torch.frombuffer's not
        raise CheckpointError(f"{path}: safetensors files are read on little-endian machines only")
    data = path.read_bytes()
    n = _header_length(data[:9], len(data))
    if n is None:
        raise CheckpointError(f"{path}: not a safetensors file (its header length is not valid)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: a damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: a damaged safetensors header (not a JSON object)")
    body = memoryview(data)[8 + n :]
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(body, name, info, path)
    return tensors


def _tensor(body: memoryview, name: str, info: object, path: Path) -> torch.Tensor:
    """One tensor of the file, its entry ``info`` checked against the data ``body``."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: its entry is not dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise CheckpointError(
            f"{where}: dtype {dtype!r} is not one compressdrop reads ({', '.join(_DTYPES)})"
        )
    if not _counts(shape, range(65)) or not _counts(offsets, (2,)):
        raise CheckpointError(f"{where}: shape or data_offsets are not lists of whole numbers")
    begin, end = offsets
    size = math.prod(shape) * _DTYPES[dtype].itemsize
    if not begin <= end <= len(body) or end - begin != size:
        raise CheckpointError(
            f"{where}: its data_offsets {offsets} do not fit its shape {shape} ({dtype}) and the "
            f"file's {len(body)} bytes of data (a truncated file?)"
        )
    raw = bytearray(body[begin:end])  # a copy the tensor owns (frombuffer shares its memory)
    if not raw:
        return torch.empty(shape, dtype=_DTYPES[dtype])
    return torch.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)


def _counts(value: object, lengths: range | tuple[int, ...]) -> bool:
    """Whether ``value`` is a JSON list of whole numbers ≥ 0 with a length in ``lengths``."""
    return (
        isinstance(value, list)
        and len(value) in lengths
        and all(type(i) is int and i >= 0 for i in value)
    )
