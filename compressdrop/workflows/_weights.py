"""What a model file's weights take in memory once loaded in float32, read from the file's
headers without loading it: a safetensors header lists every tensor's dtype and shape; a
``torch.save`` archive stores each storage as an entry whose size its zip directory gives, and
its ``data.pkl`` names each storage's dtype in a persistent id (read by its opcodes here, never
unpickled); a ``.pt2`` program is a zip whose entries add up; a Hugging Face folder's shards add
up. :mod:`compressdrop.workflows.memory` turns these bytes into what a job will take.

Every reader gives up (None) on a file it cannot read: the loader then says what is wrong.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._io import opened
from .._safetensors import is_safetensors
from ..errors import CompressDropError
from ..hf_files import check_shards

__all__ = ["PT2_LOADING", "Weights", "weights_of"]

# the keys under which training scripts save the model beside other state (checkpoint's own)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# the pickle's values walked at most, the storage keys each holds counted (a crafted stream of
# shared parts gives up here instead of walking without end)
_MOST_WORK = 20_000_000
#: the peak of loading a ``.pt2`` program (checked, loaded, unlifted, in float32) over its
#: weights: the slope between torchvision's ResNet-18 and ResNet-152 exported with a dynamic
#: batch, 167 MB and 835 MB peak for 45 MB and 235 MB (a state dict of them: 2.0×, the dict and
#: the module), torch 2.13, 2026-12-07
PT2_LOADING = 3.5
_FLOAT_STORAGES = {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage"}


@dataclass(frozen=True)
class Weights:
    """A model file's tensors in float32 bytes: ``model``, those of the model it loads as;
    ``loading``, what is held at once while it loads: a file's tensors are read whole (a
    training script's save with its optimizer's state beside the model's) before the model is
    built from them, so both are held (a pickled module is read as itself); a folder's shards
    go into the model one by one."""

    model: int
    loading: int


def weights_of(path: str | Path) -> Weights | None:
    """The float32 bytes of the weights in the model file or Hugging Face folder at ``path``
    (floating-point tensors counted at 4 bytes an element, as the CLI's jobs convert them;
    others as stored), or None where the files do not say (a legacy ``torch.save`` file counts
    at its size)."""
    p = Path(path)
    try:
        if p.is_dir():
            if not (p / "config.json").is_file():
                return None
            total = 0
            for shard in check_shards(p):
                with opened(shard) as f:
                    if not is_safetensors(f):
                        return None
                    total += _safetensors(f)
            return Weights(total, total)
        with opened(p) as f:
            if f.read(4) == b"PK\x03\x04":
                return _archive(f)
            if is_safetensors(f):
                n = _safetensors(f)
                return Weights(n, 2 * n)
            size = os.fstat(f.fileno()).st_size
            return Weights(size, 2 * size)
    except (CompressDropError, OSError, ValueError, zipfile.BadZipFile, RecursionError):
        return None
    except (KeyError, TypeError, AttributeError):  # a header of another shape than the format's
        return None


def _safetensors(f: BinaryIO) -> int:
    """The float32 bytes of the tensors a safetensors header lists (``F16``, ``BF16``, ``F64``,
    the ``F8`` kinds: floating point)."""
    f.seek(0)
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        floating = str(entry["dtype"]).startswith(("F", "BF"))
        total += 4 * math.prod(entry["shape"]) if floating else int(end) - int(begin)
    return total


def _archive(f: BinaryIO) -> Weights | None:
    """A zip archive: a ``torch.save`` file's storages (by its ``data.pkl``), else (a ``.pt2``
    program) every entry as stored."""
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if not pkl:  # a .pt2 program
            total = sum(i.file_size for i in infos)
            return Weights(total, int(PT2_LOADING * total))
        root = pkl[0].filename.rpartition("/")[0]
        sizes = {
            i.filename.removeprefix(f"{root}/data/"): i.file_size
            for i in infos
            if i.filename.startswith(f"{root}/data/")
        }
        try:
            found = _storages(z.read(pkl[0])) if pkl[0].file_size <= 1 << 30 else None
        except (ValueError, KeyError, IndexError, TypeError):  # not the shape torch writes
            found = None
    if found is None:  # its storages as stored
        return Weights(sum(sizes.values()), 2 * sum(sizes.values()))
    storages, model_keys, built = found

    def f32(keys: set[str]) -> int:
        return sum(
            4 * storages[k][1] if storages[k][0] in _FLOAT_STORAGES else sizes.get(k, 0)
            for k in keys
            if k in storages
        )

    model = f32(model_keys)
    return Weights(model, (model if built else 0) + f32(set(storages)))


class _Value:
    """A value on the pickle machine's stack: the storage keys it holds, its string (a name, a
    key), its items (a tuple's) and, for a dict, the storage keys under each string key."""

    __slots__ = ("items", "keys", "named", "text")

    def __init__(self, keys: set[str] | None = None, text: str | None = None) -> None:
        self.keys: set[str] = keys or set()
        self.text = text
        self.items: list[_Value] = []
        self.named: dict[str, set[str]] = {}


_MARK = _Value()
_IN_PLACE = {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD"}


def _storages(pkl: bytes) -> tuple[dict[str, tuple[str, int]], set[str], bool] | None:
    """From a ``torch.save`` pickle, by its opcodes: each storage's type name and element count
    by key, and the keys of the model's (under the first of the wrapper keys that holds any, as
    the loader unwraps a training script's save; else all), and whether the model is built from
    them (a dict: a state dict, a checkpoint) or is the object itself (a pickled module). None
    where the stream is not the plain shape torch writes."""
    stack: list[_Value] = []
    memo: dict[int, _Value] = {}
    storages: dict[str, tuple[str, int]] = {}
    work = 0
    for op, arg, _ in pickletools.genops(io.BytesIO(pkl)):
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg or 0)] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg or 0)])
            continue
        if name == "STOP":
            break
        items = _pop(op, stack)
        work += 1 + sum(len(v.keys) for v in items)
        if work > _MOST_WORK:
            return None
        if name in _IN_PLACE:  # the container (first) stays itself, as the memo holds it
            target, args = items[0], items[1:]
            if name.startswith("SETITEM"):
                for k, v in zip(args[0::2], args[1::2], strict=True):
                    if k.text is not None:
                        target.named[k.text] = v.keys
            for v in args:
                target.keys |= v.keys
            stack.append(target)
            continue
        if name == "BINPERSID":  # ("storage", type, key, location, elements)
            pid = [v.text for v in items[0].items]
            if len(pid) != 5 or pid[0] != "storage" or pid[2] is None or pid[4] is None:
                return None
            storages[pid[2]] = (str(pid[1]).rpartition(" ")[2], int(pid[4]))
            stack.append(_Value({pid[2]}))
            continue
        if name == "STACK_GLOBAL":
            text: str | None = " ".join(str(v.text) for v in items)
        else:
            text = str(arg) if isinstance(arg, str | int) and not isinstance(arg, bool) else None
        for after in op.stack_after:
            if after.name == "mark":
                stack.append(_MARK)
                continue
            v = _Value(set().union(*(i.keys for i in items)), text)
            v.items = items if name.startswith("TUPLE") else []
            stack.append(v)
    top = stack[-1] if stack else _Value()
    for key in _WRAPPER_KEYS:
        if top.named.get(key):
            return storages, top.named[key], True
    return storages, set(storages), bool(top.named)


def _pop(op: pickletools.OpcodeInfo, stack: list[_Value]) -> list[_Value]:
    """The values ``op`` takes from ``stack`` (marks left out), taken off it."""
    before = [a.name for a in op.stack_before]
    items: list[_Value] = []
    if "mark" in before:
        i = len(stack) - 1
        while stack[i] is not _MARK:
            i -= 1
        items = stack[i + 1 :]
        del stack[i:]
        before = before[: before.index("mark")]
    if before:
        items = stack[-len(before) :] + items
        del stack[-len(before) :]
    return items
