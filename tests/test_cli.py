"""The CLI through click's runner and as real subprocesses: happy paths, bad input, resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import compressdrop as cd
from compressdrop.checkpoint import load_model, save_model
from compressdrop.cli import main
from compressdrop.models import build_model
from compressdrop.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "compressdrop.cli"]


def tiny_recipe(path: Path, *, pretrain=2, sparsify=3, finetune=1, onnx=True, **extra) -> Path:
    data = {
        "name": "tiny",
        "model": {"arch": "lenet300"},
        "data": {"name": "digits", "batch_size": 128},
        "gates": {"family": "lognormal"},
        "kl": {"beta": 1.0, "warmup": 1},
        "stages": {
            "pretrain": {"epochs": pretrain},
            "sparsify": {"epochs": sparsify, "gate_lr": 0.05},
            "finetune": {"epochs": finetune},
        },
        "export": {"onnx": onnx},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def run(args, expect=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    result = run(["train", "--recipe", tiny_recipe(d / "tiny.yaml"), "--out", d / "out", "--json"])
    return d, json.loads(result.stdout)


def test_train_leaves_every_file_and_reports(trained):
    d, report = trained
    out = d / "out"
    assert {p.name for p in out.iterdir()} == {
        "gated.pt",
        "slim.pt",
        "slim.onnx",
        "slim.pt2",
        "report.json",
    }
    assert report["slim"]["params"] < report["dense"]["params"] or report["architecture_after"]
    assert json.loads((out / "report.json").read_text())["slim"] == report["slim"]
    assert set(report["epochs"]) == {"pretrain", "sparsify", "finetune"}
    # --json names every file it wrote (slim.pt2 was missing, its size reported)
    assert {k: v and Path(v).name for k, v in report["files"].items()} == {
        "gated": "gated.pt",
        "slim": "slim.pt",
        "onnx": "slim.onnx",
        "pt2": "slim.pt2",
        "report": "report.json",
    }


def test_resume_of_a_completed_run_says_there_is_nothing_to_resume(trained, tmp_path):
    """`train --resume` after a finished run said `no checkpoint at runs/x/checkpoint.pt`, as if
    the run had never started: a completed run removes its checkpoint, and says so now."""
    d, _ = trained
    before = sorted(p.name for p in (d / "out").iterdir())
    args = ["train", "--recipe", d / "tiny.yaml", "--resume", "--out"]
    res = run([*args, d / "out"], expect=1)
    assert f"{d / 'out'} holds a completed run (report.json)" in res.stderr
    assert "nothing to resume" in res.stderr and "leave out --resume" in res.stderr
    assert sorted(p.name for p in (d / "out").iterdir()) == before  # nothing touched
    # a folder without a run: as before
    res = run([*args, tmp_path / "new"], expect=1)
    assert f"no checkpoint at {tmp_path / 'new' / 'checkpoint.pt'}" in res.stderr


def test_train_without_a_recipe_says_which_it_uses(tmp_path, monkeypatch):
    """`train` without --recipe used lenet300-lognormal without a word; it says so now, as
    `prune` says its default recipe."""
    import compressdrop.workflows.train_job as jobs

    tiny = tiny_recipe(tmp_path / "tiny.yaml", pretrain=1, sparsify=1, finetune=1, onnx=False)
    monkeypatch.setattr(jobs, "DEFAULT_RECIPE", str(tiny))  # the default, at test size
    res = run(["train", "--out", tmp_path / "a"])
    assert res.stderr.splitlines()[0] == (
        "recipe: tiny, the default (lenet300, lognormal gates, KL weight β = 1, epochs: "
        "pretrain 1, sparsify 1, fine-tune 1; data digits); choose another with --recipe"
    )
    assert "recipe:" not in run(["train", "--recipe", tiny, "--out", tmp_path / "b"]).stderr


def test_prune_gated_checkpoint_directly(trained, tmp_path):
    d, _ = trained
    import compressdrop as cd

    gated = load_model(d / "out" / "gated.pt")
    thr = float(torch.cat([g.snr().detach() for _, g in cd.named_gates(gated)]).median())
    res = json.loads(
        run(
            ["prune", d / "out" / "gated.pt", "-o", tmp_path / "slim.pt", "-t", thr, "--json"]
        ).stdout
    )
    slim = load_model(tmp_path / "slim.pt")
    assert res["architecture"] == slim.prune_report.architecture()
    assert sum(layer["after"] for layer in res["layers"]) < 400


def test_prune_plain_model_sparsifies_on_data_first(tmp_path):
    dense = build_model("lenet300", (1, 8, 8))
    save_model(dense, tmp_path / "dense.pt")
    recipe = tiny_recipe(tmp_path / "r.yaml", onnx=False)
    run(
        [
            "prune",
            tmp_path / "dense.pt",
            "--recipe",
            recipe,
            "--data",
            "digits",
            "-o",
            tmp_path / "slim.pt",
        ]
    )
    slim = load_model(tmp_path / "slim.pt")
    assert slim.prune_report.units_before == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt", "r.yaml", "slim.pt"]


def test_eval_and_sweep_default_to_the_data_the_model_was_trained_on(tmp_path, monkeypatch):
    """`compressdrop eval runs/fm/gated.pt` used digits and failed ("data 'digits' has inputs of
    shape (1, 8, 8) but the model expects (1, 28, 28)"): without --data, eval and sweep take the
    data the checkpoint's recipe records (train's, or prune's --data) and say so."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("mine", "other"):
        np.savez(f"{name}.npz", x=rng.random((40, 6)).astype(np.float32), y=np.arange(40) % 2)
    save_model(build_model("lenet300", (6,), num_classes=2), "dense.pt")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=1, onnx=False)
    # the recipe names digits; the run's --data is what slim.pt and slim-gated.pt record
    run(
        ["prune", "dense.pt", "--recipe", recipe, "--data", "mine.npz", "-o", "slim.pt"]
        + ["--keep-gated"]
    )
    # recorded absolute, so that eval finds it from another folder too
    mine = (tmp_path / "mine.npz").resolve()
    said = f"data: {mine} (what {{}} was trained on; choose other data with --data)\n"
    res = run(["eval", "slim.pt"])
    assert res.stderr == said.format("slim.pt") and "data: mine " in res.stdout
    assert json.loads(run(["eval", "slim.pt", "--json"]).stdout)["data"] == "mine"
    sw = run(["sweep", "slim-gated.pt", "-t", "1", "--out", "sw", "--json"])
    assert json.loads(sw.stdout)["data"] == "mine" and sw.stderr == ""  # --json: stdout only
    assert said.format("slim-gated.pt") in run(["sweep", "slim-gated.pt", "-t", "1"]).stderr
    # --data wins; a model that records no data keeps digits, without a word
    ev = run(["eval", "slim.pt", "--data", "other.npz", "--json"])
    assert json.loads(ev.stdout)["data"] == "other"
    save_model(build_model("lenet300", (1, 8, 8)), "plain.pt")
    res = run(["eval", "plain.pt"])
    assert "data: digits " in res.stdout and res.stderr == ""
    # recorded data that is not there: an error that says what to do
    Path("mine.npz").unlink()
    res = run(["eval", "slim.pt"], expect=1)
    assert f"slim.pt was trained on data '{mine}', which cannot be read here" in res.stderr
    assert "with --data" in res.stderr


