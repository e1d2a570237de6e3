"""No code named by a file runs without the user's consent: not through pickle, not through a
factory name, through the Python API and through every command that reads a model or a run."""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressdrop.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_model, save_model
from compressdrop.cli import main
from compressdrop.models import build_model

from .test_cli import tiny_recipe


def tiny_net(input_shape=(1, 8, 8), num_classes=10) -> nn.Module:
    """A factory nobody registered: files that name it need consent."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
    )


def _evil_records(marker) -> dict[str, dict]:
    """``arch`` records that would each create ``marker`` (or run code) if their factory ran."""
    return {
        "subprocess:run": {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
        "os:system": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "builtins:eval": {
            "factory": "builtins:eval",
            "kwargs": {"source": f"open({str(marker)!r}, 'w')"},
        },
        "builtins:exec": {
            "factory": "builtins:exec",
            "kwargs": {"source": f"open({str(marker)!r}, 'w')"},
        },
        # a module-level function of an installed package, harmless-looking
        "numpy:save": {"factory": "numpy:save", "kwargs": {"file": str(marker), "arr": [1]}},
    }


def _checkpoint(path, arch: dict, kind: str = "dense") -> None:
    """A well-formed compressdrop checkpoint (plain data) whose arch record is ``arch``."""
    weights = build_model("lenet300", (1, 8, 8)).state_dict()
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": {**arch, "input_shape": [1, 8, 8], "num_classes": 10},
            "kind": kind,
            "recipe": None,
            "meta": {},
            "state_dict": weights,
        },
        path,
    )


class _Exploit:
    """Unpickling this runs ``os.system``: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_exploit(path, marker) -> None:
    torch.save({"format": FORMAT, "payload": _Exploit(marker)}, path)


EVIL = list(_evil_records("m"))


@pytest.mark.parametrize("spec", EVIL)
def test_load_model_refuses_a_factory_the_file_names(spec, tmp_path):
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    _checkpoint(tmp_path / "evil.pt", _evil_records(marker)[spec])
    with pytest.raises(CheckpointError, match="refused") as info:
        load_model(tmp_path / "evil.pt")
    assert spec in str(info.value) and "--arch" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["subprocess:run", "numpy:save"])
def test_the_refused_payloads_are_live(spec, tmp_path):
    # the refusal is what stops them: trusted, the same files do run their code
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    _checkpoint(tmp_path / "evil.pt", _evil_records(marker)[spec])
    with pytest.raises(CheckpointError, match=r"not an nn\.Module"):
        load_model(tmp_path / "evil.pt", trust_code=True)
    assert marker.exists()


