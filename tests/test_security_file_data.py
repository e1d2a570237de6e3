"""Small files whose data unfolds without end (a fifth security review): a 2 KB checkpoint of
``x = [x, x]`` sixty times over (pickle keeps the parts shared; every walk of the data as a tree
visits 2**60 values), a stride-0 view of one byte as eight billion (copied as an embedded
program's bytes: 8 GB), and a recipe of nested YAML aliases (a billion laughs)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError
from compressdrop.recipes import load_recipe
from compressdrop.recipes.config import RecipeError
from compressdrop.torchload import load_checkpoint


def test_shared_parts_that_unfold_past_a_bound_are_refused_at_once(tmp_path):
    x: list = []
    for _ in range(60):
        x = [x, x]
    torch.save({"meta": x}, tmp_path / "dag.pt")
    with pytest.raises(CheckpointError, match="unfolds into more than 10,000,000 values"):
        load_checkpoint(tmp_path / "dag.pt")


def test_shared_parts_within_the_bound_and_tied_weights_load(tmp_path):
    part = {"lr": 0.1, "sizes": list(range(100))}
    weight = torch.randn(4, 3)
    torch.save({"a": part, "b": part, "w": weight, "tied": weight}, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert loaded["a"] == loaded["b"] == part
    assert loaded["tied"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()


def test_a_tensor_that_views_more_values_than_its_storage_is_refused(tmp_path):
    view = torch.zeros(1, dtype=torch.uint8).as_strided((1_000_000,), (0,))
    torch.save({"arch": {"program": view}}, tmp_path / "stride0.pt")
    with pytest.raises(CheckpointError, match="a tensor of 1,000,000 values over a storage of 1"):
        load_model(tmp_path / "stride0.pt")


def test_a_recipe_may_alias_a_value_but_not_a_list_or_mapping(tmp_path):
    lines = ["x0: &x0 [lol, lol, lol]"]
    lines += [f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}, *x{i - 1}]" for i in range(1, 30)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\nname: laughs\n")
    with pytest.raises(RecipeError, match=r"\*x0 repeats a list or mapping"):
        load_recipe(tmp_path / "laughs.yaml")
    (tmp_path / "ok.yaml").write_text(
        "name: aliased\nmodel: {arch: lenet300}\n"
        "stages:\n  sparsify: {epochs: 1, lr: &lr 0.002}\n  finetune: {epochs: 1, lr: *lr}\n"
    )
    recipe = load_recipe(tmp_path / "ok.yaml")
    assert recipe.stages.finetune.lr == recipe.stages.sparsify.lr == 0.002


def test_a_compressed_entry_that_expands_like_a_zip_bomb_is_refused(tmp_path):
    """torch's zip reader inflates deflated entries: a 1 MB crafted checkpoint loaded as a 1 GB
    tensor. torch.save and torch.export.save store their entries; one that expands more than a
    hundredfold is refused, in a checkpoint and in a program."""
    import zipfile

    from compressdrop.programs import check_pt2_archive

    torch.save({"w": torch.zeros(1_000_000)}, tmp_path / "plain.pt")
    layer = torch.nn.Linear(1000, 1000)
    torch.nn.init.zeros_(layer.weight)
    torch.export.save(torch.export.export(layer, (torch.randn(2, 1000),)), tmp_path / "good.pt2")
    for name in ("plain.pt", "good.pt2"):
        with (
            zipfile.ZipFile(tmp_path / name) as zi,
            zipfile.ZipFile(tmp_path / f"deflated-{name}", "w", zipfile.ZIP_DEFLATED) as zo,
        ):
            for item in zi.infolist():
                zo.writestr(item.filename, zi.read(item), zipfile.ZIP_DEFLATED)
    assert load_checkpoint(tmp_path / "plain.pt")["w"].shape == (1_000_000,)
    with pytest.raises(CheckpointError, match=r"expands? from .* bytes \(a zip bomb\?\)"):
        load_checkpoint(tmp_path / "deflated-plain.pt")
    check_pt2_archive(tmp_path / "good.pt2")
    with pytest.raises(CheckpointError, match="a zip bomb"):
        check_pt2_archive(tmp_path / "deflated-good.pt2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: deep\nmodel: " + "[" * 50_000 + "]" * 50_000 + "\n", "not a recipe"),
        ("name: big\nseed: " + "9" * 5_000 + "\n", "not a recipe"),  # past int's digit limit
        ("name: long\nseed: " + "1:59:" * 60_000 + "1\n", "a recipe holds at most 256 KB"),
    ],
    ids=["nested", "digits", "sexagesimal"],
)
def test_a_recipe_that_would_hang_or_overflow_is_a_recipe_error(text, message, tmp_path):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_an_entry_whose_size_the_two_zip_readers_see_otherwise_is_refused(tmp_path):
    """A second central directory that Python's reader alone reads claimed a deflated 400 MB
    entry was stored at full size, so the ratio check passed and torch inflated it."""
    import zipfile

    from compressdrop._io import inflated

    torch.save({"w": torch.zeros(10)}, tmp_path / "a.pt")
    reader = torch._C.PyTorchFileReader(str(tmp_path / "a.pt"))
    sizes = {r: reader.get_record_size(r) for r in reader.get_all_records()}
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        assert inflated(z.infolist(), sizes) is None
        assert "other entries or sizes" in inflated(z.infolist(), {**sizes, "data/0": 400 << 20})


def test_many_entries_each_under_the_bound_are_refused_together(tmp_path):
    """An eighth review: every entry had its own allowance, so 300 deflated entries of 1 MB each
    (a 350 KB file) loaded as 300 MB."""
    import zipfile

    torch.save({f"w{i}": torch.zeros(1 << 18) for i in range(40)}, tmp_path / "many.pt")
    with (
        zipfile.ZipFile(tmp_path / "many.pt") as zi,
        zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as zo,
    ):
        for item in zi.infolist():
            zo.writestr(item.filename, zi.read(item), zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(tmp_path / "deflated.pt") as z:
        assert max(i.file_size for i in z.infolist()) <= 100 * min(
            i.compress_size for i in z.infolist() if i.file_size == 1 << 20
        ) + (1 << 20)  # each entry alone passes
    with pytest.raises(CheckpointError, match=r"its entries expand from .* \(a zip bomb\?\)"):
        load_checkpoint(tmp_path / "deflated.pt")


# --- a twelfth review: what the unpickler builds can cost without end ---------------------------


def _pickled(path, stream: bytes):
    """A ``torch.save`` archive at ``path`` whose ``data.pkl`` is ``stream``."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            z.writestr(name, stream if name.endswith("/data.pkl") else data)
    return path


