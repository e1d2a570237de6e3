"""A user's ``.npz`` of arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``) as a
:class:`Dataset`.

Everything a file gets wrong is refused here, at load time, in a :class:`DataError` that names
the file and the array: a file that is not an ``np.savez`` archive, arrays that would need
unpickling, NaN or infinite inputs, half a test split. Labels that a model cannot be trained on
(not every one of ``0..K-1``, one class) are refused by :func:`check_trainable`, before training:
an evaluation or out-of-distribution file may hold a subset of the classes.
Channels-last images are transposed with a :class:`DataWarning`, and ``uint8`` pixels scaled to
[0, 1], as the built-in image data are.
"""

from __future__ import annotations

import math
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset, DataWarning, _split

__all__ = ["check_trainable", "load_npz"]

_ARRAYS = ("x", "y", "x_test", "y_test")
_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA: a last axis of this size marks channels-last images
# What reading a damaged archive member raises (besides numpy's ValueError).
_DAMAGED = (OSError, EOFError, zipfile.BadZipFile, zlib.error)
#: how far a compressed array may expand: 100 times its compressed bytes, plus 256 MB for any
#: array (``np.savez`` stores arrays uncompressed; ``np.savez_compressed`` of real data shrinks
#: them a few times); 2 MB of deflated zeros made a 2 GB array
_RATIO, _ANY_BYTES = 100, 256 << 20


def _preview(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:6])) + (", …" if len(values) > 6 else "")


def _rows(bad: np.ndarray) -> int:
    """How many examples (rows of the leading axis) hold at least one flagged value."""
    return int(bad.reshape(len(bad), -1).any(axis=1).sum())


def _refuse_pickle(path: Path, what: str) -> DataError:
    # numpy's own message suggests allow_pickle=True, which runs whatever code the file holds
    return DataError(
        f"{path}: {what}; compressdrop never unpickles data (that can run code). Save plain "
        f"numeric arrays: np.savez({path.name!r}, x=x, y=y), with y an integer array "
        f"(e.g. np.asarray(y, dtype=np.int64))"
    )


