"""Built-in data: scikit-learn's digits (the embedded default), Fashion-MNIST from its IDX files,
a user's ``.npz``, and a user's folder of images (:mod:`compressdrop.data.images`). Everything
loads into memory as tensors (these data sets are small)."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "Dataset",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_npz",
    "make_loader",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class Dataset:
    """A classification data set held as tensors: inputs float32 ``(N, *input_shape)``, labels int64.

    ``classes`` names the classes in label order where the source has names (an image folder's
    class folders), else it is empty.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(
                f"classes names {len(self.classes)} classes but num_classes is {self.num_classes}"
            )
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) < 1:
                raise ValueError(f"x_{split} is empty")
            if len(x) != len(y):
                raise ValueError(f"x_{split} has {len(x)} examples but y_{split} has {len(y)}")
            if y.dtype != torch.int64:
                raise ValueError(f"y_{split} must be int64 labels, got {y.dtype}")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise ValueError(f"y_{split} has labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_train examples {tuple(self.x_train.shape[1:])} and x_test examples "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Carve a stratified validation split out of the training set.

        Returns ``(train, val)``: ``train`` keeps the rest of the training examples (and the real
        test set); ``val``'s "test" tensors are the validation examples. The test set is never used.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        gen = torch.Generator().manual_seed(seed)
        val_idx = []
        for c in range(self.num_classes):
            idx = (self.y_train == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            val_idx.append(idx[: round(len(idx) * fraction)])
        v = torch.cat(val_idx).sort().values
        if len(v) == 0:
            raise ValueError(
                f"{self.name}: a validation fraction of {fraction} of {len(self.y_train)} training "
                f"examples rounds to none in every class; raise it, add data, or set it to 0 "
                f"(the recipe's data.val_fraction)"
            )
        keep = torch.ones(len(self.y_train), dtype=torch.bool)
        keep[v] = False
        train = replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep])
        val = replace(
            train, name=f"{self.name}/val", x_test=self.x_train[v], y_test=self.y_train[v]
        )
        return train, val

    def subset(self, n_train: int, n_test: int) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (tiny slices for tests and smoke runs)."""
        return replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), scaled to [0, 1], shape
    (N, 1, 8, 8), with a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = _split(x, d.target.astype(np.int64), test_fraction, seed)
    return Dataset(
        "digits",
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
        10,
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise ValueError(f"{path}: truncated or padded IDX file (header says {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        f"`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or point "
        f"COMPRESSDROP_FASHION_MNIST (or fashion-mnist:DIR) at a folder holding the IDX files."
    )


def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28×28, 10 classes) from its IDX files.

    ``root`` defaults to ``$COMPRESSDROP_FASHION_MNIST``, else /usr/share/datasets/fashion-mnist
    (Debian's ``dataset-fashion-mnist``). Gzipped and plain files both work.
    """
    root = Path(root or os.environ.get("COMPRESSDROP_FASHION_MNIST") or FASHION_MNIST_DIR)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        parts[split] = (
            torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return Dataset("fashion-mnist", *parts["train"], *parts["test"], 10)


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's ``.npz`` with ``x`` and ``y`` (optionally ``x_test``/``y_test``; else a seeded,
    stratified split). ``x`` may be (N, D) features, (N, H, W) or (N, C, H, W) images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ValueError(
                f"{path}: missing array(s) {missing}; expected 'x' and 'y' (found {z.files})"
            )
        arrays = {k: z[k] for k in z.files}

    def prep(x: np.ndarray, y: np.ndarray, which: str):
        if x.ndim not in (2, 3, 4):
            raise ValueError(
                f"{path}: {which} x must be (N, D), (N, H, W) or (N, C, H, W), got shape {x.shape}"
            )
        if x.ndim == 3:
            x = x[:, None]
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{path}: {which} y must be a vector of {len(x)} labels, got shape {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: {which} y must hold integer class labels, got dtype {y.dtype}"
            )
        return x.astype(np.float32), y.astype(np.int64)

    x, y = prep(arrays["x"], arrays["y"], "train")
    if "x_test" in arrays and "y_test" in arrays:
        xte, yte = prep(arrays["x_test"], arrays["y_test"], "test")
        xtr, ytr = x, y
    else:
        xtr, xte, ytr, yte = _split(x, y, test_fraction, seed)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if min(ytr.min(), yte.min()) < 0:
        raise ValueError(f"{path}: labels must be ≥ 0")
    return Dataset(
        path.stem,
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
        num_classes,
    )


