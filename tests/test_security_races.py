"""A file swapped between its check and its read (a thirteenth security review): another process
renames a file over the checked one, or retargets the link the user named, after compressdrop's
check returned and before the library reads the path again. The checks and the read now go
through one open file (or the bytes read once), so the swapped file is never read."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import compressdrop.torchload as torchload
from compressdrop.errors import CheckpointError
from compressdrop.torchload import load_checkpoint

from .test_security_file_data import _pickled


def swap_after(monkeypatch, owner, name: str, evil: Path, target: Path) -> None:
    """Patch ``owner.name`` (a check) so that, once it returned, ``evil`` takes ``target``'s
    place: renamed over it, or, where ``target`` is a link, the link retargeted at it."""
    check = getattr(owner, name)

    def swapping(*args, **kwargs):
        result = check(*args, **kwargs)
        if target.is_symlink():
            tmp = target.with_name(target.name + ".new")
            tmp.symlink_to(evil)
            os.replace(tmp, target)
        else:
            os.replace(evil, target)
        return result

    monkeypatch.setattr(owner, name, swapping)


def run_apart(code: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -c code *args`` in a process of its own, its output captured; a hang (on the old
    code) ends at ``timeout`` with ``TimeoutExpired``."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


#: the end of a script that calls each of its ``readers`` on ``sys.argv[1]`` and prints what
#: each raised
EACH_ERROR = (
    "for read in readers:\n    try:\n        read(sys.argv[1])\n"
    "    except Exception as e:\n        print(e)\n"
)


def errors_on_a_fifo(path: Path, setup: str) -> str:
    """What a process of its own prints when ``setup`` (after ``import sys``; it names its
    ``readers``) has each reader read a FIFO made at ``path`` (:data:`EACH_ERROR`)."""
    os.mkfifo(path)
    done = run_apart("import sys\n" + setup + EACH_ERROR, path)
    return done.stdout + done.stderr


def _bytearray_of_a_number(path: Path) -> Path:
    """A checkpoint the pickle scan refuses: ``bytearray(1 << 20)`` (``1 << 31``: 2 GB)."""
    zeros = b"cbuiltins\nbytearray\nJ\x00\x00\x10\x00\x85R"
    return _pickled(path, b"\x80\x02}X\x01\x00\x00\x00a" + zeros + b"s.")


@pytest.mark.parametrize("linked", [False, True], ids=["renamed-over", "link-retargeted"])
def test_a_checkpoint_swapped_after_the_pickle_scan_is_not_read(linked, monkeypatch, tmp_path):
    evil = _bytearray_of_a_number(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="bytearray from a number"):
        load_checkpoint(evil)
    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    target = tmp_path / "model.pt"
    if linked:
        target.symlink_to(tmp_path / "good.pt")
    else:
        os.replace(tmp_path / "good.pt", target)
    swap_after(monkeypatch, torchload, "archive_problem", evil, target)
    loaded = load_checkpoint(target)
    assert set(loaded) == {"w"} and torch.equal(loaded["w"], torch.ones(3))


def test_a_checkpoint_swapped_after_the_zip_bomb_check_is_not_read(monkeypatch, tmp_path):
    torch.save({"w": torch.zeros(1 << 20)}, tmp_path / "plain.pt")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as zi,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as zo,
    ):
        for item in zi.infolist():
            zo.writestr(item.filename, zi.read(item), zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="a zip bomb"):
        load_checkpoint(tmp_path / "bomb.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    swap_after(monkeypatch, torchload, "_zip_bomb", tmp_path / "bomb.pt", tmp_path / "model.pt")
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["w"], torch.ones(3))


def test_a_safetensors_file_swapped_after_its_check_is_not_read(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    save_file({"evil": torch.zeros(5)}, str(tmp_path / "other.safetensors"))
    target, other = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    swap_after(monkeypatch, torchload, "is_safetensors", other, target)
    loaded = load_checkpoint(target)
    assert set(loaded) == {"w"} and torch.equal(loaded["w"], torch.ones(3))


def test_a_fifo_or_a_folder_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_fifo_is_refused_by_load_model_and_the_program_readers_without_blocking(tmp_path):
    """``load_model`` asks first whether a file is a ``.pt2``: Python's zip reader opened a FIFO
    there and blocked without end, as did the program readers' own read of a path."""
    said = errors_on_a_fifo(
        tmp_path / "fifo.pt2",
        "from compressdrop.checkpoint import load_model\n"
        "from compressdrop.programs import is_pt2, load_program, load_program_safely\n"
        "print(is_pt2(sys.argv[1]))\nreaders = (load_model, load_program, load_program_safely)\n",
    )
    assert said.startswith("False\n"), said
    assert said.count("fifo.pt2: not a file") == 3, said