def _read(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays by name, read without pickles."""
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):  # not a zip, not an .npy: numpy took it for a pickle
            raise _refuse_pickle(
                path, "not a readable .npz file (not a zip of .npy arrays, as np.savez writes)"
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    except (*_DAMAGED, UnicodeError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: not a readable .npz file: it holds one array (an .npy file), not the "
            f"named arrays 'x' and 'y'; write it with np.savez({path.name!r}, x=x, y=y)"
        )
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {missing}; expected 'x' and 'y' (found {z.files})"
            )
        arrays = {}
        for k in _ARRAYS:
            if k not in z.files:
                continue
            assert z.zip is not None  # open until the with block ends
            _check_size(path, z.zip, k)
            try:
                a = z[k]
            except MemoryError as e:  # numpy's _ArrayMemoryError among them
                raise DataError(f"{path}: array {k!r} does not fit in memory ({e})") from None
            except ValueError as e:
                if "pickle" in str(e):
                    raise _refuse_pickle(
                        path, f"array {k!r} holds Python objects (dtype=object)"
                    ) from None
                raise DataError(f"{path}: array {k!r} is damaged ({e})") from None
            except _DAMAGED as e:
                raise DataError(f"{path}: array {k!r} is damaged ({e})") from None
            if not isinstance(a, np.ndarray):  # a zip member that is not an .npy
                raise DataError(f"{path}: {k!r} is not an .npy array; write the file with np.savez")
            arrays[k] = a
    given = [k for k in ("x_test", "y_test") if k in arrays]
    if len(given) == 1:
        (other,) = {"x_test", "y_test"} - set(given)
        raise DataError(
            f"{path}: has {given[0]!r} but no {other!r}; give both (they are the test split) or "
            f"neither (then a stratified split of x is held out)"
        )
    return arrays


def _check_size(path: Path, archive: zipfile.ZipFile, key: str) -> None:
    """Refuse, before numpy allocates it, an array whose header declares more bytes than its
    member holds, or a member that expands past :data:`_RATIO` times its compressed size plus
    :data:`_ANY_BYTES`."""
    names = archive.namelist()
    if key in names and f"{key}.npy" in names:  # numpy reads the first, which went unchecked
        raise DataError(
            f"{path}: two members hold array {key!r} ({key!r} and '{key}.npy'); write the file "
            "with np.savez"
        )
    member = key if key in names else f"{key}.npy"  # the member numpy reads for ``z[key]``
    info = archive.getinfo(member)
    if info.file_size > _RATIO * info.compress_size + _ANY_BYTES:
        raise DataError(
            f"{path}: array {key!r} expands from {info.compress_size:,} to {info.file_size:,} "
            f"bytes, more than {_RATIO} times (a zip bomb?); save it with np.savez (uncompressed)"
        )
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            # (3.0 is for structured dtypes' unicode names, refused anyway)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            header = read(f) if read is not None else None
    except (ValueError, *_DAMAGED) as e:
        raise DataError(f"{path}: array {key!r} is damaged ({e})") from None
    if header is None:
        raise DataError(f"{path}: array {key!r}: .npy format version {version} is not read here")
    shape, _, dtype = header
    size = math.prod(shape) * dtype.itemsize
    if size > info.file_size:  # numpy would allocate it all, then find the data short
        raise DataError(
            f"{path}: array {key!r} declares shape {shape} of {dtype} ({size:,} bytes) but its "
            f"file holds {info.file_size:,} bytes"
        )


def _inputs(path: Path, x: np.ndarray, name: str, pixels: bool) -> tuple[np.ndarray, bool]:
    """``x`` as float32 ``(N, D)`` or ``(N, C, H, W)`` (``pixels``: scaled by 1/255), and
    whether it was channels-last."""
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{path}: {name} must be (N, D), (N, H, W) or (N, C, H, W) (or (N, H, W, C) with C "
            f"1, 3 or 4), got shape {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise DataError(f"{path}: {name} must hold real numbers, got dtype {x.dtype}")
    if len(x) == 0:
        raise DataError(f"{path}: {name} has no examples (shape {x.shape})")
    channels_last = x.ndim == 4 and x.shape[3] in _CHANNELS and x.shape[1] not in _CHANNELS
    if x.ndim == 3:
        x = x[:, None]  # (N, 1, H, W)
    elif channels_last:
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            nan = int(np.isnan(x).sum())
            raise DataError(
                f"{path}: {name} has {int(bad.sum())} non-finite values ({nan} NaN, "
                f"{int(bad.sum()) - nan} ±Inf) in {_rows(bad)} of its {len(x)} examples; "
                f"replace them, or drop those examples "
                f"(keep = np.isfinite({name}).reshape(len({name}), -1).all(1))"
            )
    try:
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(x, dtype=np.float32)
    except MemoryError as e:  # numpy's _ArrayMemoryError among them
        raise DataError(f"{path}: {name} does not fit in memory as float32 ({e})") from None
    if pixels:
        out /= 255.0  # pixels in [0, 1], like digits, Fashion-MNIST and image folders
    big = ~np.isfinite(out)
    if big.any():  # float64 values past float32's range (about 3.4e38)
        raise DataError(
            f"{path}: {name} has {int(big.sum())} values too large for float32 in "
            f"{_rows(big)} of its {len(x)} examples; rescale {name}"
        )
    return out, channels_last


def _labels(path: Path, y: np.ndarray, n: int, name: str) -> np.ndarray:
    """``y`` as an int64 vector of ``n`` labels, none negative."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{path}: {name} must be a vector of {n} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {name} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: labels must be ≥ 0; {name} has {int(y.min())}")
    return y


def _num_classes(y: np.ndarray, y_test: np.ndarray | None) -> int:
    """K: one more than the largest label (checked for training by :func:`check_trainable`;
    an evaluation or out-of-distribution file may hold a subset of the classes, or one)."""
    top = int(y.max()) if len(y) else 0
    return max(top, int(y_test.max()) if y_test is not None and len(y_test) else 0) + 1


