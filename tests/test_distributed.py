"""Recipe training under torch.distributed: two gloo processes on the CPU against one process."""

import dataclasses
import faulthandler
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressdrop.checkpoint import load_model
from compressdrop.data import load_digits
from compressdrop.recipes import load_recipe
from compressdrop.training.distributed import Dist, shutdown
from compressdrop.training.runner import run_recipe

from tests.test_cli import tiny_recipe

# several processes each: minutes on two cores (make test-fast leaves them out)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gated.pt", "slim.pt", "slim.onnx", "slim.pt2", "report.json"}


def _write_recipe(tmp: Path) -> Path:
    """The parent writes the recipe file once, before the ranks start; they only read it.

    Every rank writing it too (``tiny_recipe`` opens it with ``"w"``) raced: one rank's write
    truncates the file while the other reads it, ``load_recipe`` of the empty file gives the
    default recipe (batch 64, 10/20/5 epochs) without complaint, and the two ranks then run
    different step counts until gloo aborts on mismatched collectives (``8 vs 4``: one rank's
    float64 epoch-mean against the other's int32 ``all_true``).
    """
    return tiny_recipe(tmp / "tiny.yaml", pretrain=1, sparsify=2, finetune=1)


def _recipe(tmp: Path):
    # batch 128 on 1,212 training images: the last global batch (60) splits evenly across 2 ranks
    return load_recipe(str(tmp / "tiny.yaml"))