def test_export_and_eval_agree_between_torch_and_onnx(trained, tmp_path):
    d, report = trained
    run(["export", d / "out" / "slim.pt", "-o", tmp_path / "m.onnx"])
    pt = json.loads(run(["eval", d / "out" / "slim.pt", "--data", "digits", "--json"]).stdout)
    ox = json.loads(run(["eval", tmp_path / "m.onnx", "--data", "digits", "--json"]).stdout)
    assert pt["accuracy"] == pytest.approx(ox["accuracy"], abs=1e-9)
    assert pt["nll"] == pytest.approx(ox["nll"], rel=1e-4)
    assert pt["accuracy"] == pytest.approx(report["slim"]["test_accuracy"], abs=1e-9)
    assert ox["data"] == pt["data"] == "digits"  # the ONNX line left the data out


def test_eval_of_a_gated_file_counts_its_gates_apart_from_the_model(trained):
    """`eval gated.pt` counted the gates' μ and log σ in `params`, unlabelled: a gated LeNet
    looked bigger than the dense one it is. Now `params` is the model's own (the dense count the
    run reports), and the gates' are `gate_params`, in the JSON and on the line."""
    d, report = trained
    gated = load_model(d / "out" / "gated.pt")
    in_gates = sum(p.numel() for _, g in cd.named_gates(gated) for p in g.parameters())
    assert in_gates > 0
    res = json.loads(run(["eval", d / "out" / "gated.pt", "--json"]).stdout)
    assert res["params"] == report["dense"]["params"]
    assert res["gate_params"] == in_gates
    assert res["params"] + res["gate_params"] == sum(p.numel() for p in gated.parameters())
    text = run(["eval", d / "out" / "gated.pt"]).output
    assert f"params: {res['params']}" in text and f"gate_params: {in_gates}" in text
    slim = json.loads(run(["eval", d / "out" / "slim.pt", "--json"]).stdout)
    assert "gate_params" not in slim and slim["params"] == report["slim"]["params"]


