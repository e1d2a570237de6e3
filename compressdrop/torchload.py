"""``torch.load`` with compressdrop's safety rules: weights only unless the caller trusts the
file, and clear errors for missing, damaged, foreign and pickled files."""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._io import inflated, opened, opened_path
from ._pickled import MOST_VALUES, archive_problem
from ._safetensors import is_safetensors, load_safetensors
from ._torchvision import retry_with_torchvision
from .errors import CheckpointError

__all__ = ["load_checkpoint"]

# torch.save writes a zip archive; files from torch < 1.6 (or _use_new_zipfile_serialization=False)
# start with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1 of 10 bytes).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> Any:
    """``torch.load`` with the safety rules: weights only unless ``trust_code``; clear errors.

    A safetensors file (``safetensors.torch.save_file``) is read as the ``state_dict`` it holds.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch or safetensors file, is corrupt or
            truncated, or holds pickled objects (refused unless ``trust_code``).
    """
    path = Path(path)
    with opened(path) as f:  # every check below, and torch's read, see this one file
        return _load(f, path, trust_code)


def _load(f: BinaryIO, path: Path, trust_code: bool) -> Any:
    """:func:`load_checkpoint` of the file ``f`` opened at ``path``."""
    head = f.read(len(_LEGACY_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC) and path.suffix == ".onnx":
        raise CheckpointError(
            f"{path}: an ONNX model; this needs the PyTorch model it came from (a compressdrop "
            "checkpoint, a .pt2 program, a state_dict or a Hugging Face folder). "
            "`compressdrop eval` reads ONNX files"
        )
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC) and is_safetensors(f):
        return load_safetensors(path, opened_path(f, path))  # tensors only, no pickle
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): it starts with neither "
            "a zip header nor the legacy torch.save magic number"
        )
    if head.startswith(_ZIP_MAGIC) and _is_npz(f):
        raise CheckpointError(
            f"{path}: a NumPy .npz file (arrays, no model); data goes to --data (Python: "
            "load_dataset), a model is a compressdrop checkpoint, a .pt2 program, a state_dict "
            "or a Hugging Face folder"
        )
    bomb = _zip_bomb(f) if head.startswith(_ZIP_MAGIC) else None
    if bomb:
        raise CheckpointError(f"{path}: refused: {bomb}")
    # read by its opcodes first: the unpickler's plain data can cost without end while it is
    # built (a key of shared nested tuples hashed in one C call, deaf to Ctrl-C)
    unbounded = None if trust_code else archive_problem(f)
    if unbounded:
        raise CheckpointError(f"{path}: refused: {unbounded}")
    f.seek(0)
    try:
        with warnings.catch_warnings():
            # a damaged pickle stream makes torch warn about odd protocol numbers before failing
            warnings.simplefilter("ignore", UserWarning)
            if trust_code:  # a pickled torchvision model imports torchvision
                return retry_with_torchvision(
                    lambda: torch.load(_rewound(f), map_location="cpu", weights_only=False)
                )
            with torch.serialization.safe_globals(_inert_globals()):
                loaded = torch.load(f, map_location="cpu", weights_only=True)
            _check_tree(loaded, path)
            return _arrays_in(loaded)
    except pickle.UnpicklingError as e:
        refused = re.search(r"compressdrop refuses [^\n]*", str(e))
        if refused and not trust_code:
            raise CheckpointError(
                f"{path}: {refused.group(0).removeprefix('compressdrop refuses ')} was refused: "
                "beside its weights compressdrop reads numpy numbers, booleans and strings of "
                "plain dtypes (their arrays and scalars) in numpy's own pickled form; save other "
                "data as tensors or plain Python values, or pass trust_code=True (CLI: "
                "--trust-code) if you trust the file's source"
            ) from None
        # The weights-only unpickler says "Unsupported global" when the stream is well formed but
        # names a class or function; every other failure of it means a damaged stream.
        named = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        # (or a class the stream builds that is not allowed: a numpy array of objects)
        named = named or re.search(r"add_safe_globals`?, but got <class '([\w.]+)'>", str(e))
        if not trust_code and (named or "unrecognized function" in str(e)):
            what = f" (it names {named.group(1)})" if named else ""
            raise CheckpointError(
                f"{path}: the file holds pickled Python objects{what}, for example a whole "
                "nn.Module saved with torch.save(model); loading it would run arbitrary code, so "
                "it was refused. If you trust its source, pass trust_code=True (CLI: "
                "--trust-code, or its alias --trust-pickle); "
                "better, save a compressdrop checkpoint or a state_dict."
            ) from None
        # (torch's message opens with advice to load the file with weights_only=False, which
        # would run its code: only its last part, the unpickler's own error, is passed on)
        cause = str(e).rpartition("WeightsUnpickler error:")[2] or _without_advice(str(e))
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({_first_line(cause)})"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:
        # With weights_only=True no code from the file runs, so any other exception comes from a
        # damaged stream (torch's unpickler raises IndexError, KeyError, UnicodeDecodeError, ...).
        # With trust_code the file's own code may raise anything: the message says which.
        if trust_code and isinstance(e, ImportError | AttributeError):
            raise CheckpointError(
                f"{path}: the pickled objects need their classes' code, which cannot be "
                f"imported here ({type(e).__name__}: {_first_line(e)}); make the package that "
                "defines them importable (install it, or set PYTHONPATH)"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None


def _zip_bomb(f: BinaryIO) -> str | None:
    """:func:`~compressdrop._io.inflated` of the archive ``f``, torch's reader's sizes against
    Python's; an archive Python cannot read is refused too (torch's reader takes some that
    Python's refuses, whose sizes then go unchecked)."""
    try:
        reader = torch._C.PyTorchFileReader(_rewound(f))
        sizes = {r: reader.get_record_size(r) for r in reader.get_all_records()}
    except RuntimeError:
        return None  # not an archive torch reads: torch.load says what is wrong
    try:
        with zipfile.ZipFile(_rewound(f)) as z:  # (it leaves a file it was given open)
            return inflated(z.infolist(), sizes)
    except (zipfile.BadZipFile, OSError) as e:
        return f"its zip directory is damaged or crafted ({e})"


def _is_npz(f: BinaryIO) -> bool:
    """Whether ``f`` is a zip of ``.npy`` arrays only (``numpy.savez``), not a torch archive."""
    try:
        with zipfile.ZipFile(_rewound(f)) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _rewound(f: BinaryIO) -> BinaryIO:
    f.seek(0)
    return f


def _inert_globals() -> list:
    """What a training script's save commonly holds beside its weights, for the weights-only
    unpickler: numpy scalars and arrays of numbers, booleans and strings (``best_acc =
    np.float64(...)``, ``np.random.get_state()``), an ``argparse.Namespace`` of the script's
    arguments and the paths in it. None of numpy's own constructors is handed to the unpickler:
    ``numpy.dtype``, ``ndarray`` and ``scalar`` are stand-ins of this module that accept only a
    plain dtype in its canonical pickled state and a buffer of exactly its size (a dtype's state
    can claim object items or fields over any memory; ``ndarray(shape, "O", buffer)`` reads
    pointers from the file), so what the file can build is data. Nothing is imported by the
    names the file gives."""
    import argparse
    import pathlib

    allowed: list = [(_Dtype, "numpy.dtype"), (_NdarrayName, "numpy.ndarray"), _Dtype, _Array]
    allowed += [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
    allowed += [pathlib.PureWindowsPath]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # saved by either numpy
        allowed += [(_scalar, f"{mod}.scalar"), (_reconstruct, f"{mod}._reconstruct")]
    return allowed


class _Refused(pickle.UnpicklingError):
    """numpy data the stand-ins do not build (its message says what)."""


# plain dtypes only: booleans, integers, floats, complex numbers, fixed-size strings
_PLAIN_DTYPE = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[US]\d{1,6})")


class _Dtype:
    """Stands in for ``numpy.dtype`` while a checkpoint loads: a plain dtype from its spec, whose
    pickled state must be the one numpy writes for it (any other is refused)."""

    __slots__ = ("dtype",)  # no __dict__: a Namespace cannot be turned into one

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        import numpy as np

        if not (isinstance(spec, str) and _PLAIN_DTYPE.fullmatch(spec)):
            raise _Refused(f"compressdrop refuses numpy dtype {spec!r}")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"compressdrop refuses numpy dtype {self.dtype.str!r}: odd state")
        dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype
        if state != dtype.__reduce__()[2]:  # flags, fields, names, sizes: numpy's own only
            raise _Refused(f"compressdrop refuses numpy dtype {self.dtype.str!r}: odd state")
        self.dtype = dtype