def _nested_tuples(levels: int) -> bytes:
    """Opcodes pushing ``t = (t, t)`` nested ``levels`` times over ``()``, its parts shared."""
    return b")q\x00" + b"".join(b"h%c\x86q%c" % (i, i + 1) for i in range(levels))


def test_a_key_of_shared_nested_tuples_is_refused_before_it_is_hashed(tmp_path):
    """A 957-byte checkpoint whose dict key was ``t = (t, t)`` forty times over: hashing it in
    one C call visited 2**40 parts, and neither Ctrl-C nor SIGTERM stopped ``eval``."""
    path = _pickled(tmp_path / "key.pt", b"\x80\x02}" + _nested_tuples(40) + b"K\x01s.")
    code = (
        "import sys\nfrom compressdrop.torchload import load_checkpoint\n"
        "try:\n    load_checkpoint(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
    )
    done = subprocess.run(  # (a hang, on the old code: the timeout ends it)
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert "refused: its data unfolds into more than 10,000,000 values" in done.stdout, done


def test_a_set_of_shared_nested_tuples_and_a_bytearray_of_a_number_are_refused(tmp_path):
    """A set is not walked after loading (its members were hashed while it was built), and
    ``bytearray(2000000000)`` in a 790-byte file took 2 GB."""
    members = b"cbuiltins\nset\n" + _nested_tuples(24) + b"\x85\x85R"  # set(((t,),))
    path = _pickled(tmp_path / "set.pt", b"\x80\x02}X\x01\x00\x00\x00a" + members + b"s.")
    with pytest.raises(CheckpointError, match="unfolds into more than 10,000,000 values"):
        load_checkpoint(path)
    zeros = b"cbuiltins\nbytearray\nJ\x00\x00\x10\x00\x85R"  # bytearray(1 << 20)
    path = _pickled(tmp_path / "zeros.pt", b"\x80\x02}X\x01\x00\x00\x00a" + zeros + b"s.")
    with pytest.raises(CheckpointError, match=r"refused: it makes a bytearray from a number"):
        load_checkpoint(path)
    plain = {"x": [(1, 2)] * 1000, "b": bytearray(b"abc"), "w": torch.ones(3)}
    torch.save(plain, tmp_path / "plain.pt")  # a bytearray of bytes, tuples shared in a list
    assert load_checkpoint(tmp_path / "plain.pt")["b"] == bytearray(b"abc")


def test_a_programs_sample_inputs_are_read_by_their_opcodes_first(tmp_path):
    """The sample inputs of a ``.pt2`` are unpickled by the same unpickler (by the check, and by
    ``torch.export.load``)."""
    from .test_security import _good_pt2

    _good_pt2(tmp_path / "good.pt2")
    zeros = b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x10\x00\x85R."
    inputs = _pickled(tmp_path / "inputs.pt", zeros).read_bytes()
    with zipfile.ZipFile(tmp_path / "good.pt2") as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(tmp_path / "evil.pt2", "w") as z:
        for name, data in entries:
            z.writestr(name, inputs if name.endswith("data/sample_inputs/model.pt") else data)
    with pytest.raises(CheckpointError, match=r"sample inputs are refused: it makes a bytearray"):
        load_model(tmp_path / "evil.pt2")