def test_eval_mc_reports_uncertainty_of_a_gated_checkpoint(trained, tmp_path):
    d, _ = trained
    res = json.loads(
        run(["eval", d / "out" / "gated.pt", "--mc", 5, "--ood", "digits", "--json"]).stdout
    )
    mc = res["mc"]
    assert mc["samples"] == 5 and mc["ood_data"] == "digits"
    assert type(mc["samples"]) is int  # printed as "samples: 5.0000"
    for key in ("nll", "ece", "deterministic_nll", "deterministic_ece", "ood_auroc_entropy"):
        assert isinstance(mc[key], float)
    text = run(["eval", d / "out" / "gated.pt", "--mc", 3]).output
    assert "Monte-Carlo:" in text and "mean_mutual_information" in text
    # a slim model has no noise left (unless pruned with --mc-samples); a plain ONNX graph is
    # deterministic; --ood needs --mc
    res = run(["eval", d / "out" / "slim.pt", "--mc", 3], expect=1)
    assert "no dropout layer or gate" in res.output
    res = run(["eval", d / "out" / "slim.onnx", "--mc", 3], expect=1)
    assert "deterministic graph" in res.output and "--mc-samples" in res.output
    assert (
        "--ood needs --mc"
        in run(["eval", d / "out" / "gated.pt", "--ood", "digits"], expect=2).output
    )


def test_prune_keeps_noise_for_monte_carlo_from_the_slim_model(trained, tmp_path):
    """prune --mc-samples writes the slim model with its kept units' learned noise (.pt) and a
    graph that samples (.onnx); eval --mc reads both, and the .pt's deterministic eval is the
    slim model's."""
    d, _ = trained
    out = tmp_path / "slim.pt"
    res = json.loads(
        run(["prune", d / "out" / "gated.pt", "-o", out, "--mc-samples", 8, "--json"]).stdout
    )
    assert set(res["files"]) == {"checkpoint", "mc_checkpoint", "mc_onnx"}
    plain = json.loads(run(["eval", out, "--json"]).stdout)
    noisy = json.loads(run(["eval", tmp_path / "slim-mc.pt", "--mc", 16, "--json"]).stdout)
    assert noisy["accuracy"] == plain["accuracy"] and noisy["params"] == plain["params"]
    assert noisy["gate_params"] > 0 and "gate_params" not in plain  # the kept units' noise
    assert noisy["mc"]["deterministic_accuracy"] == pytest.approx(plain["accuracy"], abs=1e-6)
    graph = json.loads(
        run(["eval", tmp_path / "slim-mc.onnx", "--mc", 16, "--ood", "digits", "--json"]).stdout
    )
    mc = graph["mc"]
    assert mc["samples"] == 16 and mc["samples_per_call"] == 8 and mc["ood_data"] == "digits"
    # the same posterior drawn by PyTorch and by onnxruntime: the same accuracy within noise
    assert abs(mc["accuracy"] - noisy["mc"]["accuracy"]) < 0.03
    assert abs(mc["nll"] - noisy["mc"]["nll"]) < 0.15 * noisy["mc"]["nll"] + 0.01
    # trained gates only
    res = run(["prune", out, "-o", tmp_path / "again.pt", "--mc-samples", 8], expect=1)
    assert "--mc-samples needs a model with trained gates" in res.output


