"""Atomic file writes: a file appears whole at its final path, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temps"]


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` with ``os.replace``.

    On any exception the temporary file is removed and ``path`` is left as it was (absent, or
    its previous content). The temporary file lives in the same directory, so the final rename
    is atomic on POSIX file systems.

    Raises:
        FileNotFoundError / PermissionError / IsADirectoryError: naming ``path`` when its
            directory is missing or not writable, or it is a directory itself.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():  # os.replace would fail at the end, naming the temporary file
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions an ordinary open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path, names: list[str]) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` leaves for ``names`` when its process
    is killed mid-write (``.NAME.*.tmp``); returns what it removed."""
    folder = Path(folder)
    gone = []
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