def test_a_config_swapped_after_the_folder_checks_is_not_read(monkeypatch, tmp_path):
    """The checks read config.json (remote code, Hub kernels, sizes against the weights), then
    transformers read the file again: a config renamed over it after the checks (here 40 layers
    where the weights hold 2, the rest made up: the size check's case; a Hub kernel named the
    same way is code) was built as it said."""
    import json

    import compressdrop.hf_folder as hf_folder
    from compressdrop.checkpoint import load_model

    from .test_hf_folder import _llama_folder

    folder = _llama_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps({**config, "num_hidden_layers": 40}))
    refused = _llama_folder(tmp_path / "refused")
    (refused / "config.json").write_text(evil.read_text())
    with pytest.raises(CheckpointError, match="describes 40 layers"):
        load_model(refused)
    swap_after(monkeypatch, hf_folder, "check_sizes", evil, folder / "config.json")
    model = load_model(folder)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2


def test_an_onnx_file_swapped_after_the_loop_check_is_not_run(monkeypatch, tmp_path):
    """The check of a Loop's trip count read the file, then onnxruntime read the path again: a
    graph renamed over it between them ran 2^62 turns, which nothing stops."""
    import numpy as np
    import onnx

    from compressdrop import runtime
    from compressdrop.errors import InputError

    from .test_security_onnx_loop import loop_graph

    loop_graph(tmp_path / "model.onnx", 3)
    loop_graph(tmp_path / "evil.onnx", 2**62)
    proto = onnx.load(tmp_path / "evil.onnx")
    onnx.helper.set_model_props(proto, {"evil": "yes"})
    onnx.save(proto, tmp_path / "evil.onnx")
    with pytest.raises(InputError, match="a Loop of the graph runs"):
        runtime.ort_session(tmp_path / "evil.onnx", "cpu")
    swap_after(
        monkeypatch, runtime, "_check_loops", tmp_path / "evil.onnx", tmp_path / "model.onnx"
    )
    session, _ = runtime.ort_session(tmp_path / "model.onnx", "cpu")
    assert "evil" not in session.get_modelmeta().custom_metadata_map
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert runtime.ort_run(session, {"x": x}, "model.onnx").shape == (2, 10)  # 3 turns


def test_an_onnx_file_with_external_data_still_loads_from_its_folder(tmp_path):
    """onnxruntime is given the file's bytes: its external data files are read from its folder
    (and one that escapes it is refused by onnxruntime, as for a path)."""
    import numpy as np
    import onnx

    from compressdrop import runtime
    from compressdrop.export import load_onnx_metadata

    from .test_security_onnx_loop import loop_graph

    loop_graph(tmp_path / "plain.onnx", 3)
    proto = onnx.load(tmp_path / "plain.onnx")
    onnx.helper.set_model_props(proto, {"classes": "[]"})
    (tmp_path / "m").mkdir()
    onnx.save(
        proto, tmp_path / "m" / "model.onnx", save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.data", size_threshold=1024,
    )  # fmt: skip
    assert load_onnx_metadata(tmp_path / "m" / "model.onnx") == {"classes": "[]"}
    session, _ = runtime.ort_session(tmp_path / "m" / "model.onnx", "cpu")
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert runtime.ort_run(session, {"x": x}, "model.onnx").shape == (2, 10)


def test_an_onnx_fifo_is_refused_without_blocking(tmp_path):
    """``eval`` read a FIFO's metadata (its class names) before anything checked it was a file:
    the open blocked without end."""
    said = errors_on_a_fifo(
        tmp_path / "fifo.onnx",
        "from compressdrop.export import load_onnx_metadata\n"
        "from compressdrop.runtime import ort_session\n"
        "readers = (load_onnx_metadata, lambda p: ort_session(p, 'cpu'))\n",
    )
    assert said.count("fifo.onnx: not a file") == 2, said


def test_a_recipe_swapped_after_its_checks_is_read_once_and_bounded(tmp_path):
    """A recipe's size was checked by path and the file read whole by path again: a link
    retargeted in between at a FIFO blocked without end (at /dev/zero: memory without end)."""
    (tmp_path / "r.yaml").write_text("name: ok\nmodel: {arch: lenet300}\n")
    os.symlink(tmp_path / "r.yaml", tmp_path / "link.yaml")
    os.mkfifo(tmp_path / "fifo")
    code = (
        "import os, sys\nimport compressdrop.recipes.io as io\nfound = io.recipe_path\n"
        "def swapping(p):\n    got = found(p)\n    os.replace(sys.argv[2], sys.argv[1])\n"
        "    return got\nio.recipe_path = swapping\ntry:\n    io.load_recipe(sys.argv[1])\n"
        "except Exception as e:\n    print(e)\n"
    )
    os.symlink(tmp_path / "fifo", tmp_path / "new.yaml")
    done = run_apart(code, tmp_path / "link.yaml", tmp_path / "new.yaml")
    assert "link.yaml: not a file" in done.stdout, done
