"""Any model a user has goes through `compressdrop prune`: a torch.export program (.pt2), a whole
pickled module (with --trust-pickle), a state_dict with --arch and --arch-arg. The slim .pt2 loads
in a process that never imports compressdrop and computes what the slim model computes."""

import argparse
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.checkpoint import CheckpointError, load_model, save_model
from compressdrop.data import DataWarning, load_digits
from compressdrop.recipes import load_recipe
from compressdrop.workflows import sparsify_and_prune, write_slim

from .prewarmed import Prewarmed
from .test_cli import run, tiny_recipe


class UserNet(nn.Module):
    """A model nobody here wrote: conv-BN blocks, a reshape-flatten, a classifier."""

    def __init__(self, num_classes: int = 1000, width: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.reshape(x.size(0), -1))))


def user_net(*, num_classes: int = 1000, **kwargs) -> nn.Module:
    """A torchvision-style factory: keyword-only, 1000 classes unless told."""
    return UserNet(num_classes=num_classes, **kwargs)


def trained_user_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = UserNet(num_classes=10)
    ds = load_digits()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(ds.x_train), 64):
            loss = nn.functional.cross_entropy(
                model(ds.x_train[i : i + 64]), ds.y_train[i : i + 64]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


_CHILD = textwrap.dedent(
    """
    import sys, torch
    program = torch.export.load(sys.argv[1])
    outputs = [program.module()(x) for x in torch.load(sys.argv[2])]
    assert not any(m.startswith("compressdrop") for m in sys.modules), "compressdrop imported"
    torch.save(outputs, sys.argv[3])
    """
)


_CLEAN_ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An interpreter that imported torch alone, in a bare environment (tests/prewarmed.py):
    each clean process below is a child of it."""
    with Prewarmed("import torch, torch.export", tmp_path_factory.mktemp("clean"), _CLEAN_ENV) as w:
        yield w


def outputs_in_a_clean_process(pt2, inputs, tmp_path, clean: Prewarmed) -> list[torch.Tensor]:
    """The .pt2's outputs, computed by a Python that never imports compressdrop or the tests."""
    torch.save(inputs, tmp_path / "inputs.pt")
    args = str(pt2), str(tmp_path / "inputs.pt"), str(tmp_path / "y")
    clean.run(_CHILD, *args, check=True, cwd=tmp_path, env=_CLEAN_ENV, timeout=120)
    return torch.load(tmp_path / "y", weights_only=True)


def strong_recipe(path):
    """A short recipe that removes units in three epochs: noisy gates from the start (log σ = 0)
    and a large KL weight."""
    return tiny_recipe(
        path,
        pretrain=0,
        sparsify=3,
        finetune=1,
        kl={"beta": 30.0, "warmup": 0},
        gates={"family": "lognormal", "kwargs": {"init_log_sigma": 0.0}},
    )


def check_slim(slim_pt2, tmp_path, dense_params: int, clean: Prewarmed) -> None:
    slim = load_model(slim_pt2)  # through compressdrop's safe loader
    assert sum(p.numel() for p in slim.parameters()) < dense_params
    xs = [torch.randn(b, 1, 8, 8) for b in (1, 5, 64)]
    got = outputs_in_a_clean_process(slim_pt2, xs, tmp_path, clean)
    with torch.no_grad():
        for x, y in zip(xs, got):
            torch.testing.assert_close(y, slim(x), rtol=1e-5, atol=1e-6)
    assert (slim_pt2.with_suffix(".onnx")).exists()


@pytest.mark.slow
def test_a_pt2_program_is_pruned_and_the_slim_pt2_loads_without_compressdrop(tmp_path, clean):
    model = trained_user_net()
    program = torch.export.export(
        model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "model.pt2")  # what a user brings
    recipe = strong_recipe(tmp_path / "r.yaml")
    res = run(
        [
            "prune",
            tmp_path / "model.pt2",
            "--data",
            "digits",
            "--recipe",
            recipe,
            "-o",
            tmp_path / "slim.pt2",
            "--json",
        ]
    )
    report = json.loads(res.stdout)
    assert set(report["files"]) == {"pt2", "onnx"}
    before = sum(layer["before"] for layer in report["layers"])
    assert sum(layer["after"] for layer in report["layers"]) < before
    check_slim(tmp_path / "slim.pt2", tmp_path, sum(p.numel() for p in model.parameters()), clean)


def _saved(fmt: str, model: nn.Module, tmp_path):
    """``model`` saved the way a user saves it, and loaded back the way compressdrop loads it."""
    if fmt == "pt2":
        program = torch.export.export(
            model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        torch.export.save(program, tmp_path / "model.pt2")
        return load_model(tmp_path / "model.pt2")
    if fmt == "pickle":
        torch.save(model, tmp_path / "model.pt")
        return load_model(tmp_path / "model.pt", trust_code=True)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return load_model(
        tmp_path / "weights.pt", arch="tests.test_formats:user_net", arch_kwargs={"num_classes": 10}
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["pt2", "pickle", "state_dict"])
def test_the_slim_pt2_computes_what_the_slim_model_in_memory_computes(fmt, tmp_path, clean):
    ds = load_digits()
    model = _saved(fmt, trained_user_net(), tmp_path)
    recipe = load_recipe(strong_recipe(tmp_path / "r.yaml"))
    slim = sparsify_and_prune(model, ds, recipe, device="cpu", work_dir=tmp_path)
    assert slim.prune_report.units_after < slim.prune_report.units_before
    files = write_slim(slim, tmp_path / "slim.pt2", ds.x_test[:2])
    assert files.max_rel_error["pt2"] <= 1e-5 and files.max_rel_error["onnx"] <= 1e-4
    xs = [ds.x_test[:1], ds.x_test[:7], torch.randn(64, 1, 8, 8)]
    got = outputs_in_a_clean_process(tmp_path / "slim.pt2", xs, tmp_path, clean)
    with torch.no_grad():
        for x, y in zip(xs, got):
            torch.testing.assert_close(y, slim.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pickled_module_with_trust_pickle_goes_the_whole_way(tmp_path, clean):
    model = trained_user_net()
    torch.save(model, tmp_path / "model.pt")  # torch.save(model): a pickle of our test's class
    recipe = strong_recipe(tmp_path / "r.yaml")
    args = ["prune", tmp_path / "model.pt", "--data", "digits", "--recipe", recipe]
    refused = run([*args, "-o", tmp_path / "slim.pt2"], expect=1)
    assert "--trust-pickle" in refused.output and not (tmp_path / "slim.pt2").exists()
    run([*args, "--trust-pickle", "-o", tmp_path / "slim.pt2"])
    check_slim(tmp_path / "slim.pt2", tmp_path, sum(p.numel() for p in model.parameters()), clean)


def test_a_module_without_a_factory_is_saved_with_its_program(tmp_path):
    # how a pickled module's checkpoints (gated.pt, slim.pt) rebuild without pickle
    from compressdrop.workflows import adopt

    model = adopt(trained_user_net(), load_digits())
    assert set(model.arch) == {"program", "input_shape"}
    save_model(model, tmp_path / "dense.pt")
    assert (
        torch.load(tmp_path / "dense.pt", weights_only=True)["arch"]["program"].dtype == torch.uint8
    )
    again = load_model(tmp_path / "dense.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_state_dict_with_arch_and_arch_args(tmp_path, clean):
    model = trained_user_net()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    recipe = strong_recipe(tmp_path / "r.yaml")
    base = ["prune", tmp_path / "weights.pt", "--data", "digits", "--recipe", recipe]
    no_args = run([*base, "--arch", "tests.test_formats:user_net", "-o", tmp_path / "s.pt2"], 1)
    assert "do not fit" in no_args.output  # 1000 classes by default
    run(
        [
            *base,
            "--arch",
            "tests.test_formats:user_net",
            "--arch-arg",
            "num_classes=10",
            "-o",
            tmp_path / "slim.pt2",
        ]
    )
    check_slim(tmp_path / "slim.pt2", tmp_path, sum(p.numel() for p in model.parameters()), clean)


@pytest.mark.slow
def test_prune_without_a_recipe_prints_the_default_it_uses(tmp_path):
    import numpy as np

    model = UserNet(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    ds = load_digits().subset(60, 30)  # one optimiser step an epoch: the default is 60 epochs
    np.savez(
        tmp_path / "small.npz",
        x=ds.x_train.numpy(),
        y=ds.y_train.numpy(),
        x_test=ds.x_test.numpy(),
        y_test=ds.y_test.numpy(),
    )
    args = [
        "prune",
        tmp_path / "weights.pt",
        "--arch",
        "tests.test_formats:user_net",
        "--arch-arg",
        "num_classes=10",
        "--data",
        tmp_path / "small.npz",
    ]
    assert ".pt2" in run([*args, "-o", tmp_path / "bad.txt"], expect=2).output
    with pytest.warns(DataWarning, match="too few optimiser steps"):  # 60 of about 650
        res = run([*args, "-o", tmp_path / "slim.pt"])
    assert "recipe: default for your model (lognormal gates" in res.stderr
    assert "sparsify 60 epochs, fine-tune 20" in res.stderr
    assert "sparsify 60/60" in res.stderr  # progress, epoch by epoch
    assert (tmp_path / "slim.pt").exists()


def test_torchvision_models_load_where_torchvision_itself_does_not_import(tmp_path):
    """`--arch torchvision.models:...` and a pickled torchvision model, in a fresh process: where
    the installed torchvision was built for another torch (this project's machines), importing
    it fails ("operator torchvision::nms does not exist"), and both failed with it; the test
    suite's own shim (conftest) hid that."""
    from tests.torchvision_models import import_torchvision

    tv = import_torchvision()
    net = tv.models.squeezenet1_1(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save(net, tmp_path / "whole.pt")
    code = textwrap.dedent(
        f"""
        from compressdrop.checkpoint import load_model
        a = load_model({str(tmp_path / "sd.pt")!r}, arch="torchvision.models:squeezenet1_1",
                       arch_kwargs={{"num_classes": 10}})
        b = load_model({str(tmp_path / "whole.pt")!r}, trust_code=True)
        print(type(a).__name__, type(b).__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SqueezeNet", "SqueezeNet"]


@pytest.mark.parametrize("family", ["ShuffleNetV2", "Swin", "Swin V2"])
def test_a_slim_checkpoint_of_a_model_kept_as_a_program_reloads(family, tmp_path):
    """A pickled module is recorded as its dense program (no factory to rebuild it). Its slim
    checkpoint was that program plus the cuts to replay, which failed to load for ShuffleNetV2
    (the pruned shuffle's index buffers have no place in the dense graph) and Swin (the
    program's lifted constants have no key in the model's state_dict): `prune --trust-pickle`
    failed at its very end. The slim model is now saved as its own program. Swin V2's program
    did not load at all (its attention passes a zeroed copy of `qkv.bias` to the product while
    the original is read too: that product now stays an ATen call)."""
    from compressdrop._attrs import set_record
    from compressdrop.programs import program_record

    from tests.test_surgery import quantiles, random_gates_
    from tests.torchvision_models import families

    build, side = families()[family]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, side, side)
    set_record(model, "arch", program_record(model, x))  # what `prune --trust-pickle` does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left ungated, each named: not the point here
        cd.attach(model, example_inputs=x)
        random_gates_(model, seed=1)
        slim = cd.prune(model, quantiles(model, (0.5,))[0], example_inputs=x)
    assert slim.prune_report.units_after < slim.prune_report.units_before
    save_model(slim, tmp_path / "slim.pt")
    again = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x), slim.eval()(x), rtol=1e-5, atol=1e-5)
    assert again.prune_report.architecture() == slim.prune_report.architecture()


def test_a_pt2_exported_with_a_fixed_batch_size_is_refused_only_if_its_graph_needs_it(tmp_path):
    """`torch.export.export` without dynamic_shapes fixes the batch size. A graph that bakes it
    into a reshape gave raw shape tracebacks in prune and eval (or, worse, wrong shapes that only
    a later check caught); one that does not (a flatten) works at any batch size."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 32, 3), nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(h.shape[0], 16, -1).mean(-1))

    x = torch.randn(2, 1, 8, 8)
    for name, net in (("flat", Flat()), ("baked", Baked())):
        torch.export.save(torch.export.export(net.eval(), (x,)), tmp_path / f"{name}.pt2")
    assert load_model(tmp_path / "flat.pt2")(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(CheckpointError, match=r"fixed batch size of 2.*dynamic_shapes"):
        load_model(tmp_path / "baked.pt2")
    res = run(["eval", tmp_path / "baked.pt2", "--data", "digits"], expect=1)
    assert "fixed batch size of 2" in res.output and "Traceback" not in res.output

    class Logs(nn.Module):  # NaN for negative inputs; a per-batch scalar beside the logits
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = self.fc(torch.log(x).flatten(1))
            return {"mean": h.mean(), "logits": h}

    torch.export.save(torch.export.export(Logs().eval(), (x,)), tmp_path / "logs.pt2")
    assert load_model(tmp_path / "logs.pt2")(x.abs())["logits"].shape == (2, 10)

    class PriorAndGram(nn.Module):  # a per-class prior of 2 at batch 2, and a (B, B) product
        def __init__(self):
            super().__init__()
            self.fc, self.prior = nn.Linear(64, 2), nn.Parameter(torch.tensor([0.3, 0.7]))

        def forward(self, x):
            h = self.fc(x.flatten(1))
            return h, self.prior * 1.0, h @ h.T

    torch.export.save(torch.export.export(PriorAndGram().eval(), (x,)), tmp_path / "pg.pt2")
    load_model(tmp_path / "pg.pt2")  # a second review found both refused


def test_a_training_scripts_save_is_read_for_the_state_dict_it_holds(tmp_path):
    """`torch.save({"state_dict": ..., "epoch": 3, "optimizer": ...})` (and DDP's `module.` keys)
    was "not a compressdrop checkpoint, state_dict or nn.Module", with no hint."""
    torch.manual_seed(0)
    net = user_net(num_classes=10).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ddp = {f"module.{k}": v for k, v in net.state_dict().items()}
    saves = {
        "sd": {"state_dict": net.state_dict(), "epoch": 3, "optimizer": opt.state_dict()},
        "msd": {"model_state_dict": ddp, "epoch": 3},
        # numpy scalars and the script's arguments beside it were refused as pickled objects
        "np": {
            "state_dict": net.state_dict(),
            "best_acc": np.float64(0.9),
            "args": argparse.Namespace(lr=0.1, out=Path("runs")),
        },
        # an array under "format" ended in numpy's "truth value ... is ambiguous"
        "fmt": {"format": np.array([1.0, 2.0]), "state_dict": net.state_dict()},
    }
    x = torch.randn(3, 1, 8, 8)
    for name, obj in saves.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        got = load_model(
            tmp_path / f"{name}.pt",
            arch="tests.test_formats:user_net",
            arch_kwargs={"num_classes": 10},
        )
        with torch.no_grad():
            assert torch.equal(got(x), net(x)), name
    torch.save({"weights_of_mine": net.state_dict(), "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"a dict of \['weights_of_mine', 'epoch'\]"):
        load_model(tmp_path / "odd.pt", arch="tests.test_formats:user_net")


class _TokenLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 50)

    def forward(self, x):
        e = self.emb(x)
        b, t, _ = e.shape
        return self.b(torch.relu(self.a(e.view(b, t, 2, 8).flip(2).reshape(b, t, 16))))


def test_a_slim_token_program_that_replays_keeps_its_dynamic_length(tmp_path):
    """Saving every slim program-kept model as its own program (for ShuffleNetV2 and Swin, above)
    fixed a token model's length at the example's 16; one the dense program and the cuts rebuild
    is saved that way, as before, and keeps the length it was exported with dynamic."""
    torch.manual_seed(0)
    x = torch.randint(0, 50, (2, 12))
    batch, length = torch.export.Dim("b", min=1, max=1024), torch.export.Dim("t", min=1, max=64)
    program = torch.export.export(_TokenLM().eval(), (x,), dynamic_shapes=({0: batch, 1: length},))
    torch.export.save(program, tmp_path / "lm.pt2")
    gated = load_model(tmp_path / "lm.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cd.attach(gated, example_inputs=x)
    from tests.test_surgery import quantiles, random_gates_

    random_gates_(gated, seed=1)
    slim = cd.prune(gated, quantiles(gated, (0.5,))[0])
    assert slim.prune_report.units_after < slim.prune_report.units_before
    save_model(slim, tmp_path / "slim.pt")
    again = load_model(tmp_path / "slim.pt")
    for t in (12, 7):
        ids = torch.randint(0, 50, (3, t))
        with torch.no_grad():
            torch.testing.assert_close(again(ids), slim(ids))


def test_a_slim_program_with_its_noise_is_saved_and_loaded_again(tmp_path):
    """A slim model saved as its own program, loaded, given its noise back (keep_noise) and saved
    again had its cuts replayed a second time on load ("weights do not fit")."""
    from compressdrop._attrs import set_record
    from compressdrop.programs import program_record
    from compressdrop.uncertainty import keep_noise

    from tests.test_surgery import quantiles, random_gates_
    from tests.torchvision_models import families

    build, side = families()["ShuffleNetV2"]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, side, side)
    set_record(model, "arch", program_record(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cd.attach(model, example_inputs=x)
        random_gates_(model, seed=1)
        threshold = quantiles(model, (0.5,))[0]
        slim = cd.prune(model, threshold, example_inputs=x)
    save_model(slim, tmp_path / "slim.pt")
    loaded = load_model(tmp_path / "slim.pt")
    save_model(loaded, tmp_path / "again.pt")  # as it is: its program is its structure
    noisy = keep_noise(model, loaded, threshold)
    save_model(noisy, tmp_path / "noisy.pt")
    # and straight after pruning, as `prune --mc-samples` writes STEM-mc.pt (a second review
    # found that file unreadable: the noise went with the dense program and the cuts)
    fresh = keep_noise(model, slim, threshold)
    save_model(fresh, tmp_path / "fresh.pt")
    for name, want in (("again.pt", loaded), ("noisy.pt", noisy), ("fresh.pt", fresh)):
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / name)(x), want.eval()(x))


class _Wrapper(nn.Module):
    """A model whose one child is called ``module``: its keys look like DDP's."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.module = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.module(x)


def wrapped(**kwargs) -> nn.Module:
    return _Wrapper(**kwargs)


def test_a_state_dict_whose_keys_all_start_with_module_is_loaded_as_it_is_first(tmp_path):
    """DDP's `module.` prefix was taken off every such state_dict, also a model's own."""
    net = _Wrapper()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    got = load_model(tmp_path / "sd.pt", arch="tests.test_formats:wrapped")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(got(x), net(x))


def test_a_bfloat16_model_keeps_its_dtype_when_loaded_and_runs_in_float32_in_the_cli(tmp_path):
    """A bfloat16 `.pt2` came back from load_model with float32 weights, and a pickled bfloat16
    module ended `prune` and `eval` in a dtype-mismatch traceback."""
    from compressdrop import PrecisionWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    net = net.to(torch.bfloat16).eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "bf16.pt2")
    got = load_model(tmp_path / "bf16.pt2")
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(got(x), net(x))

    torch.save(net, tmp_path / "bf16.pt")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=0, onnx=False)
    warned = "bfloat16 weights are used in float32"
    with pytest.warns(PrecisionWarning, match=warned):
        res = run(["eval", tmp_path / "bf16.pt2", "--data", "digits"])
    assert "accuracy" in res.output
    with pytest.warns(PrecisionWarning, match=warned):
        run(["prune", tmp_path / "bf16.pt", "--trust-pickle", "--data", "digits",
             "--recipe", recipe, "-o", tmp_path / "slim.pt"])  # fmt: skip
    slim = load_model(tmp_path / "slim.pt")
    assert {p.dtype for p in slim.parameters()} == {torch.float32}


def test_keep_gated_leaves_the_gated_model_for_sweep_and_another_threshold(tmp_path):
    """The README promised a `prune` of a user's model could be swept and sampled afterwards, but
    the gated model was deleted with the run's temporary folder. `--keep-gated` keeps it."""
    torch.manual_seed(0)
    program = torch.export.export(
        user_net(num_classes=10).eval(),
        (torch.randn(2, 1, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, tmp_path / "model.pt2")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=2, finetune=1, onnx=False)
    args = ["prune", tmp_path / "model.pt2", "--data", "digits", "--recipe", recipe]
    res = run([*args, "-o", tmp_path / "slim.pt", "--keep-gated", "--json"])
    files = json.loads(res.stdout)["files"]
    assert files["gated"] == str(tmp_path / "slim-gated.pt")
    gated = tmp_path / "slim-gated.pt"
    assert cd.is_gated(load_model(gated))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == [
        "slim-gated.pt",
        "slim.pt",
    ]  # and nothing of the run's temporary folder
    run(["sweep", gated, "--data", "digits", "-t", "0.5,2", "-o", tmp_path / "sweep"])
    run(["prune", gated, "-t", "2", "-o", tmp_path / "slim2.pt"])
    refused = run(["prune", gated, "--keep-gated", "-o", tmp_path / "slim3.pt"], expect=1)
    assert "--keep-gated (the file is the gated model)" in refused.output


def test_a_state_dict_of_a_reference_net_takes_its_name_as_arch(tmp_path):
    """`--arch lenet300` was refused ("must look like 'package.module:function'"), and the
    reference nets, which need no consent anywhere else, were reachable only through
    `--arch compressdrop.models:build_model --arch-arg name=lenet300`."""
    from compressdrop.models import build_model

    torch.manual_seed(0)
    net = build_model("lenet300", input_shape=(1, 8, 8)).eval()
    torch.save(net.state_dict(), tmp_path / "dense8.pt")
    got = load_model(
        tmp_path / "dense8.pt", arch="lenet300", arch_kwargs={"input_shape": [1, 8, 8]}
    )
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(got(x), net(x))
    with pytest.raises(CheckpointError, match=r"e\.g\. num_classes=10 or input_shape="):
        load_model(tmp_path / "dense8.pt", arch="lenet300")  # 28×28 by default: 784 inputs
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=0, onnx=False)
    run(["prune", tmp_path / "dense8.pt", "--arch", "lenet300", "--arch-arg", "input_shape=[1,8,8]",
         "--recipe", recipe, "--data", "digits", "-o", tmp_path / "slim.pt"])  # fmt: skip
    assert load_model(tmp_path / "slim.pt").prune_report.architecture_before == "300-100"


class _TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 50):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(vocab, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(self.emb(x).mean(1))))


def test_token_data_meets_a_token_model_or_a_clear_error(tmp_path):
    """Token ids in an .npz loaded as float32 and ended in an embedding's dtype traceback; ids
    past the vocabulary in `IndexError: index out of range`, class labels for a language model
    in a shape traceback after the whole sparsify stage, and a `.pt2` of a token model got float
    inputs to trace. Now: ids become int64 for a model that reads them; the rest are errors
    that say what does not fit, before training."""
    from compressdrop.workflows import evaluate_file

    gen = np.random.default_rng(0)
    np.savez(tmp_path / "tok.npz", x=gen.integers(0, 50, (120, 12)), y=gen.integers(0, 3, 120))
    np.savez(tmp_path / "big.npz", x=gen.integers(0, 80, (120, 12)), y=gen.integers(0, 3, 120))
    batch = torch.export.Dim("batch")
    ids = torch.randint(0, 50, (2, 12))
    for name, net in (("cls", _TokenClassifier()), ("lm", _TokenLM())):
        program = torch.export.export(net.eval(), (ids,), dynamic_shapes=({0: batch},))
        torch.export.save(program, tmp_path / f"{name}.pt2")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=0, onnx=False)
    args = ["--recipe", recipe, "-o", tmp_path / "slim.pt2"]
    run(["prune", tmp_path / "cls.pt2", "--data", tmp_path / "tok.npz", *args])
    assert evaluate_file(tmp_path / "slim.pt2", str(tmp_path / "tok.npz"))["n"] > 0
    said = run(["prune", tmp_path / "cls.pt2", "--data", tmp_path / "big.npz", *args], expect=1)
    assert "token ids up to 79 but the model's vocabulary (its embedding) has 50" in said.output
    np.savez(tmp_path / "feat.npz", x=gen.normal(size=(120, 12)), y=gen.integers(0, 3, 120))
    said = run(["prune", tmp_path / "cls.pt2", "--data", tmp_path / "feat.npz", *args], expect=1)
    assert "reads token ids (integers) but data 'feat' holds other numbers" in said.output
    said = run(["prune", tmp_path / "lm.pt2", "--data", tmp_path / "tok.npz", *args], expect=1)
    assert "outputs of shape (12, 50) per example, but data 'tok' has labels of shape ()" in (
        said.output
    )


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.weight


class _HeadFirst(nn.Module):
    """A token model whose first module holds a parameter that is no layer (as a Hugging Face
    model's RMSNorm): in its program's module it comes before the embedding."""

    def __init__(self):
        super().__init__()
        self.norm, self.emb, self.head = _Scale(), nn.Embedding(40, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.emb(x)).mean(1))


def test_a_token_program_is_fed_token_ids_whatever_its_layer_order(tmp_path):
    """A `.pt2` of a token model whose first layer in `modules()` is not its embedding was fed
    float inputs: `eval` ended in an embedding traceback, a re-prune failed after training."""
    from compressdrop.gating import example_input_for

    ids = torch.randint(0, 40, (2, 7))
    batch = torch.export.Dim("batch")
    program = torch.export.export(_HeadFirst().eval(), (ids,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "m.pt2")
    x = example_input_for(load_model(tmp_path / "m.pt2"), batch=3)
    assert x.dtype == torch.int64 and x.shape == (3, 7) and int(x.max()) < 40


class _CastsToItsDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):  # as bfloat16 code often does: the cast is baked into the program
        return self.fc(x.flatten(1).to(self.fc.weight.dtype))


def test_a_bfloat16_program_that_casts_inside_is_refused_clearly(tmp_path):
    """`model.float()` converts a program's weights but not the casts its graph holds: `eval` of
    such a bf16 `.pt2` ended in `mat1 and mat2 must have the same dtype` with a traceback."""
    net = _CastsToItsDtype().to(torch.bfloat16).eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), tmp_path / "cast.pt2"
    )
    with pytest.warns(UserWarning, match="bfloat16 weights are used in float32"):
        said = run(["eval", tmp_path / "cast.pt2", "--data", "digits"], expect=1)
    assert "does not run in float32" in said.output and "model.float() before" in said.output


def test_keep_gated_leaves_nothing_when_the_slim_files_fail(tmp_path, monkeypatch):
    """The gated model was moved into place before the slim files were written: a failed export
    left `slim-gated.pt` beside no slim model (a review)."""
    import compressdrop.workflows.jobs as jobs
    from compressdrop.export import ExportError

    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    net = user_net(num_classes=10).eval()
    program = torch.export.export(net, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=0, onnx=False)

    def fails(*args, **kwargs):
        raise ExportError("the exporter failed (simulated)")

    monkeypatch.setattr(jobs, "write_slim", fails)
    with pytest.raises(ExportError, match="simulated"):
        jobs.prune_file(tmp_path / "model.pt2", tmp_path / "slim.onnx", data="digits",
                        recipe=str(recipe), keep_gated=True)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "r.yaml"]


def test_keep_gated_for_a_pickled_module_whose_program_differs_is_refused_before_training(
    tmp_path,
):
    """A new-user walk: a pickled torchvision ViT pruned with ``--keep-gated`` wrote a gated
    file that did not load (its heads were gated on the module; the program compressdrop records
    it as shows no heads, so the rebuilt model's gates differ). A pickled MLP's gated file loads."""
    from tests.torchvision_models import import_torchvision

    tv = import_torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed")
    vit = tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=3,
    )  # fmt: skip
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 16, 16, generator=gen).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages: {pretrain: {epochs: 0}, sparsify: {epochs: 1}, finetune: {epochs: 1}}"
    )
    for name, model in (("vit", vit), ("mlp", mlp)):
        torch.save(model, tmp_path / f"{name}.pt")
    args = ["--trust-pickle", "--data", tmp_path / "d.npz", "--recipe", recipe, "--keep-gated"]
    res = run(["prune", tmp_path / "vit.pt", *args, "-o", tmp_path / "vs.pt2"], expect=1)
    assert "gated model of a pickled VisionTransformer would not load back" in res.output
    assert "torch.export.save" in res.output and "sparsify" not in res.output
    assert not list(tmp_path.glob("vs*")) and not list(tmp_path.glob(".vs*"))
    run(["prune", tmp_path / "mlp.pt", *args, "-o", tmp_path / "ms.pt2"])
    gated = load_model(tmp_path / "ms-gated.pt")
    assert cd.is_gated(gated)