_IMAGES_SPEC = "images:DIR[,size=N|HxW][,channels=1|3]"
_DATA_SPECS = f"digits, fashion-mnist[:DIR], FILE.npz or {_IMAGES_SPEC}"

_IMAGE_OPTIONS = ("size", "channels", "test_fraction", "seed")


def _image_spec(spec: str) -> tuple[str, dict]:
    """``images:DIR[,key=value]...`` → ``(DIR, load_image_folder keyword arguments)``.

    Options are the trailing ``key=value`` parts, so a folder name may itself contain commas.
    """
    parts = spec.removeprefix("images:").split(",")
    options: dict = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        key = key.strip()
        if key not in _IMAGE_OPTIONS or key in options:
            problem = "repeated" if key in options else "unknown"
            raise ValueError(
                f"data {spec!r}: {problem} option {key!r} (options: {', '.join(_IMAGE_OPTIONS)})"
            )
        options[key] = value.strip()
    folder = ",".join(parts)
    if not folder:
        raise ValueError(f"data {spec!r}: no folder; use {_IMAGES_SPEC}")
    kwargs: dict = {}
    try:
        if "size" in options:
            dims = [int(d) for d in options["size"].lower().split("x")]
            if len(dims) not in (1, 2):
                raise ValueError(options["size"])
            kwargs["size"] = (dims[0], dims[-1])
        if "channels" in options:
            kwargs["channels"] = int(options["channels"])
        if "test_fraction" in options:
            kwargs["test_fraction"] = float(options["test_fraction"])
        if "seed" in options:
            kwargs["seed"] = int(options["seed"])
    except ValueError:
        raise ValueError(
            f"data {spec!r}: bad option value in {options}; expected size=N or size=HxW "
            f"(integers), channels=1 or 3, test_fraction=0.2, seed=0"
        ) from None
    return folder, kwargs


def load_dataset(spec: str) -> Dataset:
    """The data a spec names (the CLI's ``--data`` and a recipe's ``data.name``).

    Args:
        spec: one of

            - ``digits``: scikit-learn's 8×8 digits;
            - ``fashion-mnist`` or ``fashion-mnist:DIR``: the IDX files (in DIR);
            - ``FILE.npz``: arrays ``x``, ``y`` (and optionally ``x_test``, ``y_test``);
            - ``images:DIR[,size=N|HxW][,channels=1|3][,test_fraction=F][,seed=S]``: a folder
              with one subfolder of PNG/JPEG images per class (see
              :func:`compressdrop.data.images.load_image_folder`); ``size`` resizes to N×N or
              H×W, ``channels`` converts to grayscale (1) or RGB (3). A bare existing folder
              ``DIR`` is the same as ``images:DIR``.

    Returns:
        The :class:`Dataset`.

    Example:
        >>> load_dataset("images:photos,size=32x48,channels=3")  # doctest: +SKIP
    """
    if spec.startswith("images:"):
        from .images import load_image_folder

        folder, kwargs = _image_spec(spec)
        return load_image_folder(folder, **kwargs)
    if spec == "digits":
        return load_digits()
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        return load_fashion_mnist(spec.partition(":")[2] or None)
    if spec.endswith(".npz"):
        return load_npz(spec)
    if Path(spec).is_dir():
        from .images import load_image_folder

        return load_image_folder(spec)
    raise ValueError(f"unknown data {spec!r}: use {_DATA_SPECS}")


def make_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int | None = None
):
    """A DataLoader over ``(x, y)``; shuffling is reproducible for a given seed."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)
