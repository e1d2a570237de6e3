"""Built-in data: digits, Fashion-MNIST, a user's ``.npz`` and a user's folder of images.

scikit-learn's digits are the embedded default, Fashion-MNIST loads from its IDX files, folders of
images through :mod:`compressdrop.data.images`. Everything loads into memory as tensors (these
data sets are small).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset, DataWarning, _split, spec_options
from .npz import _ANY_BYTES, _RATIO, check_trainable, load_npz
from .text import TEXT_SPEC, TextDataset, load_text
from .tokens import BYTES, TOKENIZER_JSON

__all__ = [
    "FASHION_MNIST_DIR",
    "DataWarning",
    "Dataset",
    "TextDataset",
    "absolute_spec",
    "check_trainable",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_npz",
    "load_text",
    "make_loader",
    "with_model_tokenizer",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes) as a :class:`Dataset`.

    Images are scaled to [0, 1], shape (N, 1, 8, 8), with a stratified, seeded train/test split.

    Args:
        test_fraction: share of the examples held out for testing.
        seed: of the split.
    """
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
    # as an .npz's members: a 2.3 MB .gz of zeros was read whole into 4.7 GB
    most = _RATIO * path.stat().st_size + _ANY_BYTES
    try:
        with opener(path, "rb") as f:
            data = f.read(most + 1)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) > most:
        raise DataError(
            f"{path}: expands past {most:,} bytes, more than {_RATIO} times its "
            f"{path.stat().st_size:,} (a zip bomb?)"
        )
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"{path}: truncated or padded IDX file (header says {dims})")
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

    Gzipped and plain files both work; images are scaled to [0, 1], shape (N, 1, 28, 28).

    Args:
        root: the folder of the four IDX files; by default ``$COMPRESSDROP_FASHION_MNIST``, else
            /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``).

    Raises:
        FileNotFoundError: a file is missing (the message says how to install them).
        DataError: a file is not a valid IDX file, or images and labels do not match.
    """
    root = Path(root or os.environ.get("COMPRESSDROP_FASHION_MNIST") or FASHION_MNIST_DIR)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        parts[split] = (
            torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return Dataset("fashion-mnist", *parts["train"], *parts["test"], 10)


# the spec forms, as errors and the CLI's --data help (compressdrop.cli_options) show them
IMAGES_SPEC = "images:DIR[,size=N|HxW][,channels=1|3][,test_fraction=F][,seed=S]"
_DATA_SPECS = f"digits, fashion-mnist[:DIR], FILE.npz, {IMAGES_SPEC} or {TEXT_SPEC}"

_IMAGE_OPTIONS = ("size", "channels", "test_fraction", "seed")


def _image_spec(spec: str) -> tuple[str, dict]:
    """``images:DIR[,key=value]...`` → ``(DIR, load_image_folder keyword arguments)``.

    Options are the trailing ``key=value`` parts, so a folder name may itself contain commas.
    """
    folder, options = spec_options(spec, "images:", _IMAGE_OPTIONS, IMAGES_SPEC, "folder")
    kwargs: dict = {}
    try:
        if "size" in options:
            dims = [int(d) for d in options["size"].lower().split("x")]
            if len(dims) not in (1, 2):
                raise DataError(options["size"])
            kwargs["size"] = (dims[0], dims[-1])
        if "channels" in options:
            kwargs["channels"] = int(options["channels"])
        if "test_fraction" in options:
            kwargs["test_fraction"] = float(options["test_fraction"])
        if "seed" in options:
            kwargs["seed"] = int(options["seed"])
    except ValueError:
        raise DataError(
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
              ``DIR`` is the same as ``images:DIR``;
            - ``text:PATH[,context=N][,glob=PATTERN][,max_bytes=N][,val_fraction=F][,test_fraction=F][,tokenizer=PATH][,sep=eos|none|TOKEN][,special=token|text]``:
              next-token windows of a text file or folder, split by file, its tokens bytes or
              (``tokenizer=``: a ``tokenizer.json`` or a folder holding one) a model's own, its
              files joined by the tokenizer's end-of-text token (``sep=``; bytes by nothing) (see
              :func:`compressdrop.data.text.load_text`).

    Returns:
        The :class:`Dataset`.

    Example:
        >>> load_dataset("images:photos,size=32x48,channels=3")  # doctest: +SKIP
    """
    if not spec.strip():
        raise DataError(f"empty data spec: use {_DATA_SPECS}")
    if spec.startswith("text:"):
        from .text import text_spec

        return text_spec(spec)
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
    raise DataError(f"unknown data {spec!r}: use {_DATA_SPECS}")