def check_trainable(ds: Dataset) -> None:
    """Refuse, before a model is built and trained on them, labels that are not every one of
    ``0..K-1`` in the training split (a model would get an output per missing label), a single
    class, and test labels the training split never has.

    Raises:
        DataError: naming the data set and what to do.
    """
    if ds.task != "classify":
        return
    seen = np.unique(ds.y_train.numpy())
    tested = np.unique(ds.y_test.numpy())
    if len(seen) < 2:
        raise DataError(
            f"{ds.name}: the training labels have only one class ({int(seen[0])}); "
            "classification needs at least 2"
        )
    extra = np.setdiff1d(tested, seen)
    if len(extra):
        raise DataError(
            f"{ds.name}: the test labels have {_preview(extra)} that the training labels never "
            "have; a model cannot learn a class it is not trained on: move some of those "
            "examples into the training split, or drop them from the test split"
        )
    if len(seen) != ds.num_classes and ds.classes:  # a folder labelled by a model's classes
        missing = [ds.classes[i] for i in np.setdiff1d(np.arange(ds.num_classes), seen)]
        raise DataError(
            f"{ds.name}: the model's classes {', '.join(missing[:6])} have no training images "
            f"here ({len(seen)} of its {ds.num_classes} classes do); training needs every class "
            "it gives an output for: add a folder for each"
        )
    if len(seen) != ds.num_classes:
        unseen = np.setdiff1d(np.arange(ds.num_classes), seen)
        raise DataError(
            f"{ds.name}: labels must be 0..K-1 with every class in the training split, but it "
            f"has {len(seen)} distinct labels ({_preview(seen)}) and lacks {len(unseen)} of "
            f"0..{ds.num_classes - 1} ({_preview(unseen)}): the model would get "
            f"{ds.num_classes} outputs; renumber them, e.g. classes, y = np.unique(y, "
            "return_inverse=True)"
        )


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's ``.npz`` with arrays ``x`` and ``y``, and optionally ``x_test`` and ``y_test``.

    ``x`` may be (N, D) features, (N, H, W) images or (N, C, H, W) images; a 4-D ``x`` whose last
    axis is 1, 3 or 4 while its second is not is taken for channels-last (N, H, W, C) and
    transposed, with a :class:`DataWarning`. A ``uint8`` ``x`` holds pixels: it and ``x_test``
    are scaled by 1/255 to [0, 1], as digits, Fashion-MNIST and image folders are (store other
    features as floats); other dtypes are used as they are (as float32). ``y`` holds integer
    labels ≥ 0; K is one more than the largest. To train on it, every one of ``0..K-1`` must be in
    the training split, K ≥ 2, and no test label beyond them (:func:`check_trainable`). Without
    test arrays, a seeded, stratified split holds out ``test_fraction`` of the examples.

    Args:
        path: the ``.npz`` file (as ``np.savez`` writes it; read without pickles).
        test_fraction: share held out for testing when the file has no test arrays.
        seed: of that split.

    Returns:
        The :class:`Dataset`, named after the file.

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is not an ``.npz`` archive, needs unpickling, lacks ``x`` or ``y``,
            has only one of ``x_test`` and ``y_test``; an array has the wrong shape or dtype;
            ``x`` holds NaN or infinite values; a label is negative.

    Example:
        >>> np.savez("my.npz", x=images_uint8_nhwc, y=labels)  # doctest: +SKIP
        >>> load_npz("my.npz").input_shape  # doctest: +SKIP
        (3, 32, 32)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    arrays = _read(path)
    pixels = arrays["x"].dtype == np.uint8  # the training array decides, for both splits
    x, moved = _inputs(path, arrays["x"], "x", pixels)
    y = _labels(path, arrays["y"], len(x), "y")
    if "x_test" in arrays:
        xte, moved_test = _inputs(path, arrays["x_test"], "x_test", pixels)
        yte = _labels(path, arrays["y_test"], len(xte), "y_test")
        num_classes = _num_classes(y, yte)
        xtr, ytr = x, y
    else:
        moved_test = False
        num_classes = _num_classes(y, None)
        xtr, xte, ytr, yte = _split(x, y, test_fraction, seed, where=str(path))
    if moved or moved_test:
        names = " and ".join(n for n, m in (("x", moved), ("x_test", moved_test)) if m)
        warnings.warn(
            f"compressdrop: {path}: {names} read as channels-last images (N, H, W, C) and "
            f"transposed to (N, C, H, W) = (N, {', '.join(map(str, xtr.shape[1:]))}); save "
            f"them as (N, C, H, W) to be rid of this warning",
            DataWarning,
            stacklevel=2,
        )
    try:
        return Dataset(
            path.stem,
            torch.from_numpy(xtr),
            torch.from_numpy(ytr),
            torch.from_numpy(xte),
            torch.from_numpy(yte),
            num_classes,
        )
    except DataError as e:  # x and x_test shapes that differ: name the file
        raise DataError(f"{path}: {e}") from None