def test_nothing_is_imported_before_consent(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef build(**kw):\n    raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _checkpoint(tmp_path / "evil.pt", {"factory": "side_effect_mod:build"})
    with pytest.raises(CheckpointError, match="nothing was imported"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists() and "side_effect_mod" not in sys.modules


def test_a_pickle_exploit_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    _pickle_exploit(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="holds pickled Python objects") as info:
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    # it says what the file names and how to consent; not "corrupt", not torch's advice to load
    # with weights_only=False (the old message matched "arbitrary code" through that advice)
    said = str(info.value)
    assert "system" in said and "--trust-pickle" in said
    assert "corrupt" not in said and "weights_only" not in said


def test_inert_extras_are_read_and_an_object_array_is_still_refused(tmp_path):
    """A training save's numpy scalars and argparse arguments are built without running code from
    the file (a fixed table, not the names the file gives); an object array, which could carry any
    pickled object, is refused as pickled objects, and its payload does not run."""
    import argparse

    import numpy as np

    from compressdrop.torchload import load_checkpoint

    args = argparse.Namespace(lr=0.1, out=Path("/runs/a"))
    torch.save({"best": np.float64(0.9), "n": np.int64(3), "hist": np.arange(3.0), "args": args},
               tmp_path / "extras.pt")  # fmt: skip
    got = load_checkpoint(tmp_path / "extras.pt")
    assert got["best"] == 0.9 and got["n"] == 3 and got["hist"].tolist() == [0.0, 1.0, 2.0]
    assert got["args"] == args
    marker = tmp_path / "marker.npy"

    class Exploit:
        def __reduce__(self):
            return (np.save, (str(marker), np.zeros(1)))

    torch.save({"x": np.array([Exploit()], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match=r"numpy dtype 'O8' was refused"):
        load_checkpoint(tmp_path / "objects.pt")
    assert not marker.exists()


def test_numpy_stand_ins_build_plain_data_only(tmp_path):
    """A review built, through the allowlisted numpy dtype classes, a "float64" array whose dtype
    state claimed an object field over the file's bytes (reading it dereferenced 0x4141...: a
    crash) and a 64 KB writable view over 16 bytes; `ndarray(shape, "O", buffer)` would do the
    same. numpy's constructors are no longer handed to the unpickler: stand-ins build plain
    dtypes in numpy's canonical state and buffers of exactly their size. The dtypes a training
    script saves load as before."""
    import argparse

    import numpy as np

    from compressdrop.torchload import load_checkpoint

    core = np._core.multiarray
    pointers = (0x4141414141414140).to_bytes(8, "little") * 2

    class Field:
        def __reduce__(self):
            return (np.dtype, ("O8", False, False))

    class Forged:  # a float64 dtype whose state names an object field
        def __reduce__(self):
            state = (3, "|", None, ("x",), {"x": (Field(), 0)}, 8, 1, 0)
            return (np.dtype, ("f8", False, True), state)

    class Flagged:  # a float64 dtype whose state claims object items
        def __reduce__(self):
            return (np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63))

    class Array:
        def __init__(self, dtype):
            self.dtype = dtype

        def __reduce__(self):
            return (core._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (2,), self.dtype, False, pointers))  # fmt: skip

    class Raw:  # ndarray(shape, "O", buffer) itself
        def __reduce__(self):
            return (np.ndarray, ((2,), "O", pointers))

    for name, obj, said in (
        ("fields", Array(Forged()), "numpy dtype 'O8' was refused"),
        ("flags", Array(Flagged()), "numpy dtype '<f8': odd state was refused"),
        ("raw", Raw(), "numpy.ndarray"),
    ):
        torch.save({"state_dict": {}, "x": obj}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=said):
            load_checkpoint(tmp_path / f"{name}.pt")
    plain = {
        "rng": np.random.get_state(),
        "u16": np.uint16(7),
        "c": np.array([1 + 2j]),
        "names": np.array(["cat", "dog"]),
        "s": np.str_("owl"),
        "be": np.arange(3, dtype=">f4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "args": argparse.Namespace(hist=np.arange(2.0)),
    }
    torch.save(plain, tmp_path / "plain.pt")
    got = load_checkpoint(tmp_path / "plain.pt")
    assert np.array_equal(got["rng"][1], plain["rng"][1]) and got["u16"] == 7
    assert got["c"][0] == 1 + 2j and got["names"].tolist() == ["cat", "dog"] and got["s"] == "owl"
    assert got["be"].tolist() == [0.0, 1.0, 2.0] and got["be"].dtype == np.dtype(">f4")
    assert np.array_equal(got["fortran"], plain["fortran"]) and got["args"].hist.tolist() == [0, 1]


def test_bad_records_are_refused(tmp_path):
    for bad, why in [
        ({"factory": "os.system"}, "must look like"),
        ({"factory": "os:system; rm"}, "must look like"),
        ({"name": "lenet300", "factory": "x:y"}, "exactly one"),
        ({"name": "lenet300", "code": "x"}, "unknown key"),
    ]:
        _checkpoint(tmp_path / "bad.pt", bad)
        with pytest.raises(CheckpointError, match=why):
            load_model(tmp_path / "bad.pt")


def test_consent_given_three_ways_and_reference_nets_need_none(tmp_path):
    model = tiny_net()
    model.arch = {"factory": "tests.test_security:tiny_net", "input_shape": [1, 8, 8]}
    save_model(model, tmp_path / "m.pt")
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(CheckpointError, match=r"tests\.test_security:tiny_net"):
        load_model(tmp_path / "m.pt")
    for kwargs in (
        {"arch": "tests.test_security:tiny_net"},
        {"arch": tiny_net},
        {"trust_code": True},
    ):
        back = load_model(tmp_path / "m.pt", **kwargs)
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    # compressdrop's own reference nets, by name or by factory, load without consent
    _checkpoint(tmp_path / "ref.pt", {"factory": "compressdrop.models:lenet300_100"})
    assert isinstance(load_model(tmp_path / "ref.pt"), nn.Module)


def _cli(args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _commands(path, tmp_path) -> dict[str, list]:
    return {
        "prune": ["prune", path, "-o", tmp_path / "slim.pt"],
        "prune --data": ["prune", path, "-o", tmp_path / "slim.pt", "--data", "digits"],
        "export": ["export", path, "-o", tmp_path / "m.onnx"],
        "eval": ["eval", path, "--data", "digits"],
        "eval --mc": ["eval", path, "--data", "digits", "--mc", "3"],
        "sweep": ["sweep", path, "--data", "digits", "--out", tmp_path / "sweep"],
    }


@pytest.mark.parametrize("command", list(_commands("f", Path("d"))))
@pytest.mark.parametrize("spec", [*EVIL, "pickle"])
def test_every_command_that_reads_a_model_refuses(command, spec, tmp_path):
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    path = tmp_path / "evil.pt"
    if spec == "pickle":
        _pickle_exploit(path, marker)
    else:
        _checkpoint(path, _evil_records(marker)[spec])
    res = _cli(_commands(path, tmp_path)[command])
    assert res.exit_code == 1, res.output
    assert ("arbitrary code" if spec == "pickle" else f"calling {spec}(") in res.output
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]  # nothing written


@pytest.mark.parametrize("spec", ["pickle", "os:system"])
def test_resume_reads_the_run_file_through_the_safe_loader(spec, tmp_path):
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    recipe = tiny_recipe(tmp_path / "r.yaml")
    out = tmp_path / "out"
    out.mkdir()
    if spec == "pickle":
        _pickle_exploit(out / "checkpoint.pt", marker)
        expect = "arbitrary code"
    else:  # a model file put where the run file belongs is not a run file
        _checkpoint(out / "checkpoint.pt", _evil_records(marker)[spec])
        expect = "not a compressdrop run checkpoint"
    res = _cli(["train", "--recipe", recipe, "--data", "digits", "--out", out, "--resume"])
    assert res.exit_code == 1 and expect in res.output, res.output
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("spec", ["subprocess:run", "os:system"])
def test_a_recipe_file_may_not_choose_code_either(spec, tmp_path):
    marker = tmp_path / "marker.npy"  # numpy.save would add .npy
    record = _evil_records(marker)[spec]
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"arch": spec, "kwargs": record["kwargs"]})
    res = _cli(["train", "--recipe", recipe, "--data", "digits", "--out", tmp_path / "out"])
    assert res.exit_code == 1 and f"calling {spec}(" in res.output, res.output
    assert not marker.exists()


# --- torch.export programs (.pt2): torch.export.load itself runs code from a crafted archive ------


def _good_pt2(path) -> None:
    model = build_model("lenet300", (1, 8, 8)).eval()
    program = torch.export.export(
        model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, path)


def _rewrite(src, dst, fn) -> None:
    """Copy the zip ``src`` to ``dst`` with each member's bytes passed through ``fn(name, data)``."""
    import zipfile

    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for item in zi.infolist():
            zo.writestr(item, fn(item.filename, zi.read(item.filename)))


def _pickled_exploit_bytes(marker) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"x": _Exploit(marker)}, buf)
    return buf.getvalue()