def absolute_spec(spec: str) -> str:
    """``spec`` with the file or folder it names made absolute, as a run records it: a
    checkpoint's default data for ``eval`` and ``sweep``, which may run from another folder.
    Built-in data (``digits``) and what names no existing path are returned as they are."""
    parts = _split_spec(spec)
    if parts is None or not Path(parts[1]).exists():
        return spec
    kind, where, options = parts
    keyed = [o.partition("=")[::2] for o in options.split(",")[1:]]
    options = "".join(f",{k}={_absolute_option(k, v)}" for k, v in keyed)
    return f"{kind}{Path(where).resolve()}{options}"


def _absolute_option(key: str, value: str) -> str:
    """An option's value, a ``tokenizer=`` path made absolute."""
    if key.strip() != "tokenizer" or value.strip() == BYTES:
        return value
    return str(Path(value.strip()).resolve())


def spec_paths(spec: str) -> list[Path]:
    """The files and folders a data spec names: its data (``text:PATH,context=N`` → ``PATH``;
    ``x.npz``; a folder of images) and a ``tokenizer=`` path; none for built-in data."""
    parts = _split_spec(spec)
    if parts is None:
        return []
    tokenizer = _options(parts).get("tokenizer", BYTES)
    return [Path(parts[1])] + ([Path(tokenizer)] if tokenizer != BYTES else [])


def with_model_tokenizer(spec: str, model_path: str | Path | None) -> str:
    """``spec`` with ``,tokenizer=FOLDER`` added where it is ``text:`` data without the option
    and ``model_path`` is a folder that carries a ``tokenizer.json`` (a Hugging Face model's):
    such a model reads its own tokens, not bytes. Any other spec is returned as it is."""
    parts = _split_spec(spec)
    if not spec.startswith("text:") or parts is None or model_path is None:
        return spec
    folder = Path(model_path)
    if "tokenizer" in _options(parts) or not (folder / TOKENIZER_JSON).is_file():
        return spec
    return f"{spec},tokenizer={folder.resolve()}"


def _options(parts: tuple[str, str, str]) -> dict[str, str]:
    """The ``key=value`` options of a spec :func:`_split_spec` split, stripped."""
    keyed = (o.partition("=") for o in parts[2].split(",")[1:])
    return {k.strip(): v.strip() for k, _, v in keyed}


def _split_spec(spec: str) -> tuple[str, str, str] | None:
    """A data spec that names a path as ``(kind, path, options)``, read as ``load_dataset``
    reads it (``text:`` and ``images:`` options are the trailing ``key=value`` parts, so a path
    may hold commas; ``options`` keeps its leading comma); None for built-in data."""
    kind = next((k for k in _PATH_KINDS if spec.startswith(k)), "")
    where, options = spec[len(kind) :], ""
    if kind in ("text:", "images:"):
        parts = where.split(",")
        while len(parts) > 1 and "=" in parts[-1]:
            options = "," + parts.pop() + options
        where = ",".join(parts)
    named = kind or spec.endswith(".npz") or (spec not in _BUILT_IN and Path(spec).is_dir())
    return (kind, where, options) if named and where else None


_PATH_KINDS = ("text:", "images:", "fashion-mnist:")
_BUILT_IN = ("digits", "fashion-mnist")


def make_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int | None = None
):
    """A DataLoader over the pairs ``(x[i], y[i])``.

    Args:
        x: inputs, examples along dim 0.
        y: labels.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        seed: seeds the shuffling, so that the order is reproducible; ``None``: torch's global
            generator.

    Returns:
        A ``torch.utils.data.DataLoader`` of ``[x_batch, y_batch]``.
    """
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)