class ScaledInput(nn.Module):
    """An MLP whose input is scaled by a buffer it does not save (``persistent=False``), as
    Hugging Face models keep their ``position_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x.flatten(1) * self.scale)))


def test_keep_gated_for_a_pickled_module_with_a_buffer_it_does_not_save(tmp_path):
    """`prune whole.pt --trust-pickle --keep-gated` of a module with a non-persistent buffer was
    refused ("its blocks differ ... e.g. scale"): the program it is recorded as holds the buffer
    as a persistent one, so the gated file, without it, would not have loaded."""
    torch.manual_seed(0)
    model = ScaledInput().eval()
    torch.save(model, tmp_path / "whole.pt")
    recipe = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=1, finetune=0, onnx=False)
    args = ["--trust-pickle", "--data", "digits", "--recipe", recipe, "--keep-gated"]
    run(["prune", tmp_path / "whole.pt", *args, "-o", tmp_path / "s.pt2"])
    gated = load_model(tmp_path / "s-gated.pt")
    assert cd.is_gated(gated)
    torch.testing.assert_close(gated.get_buffer("scale"), model.scale, rtol=0, atol=0)
    again = cd.prune(
        gated, 1.0
    )  # the gated file prunes at another threshold, as --keep-gated is for
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        cd.mask_(gated, 1.0)
        torch.testing.assert_close(again(x), gated(x), rtol=1e-5, atol=1e-6)


_FACTORY_CALLS: list[int] = []


def flaky_torchvision_net(num_classes: int = 10) -> nn.Module:
    """Fails, the first time, as a factory that builds a transformers model fails where the
    installed torchvision's compiled ops do not load: transformers raises torchvision's
    RuntimeError as the cause of a ModuleNotFoundError."""
    _FACTORY_CALLS.append(1)
    if len(_FACTORY_CALLS) == 1:
        try:
            raise RuntimeError("operator torchvision::nms does not exist")
        except RuntimeError as e:
            raise ModuleNotFoundError("Could not import module 'BertModel'") from e
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def test_a_factory_that_fails_on_torchvision_s_import_is_called_again(monkeypatch):
    """The factory is called again after the workaround (it was a raw double traceback)."""
    from compressdrop import _torchvision
    from compressdrop.arch import build_arch

    _FACTORY_CALLS.clear()
    worked: list[int] = []
    monkeypatch.setattr(_torchvision, "import_torchvision", lambda: worked.append(1))
    model = build_arch({"name": "mine"}, factory="tests.test_formats:flaky_torchvision_net")
    assert len(_FACTORY_CALLS) == 2 and worked == [1]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
