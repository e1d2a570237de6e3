"""Data files that expand past what they hold are refused before they are decoded: images over a
pixel cap (read from their header), files of a format their ending does not name, ``.npz``
members whose header declares more than they hold or that expand like a zip bomb."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from compressdrop.data import images, load_dataset, npz
from compressdrop.data.images import ImageFolderError, load_image_folder
from compressdrop.data.npz import load_npz
from compressdrop.errors import DataError


def folder(tmp_path, size=(20, 20), fmt="PNG", suffix=".png"):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", size).save(tmp_path / cls / f"{i}{suffix}", format=fmt)
    return tmp_path


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 492 KB PNG of 13000 × 13000 zeros decoded to 2 GB, every image kept full size."""
    monkeypatch.setattr(images, "_MAX_PIXELS", 399)
    with pytest.raises(ImageFolderError, match=r"0\.png: 20×20 pixels, more than the 399"):
        load_image_folder(folder(tmp_path), size=8, test_fraction=0.5)
    monkeypatch.setattr(images, "_MAX_PIXELS", 400)
    assert load_image_folder(tmp_path, size=8, test_fraction=0.5).input_shape == (1, 8, 8)


def test_pillows_bomb_warning_is_a_refusal_not_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: over it, under twice it
    with pytest.raises(ImageFolderError, match=r"refused: Image size .* decompression bomb"):
        load_image_folder(folder(tmp_path), size=8, test_fraction=0.5)


def test_a_file_is_read_only_as_the_format_its_ending_names(tmp_path):
    """Pillow read any of its formats, whatever the file's name (a GIF, a TIFF, ...)."""
    with pytest.raises(ImageFolderError, match=r"0\.png: not a readable image"):
        load_image_folder(folder(tmp_path, fmt="GIF"), size=8, test_fraction=0.5)


def npy(shape, dtype="<f4", data=b""):
    head = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(head, header)
    return head.getvalue() + data


def test_an_npz_array_that_declares_more_than_it_holds_is_refused_before_allocation(tmp_path):
    """A 530-byte file declaring 10^13 floats gave numpy's raw _ArrayMemoryError."""
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", npy((10**13,)))
        z.writestr("y.npy", npy((10,), "<i8", bytes(80)))
    with pytest.raises(DataError, match=r"'x' declares shape \(10000000000000,\) of float32"):
        load_npz(tmp_path / "huge.npz")


def test_an_npz_member_that_expands_like_a_zip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(npz, "_ANY_BYTES", 1 << 16)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy((1 << 15, 2), data=bytes(1 << 18)))
        z.writestr("y.npy", npy((1 << 15,), "<i8", bytes(1 << 18)))
    with pytest.raises(DataError, match=r"'x' expands from [\d,]+ to 262,272 bytes, more than 100"):
        load_npz(tmp_path / "bomb.npz")
    rng = np.random.default_rng(0)  # real data compressed: read as before
    x, y = rng.random((64, 4), dtype=np.float32), np.arange(64) % 2
    np.savez_compressed(tmp_path / "ok.npz", x=x, y=y)
    assert load_npz(tmp_path / "ok.npz").input_shape == (4,)


def test_an_npz_member_without_its_ending_is_the_one_checked(tmp_path, monkeypatch):
    """numpy reads ``x`` for ``z["x"]`` where the archive holds ``x`` beside ``x.npy``; only
    ``x.npy`` was checked, so a 778 KB file whose ``x`` inflated to 800 MB was read whole."""
    monkeypatch.setattr(npz, "_ANY_BYTES", 1 << 16)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy((4, 2), data=bytes(32)))
        z.writestr("x", npy((1 << 15, 2), data=bytes(1 << 18)))
        z.writestr("y.npy", npy((1 << 15,), "<i8", np.arange(1 << 15).tobytes()))
    with pytest.raises(DataError, match=r"two members hold array 'x' \('x' and 'x\.npy'\)"):
        load_npz(tmp_path / "bomb.npz")
    with zipfile.ZipFile(tmp_path / "plain.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x", npy((1 << 15, 2), data=bytes(1 << 18)))  # no ``.npy``: checked as well
        z.writestr("y", npy((4,), "<i8", bytes(32)))
    with pytest.raises(DataError, match=r"'x' expands from [\d,]+ to 262,272 bytes"):
        load_npz(tmp_path / "plain.npz")


def test_a_resize_past_the_pixel_cap_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """A size over the cap made each image that large: ``eval`` of a 1 KB checkpoint recording
    ``images:imgs,size=30000`` beside it (six 8×8 PNGs) asked for 3.6 GB per image, a raw
    allocation traceback (or the memory taken, where the system gives it)."""
    monkeypatch.setattr(images, "_MAX_PIXELS", 399)
    root = folder(tmp_path, size=(10, 10))
    with pytest.raises(DataError, match=r"size 20x20 is more than the 399 pixels"):
        load_image_folder(root, size=20, test_fraction=0.5)
    with pytest.raises(DataError, match=r"size 1000000x1000000 is more than the 399 pixels"):
        load_dataset(f"images:{root},size=1000000")
    assert load_image_folder(root, size=(19, 21), test_fraction=0.5).input_shape == (1, 19, 21)


def test_a_gzipped_idx_file_that_expands_like_a_zip_bomb_is_refused(tmp_path, monkeypatch):
    """Fashion-MNIST's ``.gz`` files were read whole: 2.3 MB of zeros took 4.7 GB (also as the
    ``fashion-mnist:DIR`` a checkpoint records beside it, for ``eval`` without ``--data``)."""
    import gzip
    import struct

    import compressdrop.data as data

    monkeypatch.setattr(data, "_ANY_BYTES", 1 << 16, raising=False)  # (the bound is new)
    n = 2000  # 1.5 MB of zero images: a few KB compressed
    for split, count in (("train", n), ("t10k", 4)):
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", count, 28, 28) + bytes(count * 784))
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", count) + bytes(count))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: expands past [\d,]+ bytes"):
        load_dataset(f"fashion-mnist:{tmp_path}")
    monkeypatch.setattr(data, "_ANY_BYTES", 1 << 21)  # within the bound: read as before
    assert load_dataset(f"fashion-mnist:{tmp_path}").x_train.shape == (n, 1, 28, 28)


def test_a_text_glob_of_many_double_stars_is_refused_before_the_walk(tmp_path):
    """Each ``**`` of a glob walks the folder again from every folder the one before found:
    eight of them over twelve nested folders took 3 s, twenty hours (a checkpoint's recorded
    ``text:corpus,glob=...`` beside its own nested folders, for ``eval`` without ``--data``)."""
    deep = tmp_path.joinpath(*["d"] * 6)
    deep.mkdir(parents=True)
    for i in range(10):  # (split by file)
        (deep / f"{i}.txt").write_text("def f(x): return x\n" * 50)
    with pytest.raises(DataError, match=r"glob='\*\*/\*\*/\*\*/\*' has more than two"):
        load_dataset(f"text:{tmp_path},context=8,glob=**/**/**/*")
    assert load_dataset(f"text:{tmp_path},context=8,glob=**/**/*").x_train.shape[1] == 8