class _NdarrayName:
    """Stands in for ``numpy.ndarray`` as the class ``_reconstruct`` names; never built."""

    def __init__(self, *args: Any) -> None:
        raise _Refused("compressdrop refuses to build numpy.ndarray from a file's arguments")


class _Array:
    """Stands in for the array ``numpy._core.multiarray._reconstruct`` makes; its state (shape,
    a plain dtype, order, raw bytes of exactly that size) builds ``value``, a copy."""

    __slots__ = ("value",)

    def __setstate__(self, state: Any) -> None:
        import numpy as np

        odd = _Refused("compressdrop refuses a numpy array whose pickled state is odd")
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise odd
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise odd
        if not (isinstance(dtype, _Dtype) and isinstance(fortran, bool)):
            raise odd
        if not (isinstance(raw, bytes) and len(raw) == math.prod(shape) * dtype.dtype.itemsize):
            raise odd
        flat = np.frombuffer(raw, dtype=dtype.dtype)
        self.value = flat.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NdarrayName:
        raise _Refused("compressdrop refuses numpy _reconstruct of anything but an ndarray")
    return _Array()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    import numpy as np

    if not (isinstance(dtype, _Dtype) and isinstance(raw, bytes)):
        raise _Refused("compressdrop refuses a numpy scalar whose pickled state is odd")
    if len(raw) != dtype.dtype.itemsize:
        raise _Refused("compressdrop refuses a numpy scalar whose pickled state is odd")
    return np.frombuffer(raw, dtype=dtype.dtype)[0].copy()


