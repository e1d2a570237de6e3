"""A new user's own model and data through the CLI (a second walk): what they get wrong is a clear
error that names the problem, never a traceback or a half-written file."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_cli import run, tiny_recipe
from .test_formats import UserNet


def _flat_digits(tmp_path):
    """Digits as (N, 64) features: the wrong layout for a model of images."""
    from compressdrop.data import load_digits

    ds = load_digits()
    path = tmp_path / "flat.npz"
    np.savez(path, x=ds.x_train.reshape(len(ds.x_train), -1).numpy(), y=ds.y_train.numpy())
    return path


def test_eval_of_a_model_without_a_shape_on_data_it_cannot_take_is_named(tmp_path):
    torch.save(UserNet(num_classes=10), tmp_path / "whole.pt")  # records no input shape
    torch.save(UserNet(num_classes=10).state_dict(), tmp_path / "sd.pt")
    flat = _flat_digits(tmp_path)
    res = run(["eval", tmp_path / "whole.pt", "--trust-pickle", "--data", flat], expect=1)
    assert "cannot run on data 'flat'" in res.stderr and "(64,)" in res.stderr
    arch = ["--arch", "tests.test_formats:user_net", "--arch-arg", "num_classes=10"]
    res = run(["eval", tmp_path / "sd.pt", *arch, "--data", flat], expect=1)
    assert "cannot run on data 'flat'" in res.stderr
    run(["eval", tmp_path / "whole.pt", "--trust-pickle", "--data", "digits"])  # its own layout


def test_export_asks_for_the_input_shape_in_the_clis_words_and_checks_it_first(tmp_path):
    torch.save(UserNet(num_classes=10), tmp_path / "whole.pt")
    out = tmp_path / "m.onnx"
    res = run(["export", tmp_path / "whole.pt", "--trust-pickle", "-o", out], expect=1)
    assert "--input-shape" in res.stderr and "example_inputs" not in res.stderr
    res = run(["export", tmp_path / "whole.pt", "--trust-pickle", "--input-shape", "1,9",
               "-o", out], expect=1)  # fmt: skip
    assert "cannot run on --input-shape 1,9" in res.stderr
    assert "torch.export" not in res.stderr and len(res.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "whole.pt"]
    run(["export", tmp_path / "whole.pt", "--trust-pickle", "--input-shape", "1,8,8", "-o", out])
    assert out.is_file()


def test_train_of_a_users_factory_on_data_it_does_not_fit_is_named_before_any_step(tmp_path):
    from compressdrop.data import load_digits

    ds = load_digits()
    twelve = tmp_path / "twelve.npz"  # labels up to 11 for a factory of 10 outputs
    y = ds.y_train.numpy() + 2 * (np.arange(len(ds.y_train)) % 3 == 0)
    np.savez(twelve, x=ds.x_train.numpy(), y=y)
    arch = {"arch": "tests.test_formats:user_net", "kwargs": {"num_classes": 10}}
    recipe = tiny_recipe(tmp_path / "r.yaml", model=arch)
    consent = ["--arch", "tests.test_formats:user_net"]
    out = tmp_path / "run"
    res = run(["train", "-r", recipe, *consent, "--data", twelve, "-o", out], expect=1)
    assert "10 outputs but data 'twelve' has labels up to 11" in res.stderr
    assert "model.kwargs.num_classes=12" in res.stderr and "--arch-arg" not in res.stderr
    res = run(["train", "-r", recipe, *consent, "--data", _flat_digits(tmp_path), "-o", out], 1)
    assert "cannot run on data 'flat'" in res.stderr and "(64,)" in res.stderr
    assert not out.exists()
    # without consent: the recipe is refused, and named as such (it read "tiny: the file asks")
    res = run(["train", "-r", recipe, "--data", twelve, "-o", out], expect=1)
    assert "recipe 'tiny' asks to build its model by calling tests.test_formats:user_net" in (
        res.stderr
    )
    assert "the file" not in res.stderr and not out.exists()


def kwargs_net(**kwargs) -> torch.nn.Module:
    """A factory that takes num_classes through **kwargs only, as torchvision's do."""
    return UserNet(**kwargs)


