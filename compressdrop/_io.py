"""Atomic file writes (a file appears whole at its final path, or not at all), and reads whose
checks and load see one file (:func:`opened`), a JSON object's bounded
(:func:`read_json_object`)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

__all__ = [
    "atomic_write",
    "inflated",
    "opened",
    "opened_path",
    "read_json_object",
    "read_within",
    "remove_stale_temps",
]


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


@contextlib.contextmanager
def opened(path: Path, error: type[Exception] = CheckpointError) -> Iterator[BinaryIO]:
    """``path`` opened once, so that the checks of a file and the library's read of it see the
    same file: a link is followed at this open only (a user's ``model.pt`` may be a link, a Hub
    cache's files are), and a link retargeted, or another file renamed over ``path``, after it
    changes nothing read through the handle. A file rewritten in place by a process that may
    write it still can change under the handle: that is its owner's file to give.

    Raises:
        CheckpointError (or ``error``): ``path`` is missing, unreadable or no regular file (a
            folder, a FIFO, which is refused without blocking on it, a device).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path}: not a file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        yield f


def opened_path(f: BinaryIO, path: Path) -> str:
    """A name for the file :func:`opened` holds, for a library that reads a path only: on Linux
    ``/proc/self/fd/N``, which opens that same file whatever ``path`` names by now; elsewhere
    ``path`` itself."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else str(path)


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


def read_json_object(
    path: Path, limit: int, error: type[Exception] = CheckpointError, beyond: str = ""
) -> dict[str, Any]:
    """The JSON object in the file at ``path``: opened once (:func:`opened`: a regular file, a
    FIFO refused without blocking), at most ``limit`` bytes read, parsed as data.

    Raises:
        CheckpointError (or ``error``): the file is missing, no regular file, over ``limit``
            bytes ("over N MB" and ``beyond``, what such a size says of it), not JSON (with the
            parser's reason), or JSON of another kind than an object.
    """
    with opened(path, error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: over {limit >> 20} MB" + (f", {beyond}" if beyond else ""))
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object")
    return value


def read_within(src: Path, roots: list[Path], limit: int) -> bytes | str:
    """The bytes of ``src`` where it is a regular file of at most ``limit`` bytes inside one of
    ``roots`` once its links are followed (a link into the Hugging Face cache's ``blobs`` is;
    ``/etc/passwd`` or ``/proc/self/pagemap`` is not), else why not. The file is opened without
    following a link, not blocking on a FIFO, and the file opened is checked again (where the
    system says which it is), so that a link swapped in between is not read."""
    real = src.resolve()
    inside = lambda p: any(p.is_relative_to(r.resolve()) for r in roots)  # noqa: E731
    if not inside(real):
        return f"it links outside the model's folder (to {real})"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        return f"it cannot be opened as a file ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.is_symlink() and not inside(Path(os.readlink(opened))):
            return "it changed while it was read"
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return f"it is not a regular file of at most {limit >> 20} MB"
        return f.read(limit + 1)[:limit]


def inflated(
    infos: list[zipfile.ZipInfo],
    torch_sizes: Mapping[str, int],
    ratio: int = 100,
    allowance: int = 1 << 20,
) -> str | None:
    """The first entry (``infos``: Python's zip directory) that expands more than ``ratio`` times its compressed size (plus
    ``allowance``), as what is wrong: a zip bomb (``torch.save`` and ``torch.export.save`` store
    their entries uncompressed; a 1 MB crafted file loaded as a 1 GB tensor); or one whose size
    torch's reader sees otherwise (``torch_sizes``: its records, named below the archive's root
    folder), which a second central directory for one reader alone makes; else None."""
    python = {i.filename.partition("/")[2]: i.file_size for i in infos}
    if any(python.get(name) != size for name, size in torch_sizes.items()):
        return "torch's zip reader and Python's see other entries or sizes"
    if len({i.header_offset for i in infos}) != len(infos):  # entries sharing one record's data
        return "entries share their data (a zip bomb?)"
    total, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
    if total > ratio * packed + allowance:  # many entries, each under the bound
        return f"its entries expand from {packed:,} to {total:,} bytes (a zip bomb?)"
    for info in infos:
        if info.file_size > ratio * info.compress_size + allowance:
            return (
                f"its entry {info.filename!r} expands from {info.compress_size:,} to "
                f"{info.file_size:,} bytes (a zip bomb?)"
            )
    return None
