"""``torch.load`` with compressdrop's safety rules: weights only unless the caller trusts the
file, and clear errors for missing, damaged, foreign and pickled files."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ._torchvision import retry_with_torchvision
from .errors import CheckpointError

__all__ = ["load_checkpoint"]

# torch.save writes a zip archive; files from torch < 1.6 (or _use_new_zipfile_serialization=False)
# start with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1 of 10 bytes).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> Any:
    """``torch.load`` with the safety rules: weights only unless ``trust_code``; clear errors.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch file, is corrupt or truncated, or
            holds pickled objects (refused unless ``trust_code``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC) and path.suffix == ".onnx":
        raise CheckpointError(
            f"{path}: an ONNX model; this needs the PyTorch model it came from (a compressdrop "
            "checkpoint, a .pt2 program, a state_dict or a Hugging Face folder). "
            "`compressdrop eval` reads ONNX files"
        )
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): it starts with neither "
            "a zip header nor the legacy torch.save magic number"
        )
    try:
        with warnings.catch_warnings():
            # a damaged pickle stream makes torch warn about odd protocol numbers before failing
            warnings.simplefilter("ignore", UserWarning)
            if trust_code:  # a pickled torchvision model imports torchvision
                return retry_with_torchvision(
                    lambda: torch.load(path, map_location="cpu", weights_only=False)
                )
            with torch.serialization.safe_globals(_inert_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
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


def _inert_globals() -> list:
    """Classes and functions a training script's save commonly names beside its weights, which
    the weights-only unpickler may build without running anything from the file: numpy scalars
    and arrays (``best_acc = np.float64(...)``), an ``argparse.Namespace`` of the script's
    arguments and the paths in it. Each is taken from this table, never imported by the name the
    file gives; its construction only stores data (a numpy array of objects holds what the
    stream builds under the same rules)."""
    import argparse
    import pathlib

    import numpy as np

    # numpy 2 pickles as numpy._core, numpy 1 as numpy.core: both names are allowed below
    core = getattr(np, "_core", None) or np.core
    scalar, reconstruct = core.multiarray.scalar, core.multiarray._reconstruct
    allowed: list = [np.dtype, np.ndarray, argparse.Namespace]
    allowed += [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    allowed += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "?")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # saved by either numpy
        allowed += [(scalar, f"{mod}.scalar"), (reconstruct, f"{mod}._reconstruct")]
    return allowed


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
