"""A safetensors file (``safetensors.torch.save_file``, a Hugging Face ``model.safetensors``) read
as a ``state_dict`` by the safetensors library, which runs no code from the file and checks the
header's offsets, shapes and dtypes against the file itself; its refusals become
:class:`~compressdrop.errors.CheckpointError` naming the file.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each
tensor's name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, then the tensors' bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError

__all__ = ["is_safetensors", "load_safetensors"]

# a header longer than this is no model's (the safetensors library's own limit)
_MOST_HEADER = 100_000_000


def is_safetensors(f: BinaryIO) -> bool:
    """Whether the open file ``f`` starts as a safetensors file does: a header length that fits
    the file, then ``{``; :func:`load_safetensors` checks the rest."""
    f.seek(0)
    head = f.read(9)
    f.seek(0)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(os.fstat(f.fileno()).st_size - 8, _MOST_HEADER)


def load_safetensors(path: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, by name (its metadata is left out).
    ``name``: the path to read it by, for a file opened already (the library reads a path only:
    :func:`~compressdrop._io.opened_path`); ``path`` names it in messages.

    Raises:
        CheckpointError: the library refuses the file (a damaged header, offsets or shapes that
            do not fit the file, a truncated file), with its reason.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(name or path)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: a damaged safetensors file ({e})") from None