def _crafted_pt2(kind: str, tmp_path, marker) -> Path:
    import json

    good, evil = tmp_path / "good.pt2", tmp_path / "evil.pt2"
    _good_pt2(good)
    touch = f"__import__('os').system('touch {marker}')"

    def fn(name: str, data: bytes) -> bytes:
        if kind == "expr" and name.endswith("models/model.json"):
            return data.replace(b"Symbol('s", f"{touch} or Symbol('s".encode(), 1)
        if kind == "target" and name.endswith("models/model.json"):
            return data.replace(b"torch.ops.aten.relu.default", b"torch.hub.load", 1)
        if kind == "custom-obj" and name.endswith("models/model.json"):
            doc = json.loads(data)
            doc["custom_obj_values"] = {"x": {"name": "obj", "class_fqn": "os.system"}}
            return json.dumps(doc).encode()
        if kind == "use-pickle" and name.endswith("_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"].values()))
            first["use_pickle"] = True
            return json.dumps(doc).encode()
        if kind == "use-pickle" and name.endswith("data/weights/weight_0"):
            return _pickled_exploit_bytes(marker)
        if kind == "sample-inputs" and "data/sample_inputs/" in name:
            return _pickled_exploit_bytes(marker)
        return data

    _rewrite(good, evil, fn)
    return evil


PT2_ATTACKS = ["expr", "target", "custom-obj", "use-pickle", "sample-inputs"]


@pytest.mark.parametrize("kind", PT2_ATTACKS)
def test_a_crafted_pt2_is_refused_before_torch_export_load_sees_it(kind, tmp_path):
    marker = tmp_path / "marker.npy"
    evil = _crafted_pt2(kind, tmp_path, marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()
    for command in (
        ["prune", evil, "--data", "digits", "-o", tmp_path / "slim.pt2"],
        ["export", evil, "-o", tmp_path / "m.onnx"],
        ["eval", evil, "--data", "digits"],
    ):
        res = _cli(command)
        assert res.exit_code == 1 and "refused" in res.output, res.output
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "good.pt2"]


