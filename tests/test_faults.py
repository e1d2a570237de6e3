"""The faults a user meets: a run killed at any moment (a checkpoint write among them) resumes with
--resume to the result of an uninterrupted run and leaves no half-written file; a full disk gives
a clear error and keeps the last good checkpoint."""

import errno
import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from compressdrop.checkpoint import load_model, load_run_state
from compressdrop.cli import main

from .prewarmed import Prewarmed
from .test_cli import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with one fault injected: SIGKILL at the N-th call of a point in the run.
_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    point, n = sys.argv[1], int(sys.argv[2])
    calls = [0]

    def due():
        calls[0] += 1
        return calls[0] == n

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import torch
    import compressdrop.export
    import compressdrop.pruning

    def kill_on(owner, name, when=lambda *a, **k: True, before=lambda *a, **k: None):
        real = getattr(owner, name)
        def patched(*a, **k):
            if when(*a, **k) and due():
                before(*a, **k)
                die()
            return real(*a, **k)
        setattr(owner, name, patched)

    def half_written(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\\x03\\x04 half a checkpoint")

    if point == "step":  # inside an epoch
        kill_on(torch.optim.Adam, "step")
    elif point == "checkpoint-write":  # half of checkpoint.pt's temporary file is on disk
        is_run = lambda obj, *a, **k: isinstance(obj, dict) and obj.get("format") == "compressdrop-run"
        kill_on(torch, "save", when=is_run, before=half_written)
    elif point == "prune":  # between sparsify and fine-tune
        kill_on(compressdrop.pruning, "prune")
    elif point == "export":  # slim.pt written, the ONNX file not yet
        kill_on(compressdrop.export, "export_onnx")
    from compressdrop.cli import main
    sys.argv = ["compressdrop", *sys.argv[3:]]
    main()
    """
)


# The libraries each run imports, imported once (tests/prewarmed.py): a run is a child of an
# interpreter that ran these imports and nothing else, killed and resumed as a process of its own.
# Of compressdrop only what _KILLER imports before it patches (the CLI's modules import after it).
_PRELOAD = """
import sklearn.datasets, torch, torch._dynamo, torch.onnx._internal.exporter._core
import compressdrop.export, compressdrop.pruning
"""


@pytest.fixture(scope="module")
def warm():
    with Prewarmed(_PRELOAD, cwd=ROOT) as w:
        yield w


def _train(warm: Prewarmed, args, kill=None):
    prefix = [*(kill or ("none", "0"))]
    return warm.run(_KILLER, *prefix, "train", *map(str, args), cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm):
    d = tmp_path_factory.mktemp("faults")
    recipe = tiny_recipe(d / "r.yaml", pretrain=3, sparsify=6, finetune=2, onnx=True)
    text = yaml.safe_load(recipe.read_text())  # the kill at step 45 lands in a cosine schedule
    text["stages"]["sparsify"]["lr_schedule"] = "cosine"
    recipe.write_text(yaml.safe_dump(text))
    res = _train(warm, ["--recipe", recipe, "--device", "cpu", "--out", d / "full"])
    assert res.returncode == 0, res.stderr[-2000:]
    return recipe, d / "full"


# where each kill lands in the reference recipe (3 pretrain, 6 sparsify, 2 fine-tune epochs of
# 10 steps on digits): the 45th optimizer step is in the middle of the second gated epoch (noise
# drawn, banks primed), the 5th checkpoint write ends the second gated epoch
KILLS = {("step", 45): "sparsify", ("checkpoint-write", 5): "sparsify", ("prune", 1): "sparsify"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, n", [("step", 45), ("checkpoint-write", 5), ("prune", 1), ("export", 1)]
)
def test_a_run_killed_anywhere_resumes_to_the_same_result(reference, warm, point, n, tmp_path):
    recipe, full = reference
    args = ["--recipe", recipe, "--device", "cpu", "--out", tmp_path / "run"]
    killed = _train(warm, args, kill=(point, str(n)))
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "run" / "report.json").exists(), "the run finished before the kill"
    if (point, n) in KILLS:  # the kill hit the stage it was meant for
        state = load_run_state(tmp_path / "run" / "checkpoint.pt")
        assert state["stage"] == KILLS[point, n], state["stage"]
    resumed = _train(warm, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
    a, b = load_model(full / "slim.pt"), load_model(out / "slim.pt")
    assert a.prune_report.architecture() == b.prune_report.architecture()
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (full, out))
    assert ra["slim"] == rb["slim"]


def test_a_full_disk_gives_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import compressdrop.training.runner as runner

    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=3, sparsify=1, finetune=1, onnx=False)
    real = runner.torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third epoch's checkpoint: the disk is full
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(runner.torch, "save", save)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["train", "--recipe", str(recipe), "--device", "cpu", "--out", str(out)]
    )
    assert res.exit_code == 1 and "No space left on device" in res.output, res.output
    assert "Traceback" not in res.output
    state = load_run_state(out / "checkpoint.pt")  # the last good one, whole
    assert (state["stage"], state["epoch"]) == ("pretrain", 2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no partial file

    monkeypatch.setattr(runner.torch, "save", real)  # space freed: the run continues
    res = CliRunner().invoke(
        main, ["train", "--recipe", str(recipe), "--device", "cpu", "--out", str(out), "--resume"]
    )
    assert res.exit_code == 0, res.output