def test_mc_samples_refusal_names_only_what_is_wrong(tmp_path):
    """A plain model with --mc-samples 5 was told `needs a model with trained gates and N ≥ 1
    (...: no gates, N = 5)`, as if N were a problem too."""
    from compressdrop.errors import InputError
    from compressdrop.workflows import prune_file

    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    args = ["prune", tmp_path / "dense.pt", "-o", tmp_path / "s.pt", "--mc-samples", 5]
    res = run([*args, "--data", "digits"], expect=1)
    assert f"--mc-samples needs a model with trained gates; {tmp_path / 'dense.pt'} has none" in (
        res.stderr
    )
    assert "N =" not in res.stderr and "N ≥" not in res.stderr and "--keep-gated" in res.stderr
    save_model(cd.attach(build_model("lenet300", (1, 8, 8))), tmp_path / "gated.pt")
    with pytest.raises(InputError, match=r"^--mc-samples needs N ≥ 1, got 0$"):
        prune_file(tmp_path / "gated.pt", tmp_path / "s.pt", mc_samples=0)


def test_data_help_and_readme_name_every_image_folder_option():
    """`train --help` left out `test_fraction=` and `seed=`, which the README documents and the
    loader takes: the help, the README and the loader's options agree."""
    import re

    from compressdrop.data import _IMAGE_OPTIONS

    readme = (ROOT / "README.md").read_text()
    specs = re.findall(r"`(images:DIR[^`]*)`", readme)
    helps = [
        re.search(
            r"images:DIR(\[,\w+=[^]]*\])*", "".join(run([c, "--help"]).output.split())
        ).group()
        for c in ("train", "prune", "eval", "sweep")
    ]  # click wraps the spec
    for spec in [*specs, *helps]:
        assert re.findall(r",(\w+)=", spec) == list(_IMAGE_OPTIONS), spec
    assert len(specs) == 2  # "Prune your own model" and the CLI's data


def test_the_readmes_recipes_list_comment_names_every_shipped_recipe():
    """The README's `compressdrop recipes list` comment left out lstm-lognormal."""
    from compressdrop.recipes import list_recipes

    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "recipes list  " in x)
    comment = line.partition("#")[2]
    missing = [n for n in list_recipes() if n.partition("-")[0] + "-" not in comment]
    assert comment and missing == [], line


def test_recipes_list_and_show():
    listed = json.loads(run(["recipes", "list", "--json"]).stdout)
    assert "lenet300-lognormal" in listed
    shown = yaml.safe_load(run(["recipes", "show", "lenet5-hardconcrete"]).stdout)
    assert shown["gates"]["family"] == "hardconcrete"


# --- bad input: clear message, exit code 1, no partial output ---------------------------------------


def _no_stray_files(folder: Path, allowed: set[str]):
    assert {p.name for p in folder.iterdir()} <= allowed


def test_missing_file(tmp_path):
    res = run(["prune", tmp_path / "nope.pt", "-o", tmp_path / "s.pt"], expect=1)
    assert "no such file" in res.stderr
    _no_stray_files(tmp_path, set())


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(bytes(range(256)) * 2)  # neither zip nor torch magic
    res = run(["export", tmp_path / "bad.pt", "-o", tmp_path / "m.onnx"], expect=1)
    assert "corrupt" in res.stderr or "not a readable" in res.stderr
    _no_stray_files(tmp_path, {"bad.pt"})


