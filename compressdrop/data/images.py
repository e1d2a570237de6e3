"""A user's folder of images, one subfolder per class, loaded into memory as a :class:`Dataset`.

Layout (class index = position of the class folder in sorted order)::

    photos/                    photos/
      cat/  a.png b.jpg ...      train/  cat/ ...  dog/ ...
      dog/  c.jpeg ...           test/   cat/ ...  dog/ ...

The left form gets a seeded, stratified train/test split; the right form is split as given.
Pillow is imported only when a folder is read.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset, _split, beyond_memory

__all__ = ["IMAGE_SUFFIXES", "ImageFolderError", "load_image_folder"]

#: File endings read as images (case-insensitive); other files are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_CHANNEL_MODES = {1: "L", 3: "RGB"}
# Pillow modes, by the 8-bit mode they are read as when no ``channels`` is asked for.
_NATURAL_MODE = {
    "1": "L",
    "L": "L",
    "LA": "LA",
    "La": "LA",
    "PA": "RGBA",
    "RGB": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "RGBA": "RGBA",
    "RGBa": "RGBA",
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale PNG
# What Pillow raises on a file that is not an image or is broken (truncated, bad chunks).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error)
#: the most pixels one image may have, checked from its header before it is decoded: 8192 × 8192
#: (a 256 MB float copy per channel); a 492 KB PNG of 13000 × 13000 zeros decoded to 2 GB
_MAX_PIXELS = 1 << 26
_FORMATS = ("PNG", "JPEG")  # what IMAGE_SUFFIXES name, and all Pillow may take a file for


class ImageFolderError(DataError):
    """An image folder that cannot be loaded; the message names the file or folder and the fix."""


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise DataError(f"size must be an int or (height, width), got {size!r}")
    if min(pair) < 1:
        raise DataError(f"size must be positive, got {size!r}")
    if pair[0] * pair[1] > _MAX_PIXELS:  # a model file's recorded spec gives it too
        raise DataError(
            f"size {pair[0]}x{pair[1]} is more than the {_MAX_PIXELS:,} pixels an image may have "
            "here; give a smaller size"
        )
    return pair[0], pair[1]


def _class_dirs(folder: Path) -> list[Path]:
    """The non-hidden subfolders, sorted by name."""
    dirs = (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(dirs, key=lambda p: p.name)


def _image_files(class_dir: Path) -> list[Path]:
    """Image files anywhere under ``class_dir``, in sorted order.

    Hidden files and folders (names starting with ``.``) and files with other endings are skipped.
    """
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name → its image files, for a folder whose subfolders are the classes."""
    dirs = _class_dirs(folder)
    if not dirs:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
        hint = " (images lie directly in it)" if loose else ""
        raise ImageFolderError(
            f"{folder}: no class subfolders{hint}; put each class's images in a subfolder "
            f"named after the class (e.g. {folder}/cat/, {folder}/dog/)"
        )
    classes = {d.name: _image_files(d) for d in dirs}
    for name, files in classes.items():
        if not files:
            raise ImageFolderError(
                f"{folder / name}: class {name!r} has no images "
                f"({'/'.join(IMAGE_SUFFIXES)} files; others are skipped)"
            )
    return classes


