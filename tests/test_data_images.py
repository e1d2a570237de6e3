"""Image folders as a data source: layout, conversion, resizing, splits and the errors users see."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressdrop.data import Dataset, load_dataset
from compressdrop.data.images import ImageFolderError, load_image_folder
from compressdrop.errors import DataError

CLASSES = ("cat", "dog", "owl")


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(
    root: Path,
    classes=CLASSES,
    per_class: int = 6,
    shape=(10, 12),
    mode: str = "L",
    ext: str = ".png",
) -> Path:
    """``root/<class>/<i><ext>``; every pixel of class ``k``'s images has value ``40 * k + i``, so
    a loaded image tells which class and file it came from."""
    channels = {"L": (), "RGB": (3,)}[mode]
    for k, name in enumerate(classes):
        for i in range(per_class):
            _save(root / name / f"{i}{ext}", np.full((*shape, *channels), 40 * k + i, np.uint8))
    return root


def _pixels(ds: Dataset) -> tuple[list[int], list[int]]:
    """The pixel value (``40 * folder + file``) and the label of every training and test image."""
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    return (x[:, 0, 0, 0] * 255).round().long().tolist(), y.tolist()


def test_loads_shapes_labels_and_class_order(tmp_path):
    # class folders created out of order: the labels follow the sorted names
    root = _folder(tmp_path / "pets", classes=("owl", "cat", "dog"))
    ds = load_image_folder(root)
    assert ds.name == "pets" and ds.classes == ("cat", "dog", "owl") and ds.num_classes == 3
    assert ds.input_shape == (1, 10, 12)
    assert len(ds.x_train) + len(ds.x_test) == 18
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) >= 0 and float(ds.x_train.max()) <= 1
    # folders were written as owl (pixels 0..5), cat (40..45), dog (80..85); labels are sorted
    values, labels = _pixels(ds)
    assert {(v // 40, y) for v, y in zip(values, labels, strict=True)} == {(0, 2), (1, 0), (2, 1)}
    counts = torch.bincount(ds.y_test, minlength=3)
    assert int(counts.sum()) == 4 and int(counts.min()) >= 1  # ceil(0.2 × 18), stratified


def test_values_scale_to_unit_range_and_rgb_keeps_three_channels(tmp_path):
    _save(tmp_path / "a" / "0.png", np.full((4, 5, 3), (0, 128, 255), np.uint8))
    _save(tmp_path / "a" / "1.png", np.full((4, 5, 3), 255, np.uint8))
    _save(tmp_path / "b" / "0.jpg", np.zeros((4, 5, 3), np.uint8))
    _save(tmp_path / "b" / "1.JPEG", np.zeros((4, 5, 3), np.uint8))
    ds = load_image_folder(tmp_path, test_fraction=0.5)
    assert ds.input_shape == (3, 4, 5)
    x = torch.cat([ds.x_train, ds.x_test])
    first = x[(x[:, 0].amax((1, 2)) == 0) & (x[:, 2].amin((1, 2)) == 1)]
    assert first.shape[0] == 1
    assert first[0, :, 0, 0].tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def test_other_files_and_hidden_files_are_skipped(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".thumb.png").write_bytes(b"resource fork")
    (root / ".cache").mkdir()
    ds = load_image_folder(root, test_fraction=0.34)
    assert len(ds.x_train) + len(ds.x_test) == 9 and ds.classes == CLASSES


def test_resizes_to_the_given_size(tmp_path):
    root = tmp_path / "mixed"
    for k, name in enumerate(("a", "b")):
        for i, shape in enumerate([(10, 12), (20, 8), (7, 7)]):
            _save(root / name / f"{i}.png", np.full(shape, 100 * k, np.uint8))
    with pytest.raises(ImageFolderError, match=r"differ in size.*10×12.*pass a size"):
        load_image_folder(root)
    # many sizes: four named and a count (every size was listed: 35 in a user's folder)
    for i in range(6):
        _save(root / "a" / f"more{i}.png", np.zeros((30 + i, 30), np.uint8))
    with pytest.raises(ImageFolderError, match=r"and 5 more sizes; pass a size") as info:
        load_image_folder(root)
    assert str(info.value).count("×") == 5  # four sizes, and the one in "height×width"
    for i in range(6):
        (root / "a" / f"more{i}.png").unlink()
    ds = load_image_folder(root, size=(16, 24), test_fraction=0.34)
    assert ds.input_shape == (1, 16, 24)
    # a uniform image stays uniform (antialiased bilinear resizing keeps constants)
    x = torch.cat([ds.x_train, ds.x_test])
    assert torch.allclose(x.amax((1, 2, 3)), x.amin((1, 2, 3)), atol=1e-6)
    assert load_image_folder(root, size=9, test_fraction=0.34).input_shape == (1, 9, 9)


def test_channels_converts_mixed_folders(tmp_path):
    root = _folder(tmp_path / "f", per_class=5, mode="RGB")
    _save(root / "cat" / "gray.png", np.full((10, 12), 7, np.uint8))
    with pytest.raises(ImageFolderError, match=r"channel counts: 1 \(e\.g\. .*gray\.png\), 3 "):
        load_image_folder(root)
    with pytest.raises(ImageFolderError, match=r"channels=1.*channels=3"):
        load_image_folder(root)
    assert load_image_folder(root, channels=1).input_shape == (1, 10, 12)
    assert load_image_folder(root, channels=3).input_shape == (3, 10, 12)


def test_sixteen_bit_grayscale_scales_to_unit_range(tmp_path):
    for name in ("a", "b"):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path, test_fraction=0.5)
    assert ds.input_shape == (1, 3, 4) and float(ds.x_train.min()) == pytest.approx(1.0)


def test_split_is_seeded_and_stratified(tmp_path):
    root = _folder(tmp_path / "s", per_class=10)
    a, b = load_image_folder(root, seed=1), load_image_folder(root, seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, load_image_folder(root, seed=2).x_test)
    assert torch.bincount(a.y_test, minlength=3).tolist() == [2, 2, 2]
    # train and test are disjoint and together hold every image once
    assert sorted(_pixels(a)[0]) == [40 * k + i for k in range(3) for i in range(10)]


def test_train_and_test_folders_are_the_split(tmp_path):
    _folder(tmp_path / "ds" / "train", per_class=4)
    _folder(tmp_path / "ds" / "test", per_class=1)
    ds = load_image_folder(tmp_path / "ds")
    assert ds.name == "ds" and ds.classes == CLASSES
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.y_test.tolist() == [0, 1, 2]


def test_train_and_test_folders_must_agree(tmp_path):
    _folder(tmp_path / "train", per_class=2)
    _folder(tmp_path / "test", classes=("cat", "dog", "emu"), per_class=1)
    with pytest.raises(ImageFolderError, match=r"different classes.*\['owl'\].*\['emu'\]"):
        load_image_folder(tmp_path)


def test_train_folder_without_test_folder(tmp_path):
    _folder(tmp_path / "train", per_class=2)
    (tmp_path / "val").mkdir()
    with pytest.raises(ImageFolderError, match=r"train/ folder but no test/"):
        load_image_folder(tmp_path)


def test_missing_root_and_a_file_as_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such image folder"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(ImageFolderError, match=r"f\.png: not a folder"):
        load_image_folder(tmp_path / "f.png")


def test_no_class_folders(tmp_path):
    _save(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageFolderError, match=r"no class subfolders \(images lie directly"):
        load_image_folder(tmp_path)


def test_one_class_is_too_few_to_train_on_but_reads_for_eval_and_ood(tmp_path):
    """A folder of one class was refused at load, also as `--ood` data (a review)."""
    from compressdrop.data import check_trainable

    _folder(tmp_path, classes=("only",), per_class=3)
    ds = load_image_folder(tmp_path, test_fraction=0.34)
    assert ds.classes == ("only",) and len(ds.x_train) + len(ds.x_test) == 3
    with pytest.raises(DataError, match=r"only one class \(0\); classification needs at least 2"):
        check_trainable(ds)


def test_empty_class_is_named(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("soon")
    with pytest.raises(ImageFolderError, match=r"class 'zebra' has no images"):
        load_image_folder(root)


def test_a_png_that_is_not_an_image_is_named(tmp_path):
    root = _folder(tmp_path / "d", per_class=5)
    (root / "dog" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ImageFolderError, match=r"broken\.png: not a readable image"):
        load_image_folder(root)


def test_truncated_image_is_named(tmp_path):
    root = _folder(tmp_path / "d", per_class=5, ext=".jpg", shape=(32, 32))
    data = (root / "owl" / "0.jpg").read_bytes()
    (root / "owl" / "0.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match=r"0\.jpg: not a readable image"):
        load_image_folder(root)


def test_a_class_with_one_image_cannot_be_split(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    _save(root / "emu" / "0.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(ImageFolderError, match=r"class 'emu' has 1 image; a stratified"):
        load_image_folder(root)


def test_too_few_images_for_the_test_fraction(tmp_path):
    root = _folder(tmp_path / "d", per_class=2)
    with pytest.raises(ImageFolderError, match=r"test_fraction=0\.1 of 6 images gives 1 test"):
        load_image_folder(root, test_fraction=0.1)


def test_bad_arguments(tmp_path):
    root = _folder(tmp_path / "d", per_class=2)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_folder(root, channels=4)
    with pytest.raises(ValueError, match="size must be positive"):
        load_image_folder(root, size=0)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_image_folder(root, test_fraction=1.0)


def test_load_dataset_spec(tmp_path):
    root = _folder(tmp_path / "my,pets", per_class=5, mode="RGB")
    assert load_dataset(str(root)).input_shape == (3, 10, 12)  # a bare folder
    ds = load_dataset(f"images:{root},size=16x20,channels=1")
    assert ds.input_shape == (1, 16, 20) and ds.name == "my,pets" and ds.classes == CLASSES
    assert load_dataset(f"images:{root},size=8").input_shape == (3, 8, 8)
    a = load_dataset(f"images:{root},seed=3,test_fraction=0.5")
    assert len(a.x_test) == 8 and torch.equal(
        a.x_test, load_image_folder(root, seed=3, test_fraction=0.5).x_test
    )
    with pytest.raises(ValueError, match=r"unknown option 'colour' \(options: size, channels"):
        load_dataset(f"images:{root},colour=1")
    with pytest.raises(ValueError, match="bad option value"):
        load_dataset(f"images:{root},size=8x")
    with pytest.raises(ValueError, match=r"no folder; use images:DIR"):
        load_dataset("images:")
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        load_dataset(f"images:{tmp_path / 'missing'}")


def test_unknown_spec_lists_the_image_form():
    with pytest.raises(
        ValueError,
        match=r"FILE\.npz, images:DIR\[,size=N\|HxW\]\[,channels=1\|3\]\[,test_fraction=F\]"
        r"\[,seed=S\] or text:PATH",
    ):
        load_dataset("no-such-thing")


def test_train_from_the_command_line_on_an_image_folder(tmp_path):
    from click.testing import CliRunner

    from compressdrop.cli import main
    from compressdrop.recipes import dump_recipe, load_recipe

    root = _folder(tmp_path / "rgb", per_class=8, shape=(8, 8), mode="RGB")
    base = load_recipe("lenet300-lognormal")
    stages = {
        s: replace(getattr(base.stages, s), epochs=1) for s in ("pretrain", "sparsify", "finetune")
    }
    recipe = base.replace(
        stages=replace(base.stages, **stages), export=replace(base.export, onnx=True)
    )
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--recipe",
            str(recipe_file),
            "--data",
            f"images:{root},size=6x7",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "slim.pt").is_file() and (out / "slim.onnx").is_file()


def test_command_line_reports_a_bad_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from compressdrop.cli import main

    root = _folder(tmp_path / "d", per_class=5)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["train", "--data", f"images:{root}", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "broken.png: not a readable image" in result.output and "Traceback" not in result.output


def test_eval_of_a_folder_with_some_classes_scores_them_as_the_model_named_them(tmp_path):
    """A folder of the "owl" images alone was labelled 0 (its own sorted order), so `eval`
    reported a model that calls every owl an owl as 0 % accurate. Training records the class
    names in every file (a `.pt2` too since a later walk: its archive's extra/compressdrop.json);
    eval renumbers a folder's classes by them, and refuses unknown ones."""
    import json

    from compressdrop._attrs import set_record
    from compressdrop.checkpoint import load_model, save_model
    from compressdrop.export import export_onnx, export_program, load_onnx_metadata
    from compressdrop.models import build_model
    from compressdrop.recipes import dump_recipe, load_recipe
    from compressdrop.workflows import evaluate_file

    from .test_cli import run

    root = _folder(tmp_path / "all", per_class=8, shape=(8, 8))
    base = load_recipe("lenet300-lognormal")
    stages = {s: replace(getattr(base.stages, s), epochs=1) for s in ("pretrain", "sparsify")}
    stages["finetune"] = replace(base.stages.finetune, epochs=0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(dump_recipe(base.replace(stages=replace(base.stages, **stages))))
    run(["train", "--recipe", recipe, "--data", f"images:{root}", "--out", tmp_path / "run"])
    slim = load_model(tmp_path / "run" / "slim.pt")
    assert slim.class_names == CLASSES
    assert load_model(tmp_path / "run" / "gated.pt").class_names == CLASSES
    onnx = tmp_path / "run" / "slim.onnx"
    assert json.loads(load_onnx_metadata(onnx)["classes"]) == list(CLASSES)
    assert load_model(tmp_path / "run" / "slim.pt2").class_names == CLASSES

    owls = _folder(tmp_path / "owls", classes=("owl",), per_class=8, shape=(8, 8))
    x = load_image_folder(owls).x_test
    with torch.no_grad():
        expected = (slim(x).argmax(1) == CLASSES.index("owl")).float().mean().item()
    for model in (tmp_path / "run" / "slim.pt", onnx, tmp_path / "run" / "slim.pt2"):
        got = evaluate_file(model, f"images:{owls}")
        assert got["accuracy"] == pytest.approx(expected), model

    # a model that calls everything an owl: 100 % on the owls (it was scored 0 %)
    sure = build_model("lenet300", input_shape=(1, 8, 8), num_classes=3)
    with torch.no_grad():
        sure[-1].weight.zero_()
        sure[-1].bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    set_record(sure, "class_names", CLASSES)
    save_model(sure, tmp_path / "sure.pt")
    export_onnx(sure, x[:2], tmp_path / "sure.onnx")
    export_program(sure, x[:2], tmp_path / "sure.pt2")
    assert torch.export.load(tmp_path / "sure.pt2").module()(x[:2]).shape == (2, 3)  # plain torch
    for model in ("sure.pt", "sure.onnx", "sure.pt2"):
        assert evaluate_file(tmp_path / model, f"images:{owls}")["accuracy"] == 1.0, model
    eels = _folder(tmp_path / "eels", classes=("eel",), per_class=4, shape=(8, 8))
    with pytest.raises(DataError, match="class 'eel' is not one the model was trained on"):
        evaluate_file(tmp_path / "run" / "slim.pt", f"images:{eels}")


def test_numbered_class_folders_without_names_are_labelled_as_training_labels_them(tmp_path):
    """For a model that records no class names (a `.pt2`, a model trained before names were
    recorded), numbered folders are labelled by sorted position, as training on a folder labels
    them, and a warning says so: reading "3/" as class 3 mislabelled a `.pt2` trained on 1/, 2/, 3/
    (a review). With names, the folders are renumbered to the model's order."""
    from compressdrop.data import DataWarning

    ds = load_image_folder(_folder(tmp_path / "d", classes=("3", "7"), per_class=4))
    with pytest.warns(DataWarning, match="labelled by their sorted position 0..1"):
        again = ds.in_class_order(None)
    assert again is ds
    assert ds.in_class_order(("7", "x", "3")).y_test.tolist() == [
        {0: 2, 1: 0}[int(y)] for y in ds.y_test
    ]


def test_prune_labels_a_folder_by_the_models_class_names(tmp_path):
    """`prune --data` of a model trained on cat/dog/owl with a folder of dog/ and owl/ trained the
    dogs as class 0 (cat) and then recorded dog/owl as the model's classes (a review)."""
    from compressdrop._attrs import set_record
    from compressdrop.checkpoint import save_model
    from compressdrop.models import build_model
    from compressdrop.workflows import prune_file

    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=3)
    set_record(net, "class_names", CLASSES)
    save_model(net, tmp_path / "dense.pt")
    every = _folder(tmp_path / "every", classes=("owl", "cat", "dog"), per_class=6, shape=(8, 8))
    ds = load_image_folder(every)
    assert ds.classes == ("cat", "dog", "owl")  # sorted, as the model's
    some = _folder(tmp_path / "some", classes=("dog", "owl"), per_class=6, shape=(8, 8))
    with pytest.raises(DataError, match="the model's classes cat have no training images"):
        prune_file(tmp_path / "dense.pt", tmp_path / "slim.pt", data=f"images:{some}")


def test_a_folder_too_big_for_memory_is_refused_at_its_first_image(tmp_path, monkeypatch):
    """A folder of photos at full size was decoded until the system killed the process; the
    float32 tensor's size is known at the first image and checked against the memory
    available (here: made small), before any other image is decoded."""
    import compressdrop.data.dataset as dataset
    import compressdrop.data.images as images

    root = _folder(tmp_path / "photos", shape=(40, 50), mode="RGB")  # 18 images
    read = []
    real_read = images._read
    monkeypatch.setattr(images, "_read", lambda p, c: read.append(p) or real_read(p, c))
    need = 18 * 3 * 40 * 50 * 4  # bytes of the float32 (N, C, H, W) tensor
    monkeypatch.setattr(dataset, "available_memory", lambda: int(need / 0.4) - 4096)
    with pytest.raises(
        ImageFolderError, match=r"18 images of 3×40×50 take 0\.0 GB as float32.*size=N"
    ):
        load_image_folder(root)
    assert len(read) == 1
    read.clear()
    assert load_image_folder(root, size=(20, 25)).x_train.shape[1:] == (3, 20, 25)  # smaller: fits
    assert len(read) == 18
    monkeypatch.setattr(dataset, "available_memory", lambda: int(need / 0.4) + 4096)
    pixels, labels = _pixels(load_image_folder(root))  # just fits: every image in its place
    assert sorted(pixels) == [40 * k + i for k in range(3) for i in range(6)]
    assert [p // 40 for p in pixels] == labels
