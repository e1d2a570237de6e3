"""Where a ``.pt2`` comes from: a path, an open binary file or its bytes; whether a path is one,
and its bytes, each read through one open file that a FIFO or a device cannot block."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

from .._io import opened
from ..errors import CheckpointError

__all__ = ["Source", "is_pt2", "read_source"]

#: what the readers take: a path, or an open binary file
Source = str | Path | IO[bytes]


def is_pt2(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.export`` archive (a zip holding ``*/archive_format``).

    Args:
        path: the file to look at; only its zip directory is read.

    Returns:
        True for a ``.pt2`` archive; False for anything else, including an unreadable file and
        one that is no regular file (a FIFO: its open blocked ``load_model`` without end).
    """
    try:
        with opened(Path(path)) as f, zipfile.ZipFile(f) as z:
            return any(n.endswith("/archive_format") for n in z.namelist())
    except (CheckpointError, zipfile.BadZipFile, OSError):
        return False


def read_source(src: Source | bytes, where: str | None) -> tuple[bytes, str]:
    """The archive's bytes and its name for messages.

    Raises:
        CheckpointError: a path that is missing, unreadable or no regular file.
    """
    if isinstance(src, bytes):
        return src, where or "embedded program"
    if isinstance(src, str | Path):
        with opened(Path(src)) as f:
            return f.read(), where or str(src)
    return src.read(), where or "program"