def _read(path: Path, channels: int | None) -> np.ndarray:
    """One image as float32 ``(H, W, C)`` in [0, 1]; EXIF rotation applied."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # a bomb is refused below, or by Pillow: not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_FORMATS) as opened:
                width, height = opened.size  # from the header: nothing is decoded yet
                if width * height > _MAX_PIXELS:
                    raise ImageFolderError(
                        f"{path}: {width}×{height} pixels, more than the {_MAX_PIXELS:,} an "
                        "image may have here; scale it down before loading the folder"
                    )
                img = ImageOps.exif_transpose(opened)
                img.load()
    except ImageFolderError:  # a ValueError, as Pillow's own errors are
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's cap
        raise ImageFolderError(f"{path}: refused: {e}; scale it down") from None
    except _UNREADABLE as e:
        raise ImageFolderError(f"{path}: not a readable image ({e})") from None
    if img.mode in _SIXTEEN_BIT:
        x = np.asarray(img, dtype=np.float32)[..., None] / 65535.0  # (H, W, 1)
        if channels == 3:
            x = np.repeat(x, 3, axis=2)
        return np.clip(x, 0.0, 1.0)
    if channels is not None:
        mode = _CHANNEL_MODES[channels]
    elif img.mode == "P":  # palette: RGBA only where the palette has transparency
        mode = "RGBA" if "transparency" in img.info else "RGB"
    elif img.mode in _NATURAL_MODE:
        mode = _NATURAL_MODE[img.mode]
    else:
        raise ImageFolderError(
            f"{path}: unsupported image mode {img.mode!r}; pass channels=1 or channels=3 to "
            f"convert it"
        )
    x = np.asarray(img.convert(mode), dtype=np.uint8)
    return (x.reshape(*x.shape[:2], -1) / np.float32(255.0)).astype(np.float32)


def _check_memory(root: Path, n: int, image: torch.Tensor) -> None:
    """Refuse ``n`` images shaped like ``image`` whose float32 tensor would take more than
    :data:`~compressdrop.data.dataset.MEMORY_SHARE` of the available memory, before the rest are
    decoded: a folder of photos at full size was decoded until the system killed the process."""
    c, h, w = image.shape
    what = f"{n:,} images of {c}×{h}×{w}"
    too_big = beyond_memory(n * image.numel() * 4, what, "as float32")
    if too_big:
        raise ImageFolderError(
            f"{root}: {too_big}; load them smaller (size=N, e.g. images:DIR,size=64) or fewer"
        )


def _stack(
    files: list[tuple[Path, int]], size: tuple[int, int] | None, channels: int | None, root: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every file into one ``(N, C, H, W)`` tensor, checking that channels and sizes agree
    and, at the first image, that the tensor fits in memory (:func:`_check_memory`)."""
    import torch.nn.functional as F

    stacked: torch.Tensor | None = None  # (N, C, H, W), filled as the images are read
    by_channels: dict[int, Path] = {}
    by_size: dict[tuple[int, int], Path] = {}
    for i, (path, _) in enumerate(files):
        t = torch.from_numpy(np.ascontiguousarray(_read(path, channels))).permute(2, 0, 1)
        if size is not None and tuple(t.shape[1:]) != size:  # (C, H, W)
            # antialias: downscaling by a large factor would otherwise alias
            t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True)[0]
            t = t.clamp(0.0, 1.0)
        by_channels.setdefault(t.shape[0], path)
        by_size.setdefault((t.shape[1], t.shape[2]), path)
        if stacked is None:
            _check_memory(root, len(files), t)
            stacked = torch.empty((len(files), *t.shape))
        if t.shape == stacked.shape[1:]:  # (others are refused below, naming every shape)
            stacked[i] = t
    if stacked is None:
        raise ImageFolderError(f"{root}: no images")
    if len(by_channels) > 1:
        found = ", ".join(f"{c} (e.g. {p})" for c, p in sorted(by_channels.items()))
        raise ImageFolderError(
            f"{root}: images have different channel counts: {found}; pass channels=1 "
            f"(grayscale) or channels=3 (RGB) to convert every image"
        )
    if size is None and len(by_size) > 1:
        sizes = sorted(by_size.items())
        found = ", ".join(f"{h}×{w} (e.g. {p})" for (h, w), p in sizes[:4])
        found += f" and {len(sizes) - 4} more sizes" if len(sizes) > 4 else ""
        raise ImageFolderError(
            f"{root}: images differ in size (height×width): {found}; pass a size to "
            f"resize them all (size=32 or size=(H, W); on the command line "
            f"images:{root},size=32 or ,size=HxW)"
        )
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return stacked, labels


def _labelled(classes: dict[str, list[Path]], names: list[str]) -> list[tuple[Path, int]]:
    return [(p, names.index(name)) for name in names for p in classes[name]]