def test_the_arch_records_advice_gives_a_file_that_loads_for_a_kwargs_factory(tmp_path):
    """save_model's advice for a model without a record put num_classes beside kwargs, which
    such a factory never gets: the file then failed to load ("size mismatch for fc.weight")."""
    import pytest

    from compressdrop.checkpoint import load_model, save_model
    from compressdrop.errors import CheckpointError

    torch.manual_seed(0)
    model = kwargs_net(num_classes=10).eval()
    with pytest.raises(CheckpointError, match="num_classes among them"):
        save_model(model, tmp_path / "m.pt")
    spec = "tests.test_cli_walk:kwargs_net"
    model.arch = {"factory": spec, "input_shape": [1, 8, 8], "num_classes": 10,
                  "kwargs": {"num_classes": 10}}  # fmt: skip
    save_model(model, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt", arch=spec).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), model(x))


def test_train_of_a_factory_that_takes_num_classes_through_kwargs_only_is_named(tmp_path):
    """`train` with a torchvision-style factory (num_classes through **kwargs) trained a
    1000-output model on 10-class data without a word, its record saying 10 classes."""
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"arch": "tests.test_cli_walk:kwargs_net"})
    consent = ["--arch", "tests.test_cli_walk:kwargs_net"]
    out = tmp_path / "run"
    res = run(["train", "-r", recipe, *consent, "--data", "digits", "-o", out], expect=1)
    assert "gives 1000 outputs for data 'digits' of 10 classes" in res.stderr
    assert "model.kwargs.num_classes=10" in res.stderr and not out.exists()
    arch = {"arch": "tests.test_cli_walk:kwargs_net", "kwargs": {"num_classes": 10}}
    fixed = tiny_recipe(tmp_path / "fixed.yaml", model=arch)
    run(["train", "-r", fixed, *consent, "--data", "digits", "-o", out])  # as the advice says
    assert (out / "slim.pt").is_file()