# the most values a file's data may unfold into when walked as a tree (MOST_VALUES): a part
# shared by several containers (pickle keeps it shared) counts once per place it sits; 60 levels
# of x = [x, x], a 2 KB file, unfold into 2**60


def _check_tree(obj: Any, path: Path) -> None:
    """Refuse data whose walk as a tree (here, and by the readers of its records) would not end:
    more than :data:`MOST_VALUES` values once shared parts are counted where they sit; and a
    tensor that views more values than its storage holds (a stride-0 view of one byte as a
    billion: copying it, as the bytes of an embedded program are, took gigabytes)."""
    import argparse

    counted: dict[int, int] = {}

    def values(x: Any, depth: int) -> int:
        if id(x) in counted:
            return counted[id(x)]
        counted[id(x)] = 1  # (a cycle counts once)
        if isinstance(x, torch.Tensor):
            if x.numel() * x.element_size() > x.untyped_storage().nbytes():
                raise CheckpointError(
                    f"{path}: refused: a tensor of {x.numel():,} values over a storage of "
                    f"{x.untyped_storage().nbytes():,} bytes (it views the same bytes many times)"
                )
            return 1
        parts = (
            [*x.keys(), *x.values()] if isinstance(x, dict)
            else vars(x).values() if isinstance(x, argparse.Namespace)
            else x if isinstance(x, list | tuple)
            else ()
        )  # fmt: skip
        n = 1
        for part in parts if depth < 100 else ():
            n += values(part, depth + 1)
            if n > MOST_VALUES:
                raise CheckpointError(
                    f"{path}: refused: its data unfolds into more than {MOST_VALUES:,} values "
                    "(parts shared by many containers): reading it would not end"
                )
        counted[id(x)] = n
        return n

    values(obj, 0)


def _arrays_in(obj: Any, depth: int = 0) -> Any:
    """``obj`` with the stand-ins' arrays in place of the stand-ins (dicts, lists, tuples and
    Namespaces are walked; a stand-in left unbuilt, or a ``numpy.dtype`` as such, is refused)."""
    import argparse

    if depth > 100:
        return obj
    if isinstance(obj, _Array):
        if not hasattr(obj, "value"):
            raise _Refused("compressdrop refuses a numpy array without its state")
        return obj.value
    if isinstance(obj, _Dtype):
        return obj.dtype
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _arrays_in(v, depth + 1)
    elif isinstance(obj, list):
        obj[:] = [_arrays_in(v, depth + 1) for v in obj]
    elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_arrays_in(v, depth + 1) for v in obj)
    elif isinstance(obj, argparse.Namespace):
        for k, v in vars(obj).items():
            setattr(obj, k, _arrays_in(v, depth + 1))
    return obj


def _without_advice(message: str) -> str:
    """torch's weights-only message without its paragraphs of advice (to load with
    ``weights_only=False``, which would run the file's code, and to read the documentation)."""
    kept = [
        line
        for line in message.splitlines()
        if line.strip() and not line.startswith(("Weights only load failed", "Check the doc"))
    ]
    return "\n".join(kept) or "the weights-only unpickler refused it"


def _first_line(e: BaseException | str) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