def _check_split(root: Path, classes: dict[str, list[Path]], test_fraction: float) -> None:
    """The stratified split's preconditions, checked here so the error names the folder."""
    for name, files in classes.items():
        if len(files) < 2:
            raise ImageFolderError(
                f"{root / name}: class {name!r} has {len(files)} image; a stratified train/test "
                f"split needs at least 2 per class (or give train/ and test/ folders)"
            )
    n = sum(len(f) for f in classes.values())
    n_test = int(np.ceil(test_fraction * n))
    k = len(classes)
    if n_test < k or n - n_test < k:
        raise ImageFolderError(
            f"{root}: test_fraction={test_fraction} of {n} images gives {n_test} test and "
            f"{n - n_test} training images; each split needs at least one image per class "
            f"({k} classes): add images or change test_fraction"
        )


def load_image_folder(
    root: str | Path,
    size: int | Sequence[int] | None = None,
    *,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a folder of PNG/JPEG images, one subfolder per class, into memory.

    Class ``i`` is the ``i``-th class folder in sorted order; the names are kept in
    ``Dataset.classes``. Files ending in .png, .jpg or .jpeg (any case) anywhere under a class
    folder are read; other files, and hidden ones (``.name``), are skipped. If ``root`` holds
    ``train/`` and ``test/`` folders, each with the same class folders, they are the split;
    otherwise a seeded split stratified by class holds out ``test_fraction`` of each class.

    Args:
        root: the folder; its name becomes the data set's name.
        size: ``(height, width)`` (an int for a square) to resize every image to, bilinear with
            antialiasing. Without it all images must already share one size.
        channels: 1 converts every image to grayscale (L), 3 to RGB. Without it all images must
            have the same channel count (1 gray, 2 gray+alpha, 3 RGB or 4 RGBA).
        test_fraction: share of each class held out for the test set (no train/test folders).
        seed: seed of that split.

    Returns:
        A :class:`Dataset` of float32 inputs in [0, 1], shape ``(N, C, H, W)``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DataError: a bad ``size``, ``channels`` or ``test_fraction``.
        ImageFolderError: (a ``ValueError``) the folder or a file in it cannot be used; the message
            names it and says what to change.

    Example:
        >>> ds = load_image_folder("photos", size=32, channels=3)  # doctest: +SKIP
        >>> ds.input_shape, ds.classes  # doctest: +SKIP
        ((3, 32, 32), ('cat', 'dog'))
    """
    root = Path(root)
    hw = _size_pair(size)
    if channels is not None and channels not in _CHANNEL_MODES:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such image folder")
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder (expected a folder of class subfolders)")
    name = root.resolve().name
    top = {p.name for p in _class_dirs(root)}
    if {"train", "test"} <= top:
        if top - {"train", "test"}:
            raise ImageFolderError(
                f"{root}: has train/ and test/ folders but also {sorted(top - {'train', 'test'})}; "
                f"with train/ and test/ every class folder belongs inside both"
            )
        train, test = _scan(root / "train"), _scan(root / "test")
        if set(train) != set(test):
            raise ImageFolderError(
                f"{root}: train/ and test/ hold different classes: only in train/: "
                f"{sorted(set(train) - set(test))}, only in test/: {sorted(set(test) - set(train))}"
            )
        names = sorted(train)
        x_train, y_train = _stack(_labelled(train, names), hw, channels, root)
        x_test, y_test = _stack(_labelled(test, names), hw, channels, root)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ImageFolderError(
                f"{root}: train/ images are {tuple(x_train.shape[1:])} but test/ images are "
                f"{tuple(x_test.shape[1:])} (C, H, W); pass size=... and channels=... to match them"
            )
    elif top & {"train", "test"}:
        (given,) = top & {"train", "test"}
        raise ImageFolderError(
            f"{root}: has a {given}/ folder but no {({'train', 'test'} - {given}).pop()}/ one; "
            f"give both train/ and test/ (each holding the class folders), or only class folders"
        )
    else:
        classes = _scan(root)
        names = sorted(classes)
        _check_split(root, classes, test_fraction)
        x, y = _stack(_labelled(classes, names), hw, channels, root)
        xtr, xte, ytr, yte = _split(x.numpy(), y.numpy(), test_fraction, seed)
        x_train, y_train = torch.from_numpy(xtr), torch.from_numpy(ytr)
        x_test, y_test = torch.from_numpy(xte), torch.from_numpy(yte)
    return Dataset(name, x_train, y_train, x_test, y_test, len(names), classes=tuple(names))
