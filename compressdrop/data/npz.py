"""A user's ``.npz`` of arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``) as a
:class:`Dataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset, _split

__all__ = ["load_npz"]


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's ``.npz`` with arrays ``x`` and ``y``, and optionally ``x_test`` and ``y_test``.

    ``x`` may be (N, D) features, (N, H, W) or (N, C, H, W) images; ``y`` integer labels from 0.
    Without test arrays, a seeded, stratified split holds out ``test_fraction`` of the examples.

    Args:
        path: the ``.npz`` file (read without pickles).
        test_fraction: share held out for testing when the file has no test arrays.
        seed: of that split.

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is unreadable, or an array is missing or has the wrong shape or
            dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {missing}; expected 'x' and 'y' (found {z.files})"
            )
        arrays = {k: z[k] for k in z.files}

    def prep(x: np.ndarray, y: np.ndarray, which: str):
        if x.ndim not in (2, 3, 4):
            raise DataError(
                f"{path}: {which} x must be (N, D), (N, H, W) or (N, C, H, W), got shape {x.shape}"
            )
        if x.ndim == 3:
            x = x[:, None]
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{path}: {which} y must be a vector of {len(x)} labels, got shape {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: {which} y must hold integer class labels, got dtype {y.dtype}"
            )
        return x.astype(np.float32), y.astype(np.int64)

    x, y = prep(arrays["x"], arrays["y"], "train")
    if "x_test" in arrays and "y_test" in arrays:
        xte, yte = prep(arrays["x_test"], arrays["y_test"], "test")
        xtr, ytr = x, y
    else:
        xtr, xte, ytr, yte = _split(x, y, test_fraction, seed, where=str(path))
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if min(ytr.min(), yte.min()) < 0:
        raise DataError(f"{path}: labels must be ≥ 0")
    return Dataset(
        path.stem,
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
        num_classes,
    )