@pytest.mark.filterwarnings("ignore")
def test_plain_torch_export_load_would_have_run_it(tmp_path):
    # why the check exists: PyTorch parses the shape expressions with sympy.sympify (an eval)
    marker = tmp_path / "marker.npy"
    evil = _crafted_pt2("expr", tmp_path, marker)
    with contextlib.suppress(Exception):
        torch.export.load(evil)
    if not marker.exists():
        pytest.skip("this torch no longer evaluates shape expressions; the check stays anyway")
    assert marker.exists()


def test_guards_code_from_the_file_never_runs(tmp_path):
    import json

    marker = tmp_path / "marker.npy"
    good = tmp_path / "good.pt2"
    _good_pt2(good)

    def fn(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            doc["guards_code"] = [f"__import__('os').system('touch {marker}') or True"]
            return json.dumps(doc).encode()
        return data

    _rewrite(good, tmp_path / "guarded.pt2", fn)
    model = load_model(tmp_path / "guarded.pt2")
    model(torch.randn(3, 1, 8, 8))
    assert not marker.exists()


def _with_record(src: Path, dst: Path, record: bytes, deflate: bool = False) -> Path:
    """The .pt2 ``src`` with its extra/compressdrop.json replaced by ``record``."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/extra/compressdrop.json"):
                data = record
                info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zout.writestr(info, data)
    return dst


def test_a_crafted_class_record_in_a_program_is_ignored_not_a_crash(tmp_path):
    """A .pt2's extra/compressdrop.json is the file's to say (a review): nested past the
    recursion limit it raised a raw RecursionError, damaged a BadZipFile, and a deflated 215 kB
    entry held a 200 MB class name that load_model inflated. Each loads now, without names; a
    deflated entry that expands a thousandfold is refused with the whole archive (a zip bomb)."""
    from compressdrop._attrs import set_record
    from compressdrop.export import export_program

    net = nn.Sequential(nn.Linear(4, 3))
    set_record(net, "class_names", ("a", "b", "c"))
    good = tmp_path / "good.pt2"
    export_program(net, torch.randn(2, 4), good)
    assert load_model(good).class_names == ("a", "b", "c")
    records = {
        "deep": b"[" * 200_000,
        "not_a_list": b'{"classes": "abc"}',
        "not_an_object": b"[1, 2]",
        "long_name": b'{"classes": ["' + b"x" * 5_000 + b'"]}',
    }
    for name, record in records.items():
        path = _with_record(good, tmp_path / f"{name}.pt2", record)
        assert not hasattr(load_model(path), "class_names"), name
    bomb = b'{"classes": ["' + b"x" * (3 << 20) + b'"]}'
    path = _with_record(good, tmp_path / "bomb.pt2", bomb, deflate=True)
    with pytest.raises(CheckpointError, match="a zip bomb"):
        load_model(path)
    # a damaged entry (its CRC no longer matches): the record's bytes changed in place
    stored = _with_record(good, tmp_path / "stored.pt2", b'{"classes": ["x"]}')
    damaged = stored.read_bytes().replace(b'{"classes": ["x"]}', b'{"classes": ["y"]}', 1)
    (tmp_path / "damaged.pt2").write_bytes(damaged)
    assert not hasattr(load_model(tmp_path / "damaged.pt2"), "class_names")


@pytest.mark.parametrize(
    "entry", ["models/model.json", "data/weights/model_weights_config.json"], ids=["graph", "cfg"]
)
def test_a_program_whose_json_is_not_what_torch_writes_is_a_checkpoint_error(entry, tmp_path):
    """check_pt2_archive reads the archive's JSON entries: nested past the recursion limit, or
    of another shape (a list where torch writes an object), it raised RecursionError or
    AttributeError instead of naming the file (a review)."""
    import zipfile

    from compressdrop.export import export_program

    good = tmp_path / "good.pt2"
    export_program(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4), good)
    for i, record in enumerate((b"[" * 200_000, b"[1, 2]")):
        bad = tmp_path / f"bad{i}.pt2"
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
            for info in zin.infolist():
                zout.writestr(info, record if info.filename.endswith(entry) else zin.read(info))
        with pytest.raises(CheckpointError, match=r"bad\d\.pt2: (not a readable|refused)"):
            load_model(bad)