def test_a_killed_prune_leaves_no_work_folder_or_temporary_file_in_the_output_folder(tmp_path):
    """`kill` (SIGTERM) ended the process without unwinding: `prune --data` left its work folder
    (`tmpXXXXXXXX/` with checkpoint.pt) in the output's folder, for good."""
    x = torch.randn(2, 1, 8, 8)
    program = torch.export.export(
        UserNet(num_classes=10).eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "m.pt2")
    recipe = tiny_recipe(tmp_path / "r.yaml", sparsify=200)
    out = tmp_path / "out"
    out.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["prune", tmp_path / "m.pt2", "--data", "digits", "-r", recipe, "--keep-gated"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "compressdrop", *map(str, args), "-o", str(out / "s.pt2")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # an epoch has ended: the run's work folder holds a checkpoint
        if line.startswith("sparsify 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    assert list(out.iterdir()) == []
    assert proc.returncode == 143 and "terminated (SIGTERM)" in rest  # was click's 1, "Aborted!"


def test_a_killed_train_says_how_to_go_on_with_sigterms_exit_code(tmp_path, monkeypatch):
    import compressdrop.workflows as workflows

    def killed(*args, **kwargs):
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "checkpoint.pt").write_bytes(b"an epoch's")
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises at the next bytecode
        raise AssertionError("SIGTERM did not interrupt the run")

    def no_handler(signum, frame):  # (without the CLI's, SIGTERM would end pytest itself)
        raise AssertionError("the command installed no SIGTERM handler")

    monkeypatch.setattr(workflows, "train", killed)
    before = signal.signal(signal.SIGTERM, no_handler)
    try:
        res = run(["train", "--recipe", "lenet300-lognormal", "--out", tmp_path / "o"], 143)
        assert signal.getsignal(signal.SIGTERM) is no_handler  # the command's handler is gone
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "interrupted; continue with the same command and --resume" in res.output


class _TwoOutputs(torch.nn.Module):
    """A model whose output is two named tensors and no logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.a(x), "b": self.b(x)}


def test_export_runs_a_model_of_any_output_before_exporting_it(tmp_path):
    """The check run before the exporter (above) must not ask for logits: export takes a model of
    any output, and one of two named tensors exported before the check existed."""
    from compressdrop.workflows import export_file

    torch.save(_TwoOutputs().state_dict(), tmp_path / "two.pt")
    out = export_file(tmp_path / "two.pt", tmp_path / "two.pt2", arch=_TwoOutputs,
                      input_shape=(6,))  # fmt: skip
    assert Path(out["output"]).is_file()


def test_an_ood_set_that_does_not_fit_is_named_as_the_ood_set(tmp_path):
    """`eval --mc --ood flat.npz` said only "cannot resize inputs of shape (64,) to (1, 8, 8)",
    without saying that the --ood data was meant."""
    import pytest

    import compressdrop as cd
    from compressdrop.checkpoint import save_model
    from compressdrop.errors import InputError
    from compressdrop.models import build_model
    from compressdrop.workflows import evaluate_file

    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    cd.attach(net, "lognormal", example_inputs=torch.randn(2, 1, 8, 8))
    save_model(net, tmp_path / "gated.pt")
    flat = _flat_digits(tmp_path)
    with pytest.raises(InputError, match=r"--ood .*flat\.npz: cannot resize inputs of shape"):
        evaluate_file(tmp_path / "gated.pt", "digits", mc_samples=3, ood=str(flat))


def test_a_data_file_given_as_the_model_is_named_as_data(tmp_path):
    """An .npz passed where the model goes read "not a readable PyTorch file ... enforce fail at
    inline_container.cc:180"; it says it is a data file and where data goes."""
    res = run(["eval", _flat_digits(tmp_path), "--data", "digits"], expect=1)
    assert "a NumPy .npz file (arrays, no model); data goes to --data" in res.stderr
    assert "inline_container" not in res.stderr


def test_a_train_stopped_before_its_first_epoch_leaves_no_empty_folder(tmp_path, monkeypatch):
    """A new-user walk: Ctrl-C before the first epoch left an empty ``--out`` folder behind; a
    folder that holds a checkpoint, or one that was there before, stays."""
    import compressdrop.workflows.train_job as jobs

    def stopped(recipe, ds, out, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        if kwargs.get("resume"):
            (Path(out) / "checkpoint.pt").write_bytes(b"an epoch's")
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "run_recipe", stopped)
    for out, resume, stays in (("new", False, False), ("kept", True, True)):
        with pytest.raises(KeyboardInterrupt):
            jobs.train("lenet300-lognormal", out=tmp_path / out, resume=resume)
        assert (tmp_path / out).exists() == stays
    (tmp_path / "mine").mkdir()
    with pytest.raises(KeyboardInterrupt):
        jobs.train("lenet300-lognormal", out=tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


def test_prune_of_a_models_file_with_more_outputs_than_classes_gives_advice_that_applies(
    tmp_path,
):
    """`prune m.pt2 --data three-classes.npz` of a 10-output model said "set it in the recipe:
    model.kwargs.num_classes=3": a program (or a pickled module, or a state_dict's weights)
    keeps its outputs whatever a recipe says, so the advice could not be followed."""
    from compressdrop.data import load_digits

    x = torch.randn(2, 1, 8, 8)
    program = torch.export.export(
        UserNet(num_classes=10).eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "m.pt2")
    ds = load_digits()
    few = ds.y_train < 3
    three = tmp_path / "three.npz"
    np.savez(three, x=ds.x_train[few].numpy(), y=ds.y_train[few].numpy())
    out = tmp_path / "s.pt2"
    args = ["prune", tmp_path / "m.pt2", "--data", three, "-r", tiny_recipe(tmp_path / "r.yaml")]
    res = run([*args, "-o", out], expect=1)
    assert "gives 10 outputs for data 'three' of 3 classes" in res.stderr
    assert "model.kwargs" not in res.stderr and "--arch-arg" not in res.stderr
    assert "a model with 3 outputs" in res.stderr and not out.exists()