def test_foreign_pickle_needs_trust_pickle(tmp_path):
    model = build_model("lenet300", (1, 8, 8))
    torch.save(model, tmp_path / "whole.pt")
    res = run(["export", tmp_path / "whole.pt", "-o", tmp_path / "m.onnx"], expect=1)
    assert "--trust-pickle" in res.stderr and "arbitrary code" in res.stderr
    _no_stray_files(tmp_path, {"whole.pt"})
    run(["export", tmp_path / "whole.pt", "-o", tmp_path / "m.onnx", "--trust-pickle"])
    assert (tmp_path / "m.onnx").exists()


def test_state_dict_needs_arch(tmp_path):
    torch.save(build_model("lenet300").state_dict(), tmp_path / "sd.pt")
    res = run(["export", tmp_path / "sd.pt", "-o", tmp_path / "m.onnx"], expect=1)
    assert "--arch" in res.stderr
    run(
        [
            "export",
            tmp_path / "sd.pt",
            "-o",
            tmp_path / "m.onnx",
            "--arch",
            "compressdrop.models:lenet300_100",
        ]
    )
    assert (tmp_path / "m.onnx").exists()


def test_unknown_recipe_key(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", colour="blue")
    res = run(["train", "--recipe", recipe, "--out", tmp_path / "out"], expect=1)
    assert "colour: unknown key" in res.stderr and "r.yaml" in res.stderr
    assert not (tmp_path / "out").exists()


def test_wrong_data_shape_for_the_model(tmp_path):
    save_model(build_model("lenet5", (1, 28, 28)), tmp_path / "m.pt")
    res = run(["eval", tmp_path / "m.pt", "--data", "digits"], expect=1)
    assert "(1, 8, 8)" in res.stderr and "(1, 28, 28)" in res.stderr


def test_unwritable_output_path(trained, tmp_path):
    d, _ = trained
    (tmp_path / "file").write_text("x")
    res = run(["prune", d / "out" / "gated.pt", "-o", tmp_path / "file" / "slim.pt"], expect=1)
    assert "cannot write" in res.stderr
    res = run(["export", d / "out" / "slim.pt", "-o", tmp_path / "no" / "dir" / "m.onnx"], expect=1)
    assert "does not exist" in res.stderr
    _no_stray_files(tmp_path, {"file"})


def test_onnx_model_with_the_wrong_input_shape(tmp_path):
    from compressdrop.export import export_onnx

    model = build_model("lenet300", (1, 28, 28))
    export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", check_batch_sizes=(1,))
    res = run(["eval", tmp_path / "m.onnx", "--data", "digits"], expect=1)
    assert "(1, 28, 28)" in res.stderr and "(1, 8, 8)" in res.stderr


def test_usage_error_exits_2():
    assert CliRunner().invoke(main, ["prune"]).exit_code == 2
    assert CliRunner().invoke(main, ["train", "--device", "tpu"]).exit_code == 2


# --- real subprocesses ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_shim_and_help_show_a_working_example():
    out = subprocess.run(
        [sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "compressdrop train --recipe" in out.stdout
    as_module = [sys.executable, "-m", "compressdrop", "--help"]  # what torchrun -m runs
    assert (
        "compressdrop train --recipe"
        in subprocess.run(as_module, capture_output=True, text=True, check=True).stdout
    )
    # `python -m compressdrop.cli` (EXE) as a process of its own once; every command's help, the
    # same click objects, in this one (three more interpreters added nothing to check)
    sub = subprocess.run(EXE + ["train", "--help"], capture_output=True, text=True, check=True)
    assert "Example" in sub.stdout
    for cmd in ("train", "prune", "export", "eval"):
        assert "Example" in run([cmd, "--help"]).output


@pytest.mark.slow
def test_warnings_are_one_line_each_without_the_installed_files_source(tmp_path):
    """A new user saw `.../compressdrop/data/__init__.py:193: DataWarning: ...` and the source
    line `  return load_npz(spec)` under it; the CLI prints `warning (Category): message`."""
    import os
    import warnings

    import numpy as np

    from compressdrop.data import DataWarning

    rng = np.random.default_rng(0)
    data = tmp_path / "nhwc.npz"  # channels-last x: a DataWarning when read
    np.savez(data, x=rng.random((12, 8, 6, 3)).astype(np.float32), y=np.arange(12) % 2)
    model = save_model(
        build_model("lenet300", input_shape=(3, 8, 6), num_classes=2), tmp_path / "m.pt"
    )
    out = subprocess.run(
        [sys.executable, "-m", "compressdrop", "eval", "m.pt", "--data", "nhwc.npz"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert lines == [
        "warning (DataWarning): nhwc.npz: x read as channels-last images (N, H, W, C) and "
        "transposed to (N, C, H, W) = (N, 3, 8, 6); save them as (N, C, H, W) to be rid of "
        "this warning"
    ], out.stderr
    assert "load_npz" not in out.stderr and ".py:" not in out.stderr
    # in-process (click's runner, pytest) the warning is recorded as before, and Python's own
    # formatter is back afterwards
    before = warnings.formatwarning
    with pytest.warns(DataWarning, match="channels-last"):
        run(["eval", model, "--data", data])
    assert warnings.formatwarning is before


@pytest.mark.slow
def test_subprocess_exit_code_on_bad_input(tmp_path):
    out = subprocess.run(EXE + ["eval", str(tmp_path / "nope.pt")], capture_output=True, text=True)
    assert out.returncode == 1 and "Error:" in out.stderr and "Traceback" not in out.stderr


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import compressdrop.training.runner as runner

    calls = {"n": 0}
    real = runner.prediction_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 30 else loss

    monkeypatch.setattr(runner, "prediction_loss", flaky)
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=5, onnx=False)
    res = run(["train", "--recipe", recipe, "--out", tmp_path / "out"], expect=1)
    assert "loss is nan" in res.stderr and "checkpoint" in res.stderr
    assert (tmp_path / "out" / "checkpoint.pt").exists()
    assert not (tmp_path / "out" / "slim.pt").exists()


def test_compiled_training_follows_the_eager_run(tmp_path):
    """``--compile BACKEND`` compiles each stage's forward; with ``aot_eager`` (the same kernels and
    random stream as eager, no code generation) the run is the eager run to float rounding.
    Inductor draws its random numbers its own way (tests/test_gate_speed.py compiles with it)."""
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=1, sparsify=1, finetune=1, onnx=False)
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        res = run(["train", "--recipe", recipe, "--out", tmp_path / name, "--json", *extra])
        reports[name] = json.loads(res.stdout)
    eager, compiled = reports["eager"], reports["compiled"]
    assert [h["loss"] for h in compiled["history"]] == pytest.approx(
        [h["loss"] for h in eager["history"]], rel=1e-5
    )
    assert compiled["architecture_after"] == eager["architecture_after"]
    a = load_model(tmp_path / "eager" / "gated.pt").state_dict()
    b = load_model(tmp_path / "compiled" / "gated.pt").state_dict()
    for k in a:  # measured: ≤ 1.4e-7 (an unchanged float32 run differs by 0)
        if a[k].is_floating_point():
            assert float((b[k] - a[k]).norm()) <= 1e-5 * float(a[k].norm()) + 1e-12, k
    bad = run(["train", "--recipe", recipe, "--out", tmp_path / "x", "--compile", "nope"], expect=1)
    assert "compile" in bad.stderr and "inductor" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_bf16_training_keeps_gate_terms_in_float32(tmp_path):
    recipe = tiny_recipe(tmp_path / "bf16.yaml", pretrain=1, sparsify=2, finetune=1)
    out = tmp_path / "out"
    res = run(["train", "--recipe", recipe, "--out", out, "--precision", "bf16", "--json"])
    report = json.loads(res.stdout)
    assert report["slim"]["test_accuracy"] > 0.5  # it learned under autocast
    assert all(math.isfinite(h["loss"]) for h in report["history"])
    gated = load_model(out / "gated.pt")
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gated(x).dtype == torch.bfloat16  # the layers did run in bf16
        assert all(g.kl().dtype == torch.float32 for _, g in cd.named_gates(gated))
        assert all(g.snr().dtype == torch.float32 for _, g in cd.named_gates(gated))
    with pytest.raises(Exception, match="precision"):
        Recipe.from_dict({"precision": "fp8"})


def test_sweep_writes_table_csv_json_png_matching_a_separate_eval(trained, tmp_path):
    import csv

    import compressdrop as cd

    d, _ = trained
    gated = load_model(d / "out" / "gated.pt")
    snr = torch.cat([g.snr().detach() for _, g in cd.named_gates(gated)])
    thr = [float(snr.quantile(0.3)), float(snr.quantile(0.7))]
    res = run(
        [
            "sweep",
            d / "out" / "gated.pt",
            "--data",
            "digits",
            "--thresholds",
            ",".join(map(str, thr)),
            "--out",
            tmp_path / "sw",
            "--json",
        ]
    )
    rows, dense = json.loads(res.stdout)["rows"], json.loads(res.stdout)["dense"]
    assert [r["threshold"] for r in rows] == [0.0, *thr]
    # the dense reference is the one train measured and reported
    report = json.loads((d / "out" / "report.json").read_text())["dense"]
    assert dense["dataset"] == "digits"
    assert {k: dense[k] for k in report} == report
    assert rows[0]["units"] > rows[1]["units"] > rows[2]["units"]
    assert all(
        r["latency_ms"] > 0 and r["onnx_bytes"] > 0 and r["provider"] == "CPUExecutionProvider"
        for r in rows
    )
    with open(tmp_path / "sw" / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    # sweep.json is what --json prints, less the file names (it held the rows alone)
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text()) == {
        "rows": rows,
        "dense": dense,
    }
    # the table, not on a terminal, is not cut to 80 columns ("thres…", "300-1…")
    table = run(["sweep", d / "out" / "gated.pt", "-t", thr[0], "--out", tmp_path / "t"]).output
    assert "threshold" in table and rows[1]["architecture"] in table and "…" not in table
    png = (tmp_path / "sw" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # the same slim model, pruned and evaluated separately, gives the same numbers
    run(["prune", d / "out" / "gated.pt", "-t", thr[1], "-o", tmp_path / "s.pt"])
    ev = json.loads(run(["eval", tmp_path / "s.pt", "--data", "digits", "--json"]).stdout)
    assert ev["accuracy"] == pytest.approx(rows[2]["accuracy"], abs=1e-9)
    assert ev["params"] == rows[2]["params"] and ev["flops"] == rows[2]["flops"]
    assert ev["nll"] == pytest.approx(rows[2]["nll"], rel=1e-6)


def test_sweep_refuses_a_model_without_gates(tmp_path):
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    res = run(["sweep", tmp_path / "dense.pt", "--out", tmp_path / "sw"], expect=1)
    assert "no trained gates" in res.stderr
    assert not (tmp_path / "sw").exists()


def test_a_warning_given_in_a_loop_is_said_once():
    """Torch-Pruning warned "Maximum recursive depth reached!" once per call of its shape
    inference: 2,927 lines of it when a Swin-T was attached, said again one by one."""
    import warnings

    from compressdrop._warn import recorded

    def loop():
        for i in range(1000):
            warnings.warn("Maximum recursive depth reached!", UserWarning, stacklevel=1)
            warnings.warn(f"layer {i % 2} left ungated", RuntimeWarning, stacklevel=1)
        return 7

    result, failed, said = recorded(loop)
    assert result == 7 and failed is None
    assert [(w.category, str(w.message)) for w in said] == [
        (UserWarning, "Maximum recursive depth reached!"),
        (RuntimeWarning, "layer 0 left ungated"),
        (RuntimeWarning, "layer 1 left ungated"),
    ]