def _rank_main(rank: int, target: str, tmp: str) -> None:
    """One spawned rank: run ``target(rank, tmp)`` with this rank's stderr in ``stderr{rank}.txt``
    (faulthandler on: a crash leaves its stack there), then leave with ``os._exit``.

    ``destroy_process_group`` does not stop gloo: its ``gloo_tcp_loop`` and ``pt_gloo_runloop``
    threads and sockets live on until the process ends, and an ordinary exit then tears them down in
    the interpreter's and the C++ runtime's finalisation, racing the peer rank's own exit. That race
    is the library's teardown, not what these tests check, so a rank whose work is done and written
    ends at once; the parent checks its exit code and shows its stderr when it is not 0.
    """
    err = os.open(Path(tmp, f"stderr{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(err, 2)
    faulthandler.enable(all_threads=True)
    code = 0
    try:
        globals()[target](rank, tmp)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn(target: str, tmp: Path, *, timeout: float = 300) -> None:
    """Run ``target`` on two spawned ranks; fail with every rank's exit code and stderr."""
    ctx = mp.spawn(_rank_main, args=(target, str(tmp)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    problem = None
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                problem = f"a rank was still running after {timeout:.0f} s"
                break
    except Exception as e:  # mp reports the first rank that failed and stops the others
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
        p.join(5)
    report = [problem]
    for r, p in enumerate(ctx.processes):
        f = tmp / f"stderr{r}.txt"
        text = f.read_text(errors="replace") if f.exists() else "(no stderr file)"
        if len(text) > 4000:  # the cause (a C++ `terminate called ...`) comes first; faulthandler's
            text = f"{text[:3000]}\n[...]\n{text[-1000:]}"  # module list would push it out
        report.append(f"--- rank {r}: exit code {p.exitcode}; stderr:\n{text}")
    pytest.fail("\n".join(report))


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    written: list[str] = []
    if rank != 0:  # record every file this rank would write
        import compressdrop._io as io

        real_save, real_replace = torch.save, os.replace
        torch.save = lambda obj, f, *a, **k: (written.append(str(f)), real_save(obj, f, *a, **k))
        os.replace = lambda a, b: (written.append(str(b)), real_replace(a, b))
        assert io  # atomic_write itself goes through os.replace
    clean = False
    try:
        result = run_recipe(
            _recipe(Path(tmp)), load_digits(), Path(tmp) / "ddp", device="cpu", dist=Dist(rank, 2)
        )
        clean = True
    finally:
        if rank != 0:
            torch.save, os.replace = real_save, real_replace
        shutdown(clean=clean)  # a barrier first: no rank leaves while the other is mid-collective
    Path(tmp, f"rank{rank}.json").write_text(
        json.dumps({"written": written, "arch": result.report["architecture_after"]})
    )


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (as each rank has), the count put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_gloo_processes_match_one_process(tmp_path, one_thread):
    _write_recipe(tmp_path)
    single = run_recipe(_recipe(tmp_path), load_digits(), tmp_path / "single", device="cpu")
    _spawn("_worker", tmp_path)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["written"] == []  # only rank 0 wrote files
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == FILES
    assert ranks[0]["arch"] == ranks[1]["arch"] == single.report["architecture_after"]

    a = load_model(tmp_path / "single" / "gated.pt").state_dict()
    b = load_model(tmp_path / "ddp" / "gated.pt").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape, k
        if not a[k].is_floating_point():
            assert torch.equal(b[k], a[k]), k
            continue
        # Two ranks sum each gradient in another order than one process, so the runs differ by
        # float32 rounding, and Adam turns that into steps of up to its learning rate for a
        # coordinate whose gradient is near zero: compared element by element, one gate μ of 300
        # differed by 2.1e-5 (at μ = −0.085). Tensor by tensor, ‖b − a‖ / ‖a‖ was at most 1.3e-5
        # (that μ; every weight ≤ 2e-7), while ranks that each drew their own noise (no
        # noise_shard, the bug this test guards against) gave 5.7e-4 to 0.17 on every tensor.
        rel = float((b[k].double() - a[k].double()).norm() / a[k].double().norm().clamp(min=1e-12))
        assert rel <= 1e-4, f"{k}: ‖ddp − single‖ / ‖single‖ = {rel:.3g}"
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["slim"]["test_accuracy"] == pytest.approx(
        single.report["slim"]["test_accuracy"], abs=0.01
    )


def test_cli_nproc_launches_torchrun_and_resume_works(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", pretrain=1, sparsify=1, finetune=1, onnx=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compressdrop.cli", "train", "--recipe", str(recipe)]
    cmd += ["--out", str(tmp_path / "o"), "--device", "cpu", "--nproc", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # one JSON document: only rank 0 printed
    assert report["world_size"] == 2
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"gated.pt", "slim.pt", "report.json"}
    # --resume on a finished run: a clear error that the run is complete
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert again.returncode == 1
    assert "holds a completed run" in again.stderr


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_under_torchrun(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", pretrain=1, sparsify=2, finetune=1, onnx=False)

    def stop_after_first_sparsify_epoch(event):
        if event.get("event") == "epoch" and event["stage"] == "sparsify":
            raise _Stop

    with pytest.raises(_Stop):
        run_recipe(
            load_recipe(str(recipe)),
            load_digits(),
            tmp_path / "o",
            device="cpu",
            progress=stop_after_first_sparsify_epoch,
        )
    assert (tmp_path / "o" / "checkpoint.pt").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compressdrop.cli", "train", "--recipe", str(recipe), "--resume"]
    cmd += ["--out", str(tmp_path / "o"), "--device", "cpu", "--nproc", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["world_size"] == 2
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [
        ("pretrain", 1),
        ("sparsify", 1),
        ("sparsify", 2),
        ("finetune", 1),
    ]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def _nan_worker(rank: int, tmp: str) -> None:
    import datetime

    from compressdrop.training.runner import TrainingDiverged

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store-nan",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    data = load_digits()
    if rank == 1:  # only this rank's data is broken: its loss is NaN, rank 0's is finite
        data.x_train[:] = float("nan")
    outcome, clean = "finished", True
    try:
        run_recipe(_recipe(Path(tmp)), data, Path(tmp) / "ddp", device="cpu", dist=Dist(rank, 2))
    except TrainingDiverged as e:  # every rank stops at the same agreed step: still in step
        outcome = f"TrainingDiverged: {e}"
    except Exception as e:  # a hang that timed out, or a broken connection
        outcome, clean = f"{type(e).__name__}: {e}", False
    finally:
        Path(tmp, f"nan{rank}.txt").write_text(outcome)
        shutdown(clean=clean)


def test_a_nan_loss_on_one_rank_stops_every_rank_at_once(tmp_path):
    _write_recipe(tmp_path)
    _spawn("_nan_worker", tmp_path, timeout=120)
    out = [(tmp_path / f"nan{r}.txt").read_text() for r in (0, 1)]
    assert out[1].startswith("TrainingDiverged: loss is nan"), out[1]
    assert out[0].startswith("TrainingDiverged: another rank's loss is not finite"), out[0]
    assert "step 1 (rank 0)" in out[0] and "step 1 (rank 1)" in out[1]
    # at step 1 no epoch has ended: no checkpoint to name (it named one that did not exist)
    assert all("; no checkpoint (lower the learning rate?)" in o for o in out), out


def _mismatch_worker(rank: int, tmp: str) -> None:
    from compressdrop.training.distributed import RanksDisagree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-mm", rank=rank, world_size=2)
    recipe = _recipe(Path(tmp))
    if rank == 1:  # as if this rank had read another file (or the default recipe of an empty one)
        recipe = recipe.replace(data=dataclasses.replace(recipe.data, batch_size=64))
    outcome = "finished"
    try:
        run_recipe(recipe, load_digits(), Path(tmp) / "ddp", device="cpu", dist=Dist(rank, 2))
    except RanksDisagree as e:
        outcome = f"RanksDisagree: {e}"
    finally:
        Path(tmp, f"mm{rank}.txt").write_text(outcome)
        shutdown(clean=True)  # every rank raised at the same check: still in step


def test_ranks_with_different_recipes_stop_with_a_clear_error(tmp_path):
    # not a gloo abort (`Received data size doesn't match expected size`) steps later
    _write_recipe(tmp_path)
    _spawn("_mismatch_worker", tmp_path, timeout=120)
    out = [(tmp_path / f"mm{r}.txt").read_text() for r in (0, 1)]
    assert out[0].startswith("RanksDisagree: rank 0 has a different recipe than rank(s) 1"), out[0]
    assert out[1].startswith("RanksDisagree: rank 1 has a different recipe than rank(s) 0"), out[1]
    assert not (tmp_path / "ddp" / "checkpoint.pt").exists()
