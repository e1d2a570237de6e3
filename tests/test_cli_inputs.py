"""Inputs a user gets wrong, or settings a command must not drop (found by a new-user walk
through the CLI): each is a clear error that names the problem, or is honoured, and no file is
left half-written."""

import math
import warnings

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import compressdrop as cd
from compressdrop.checkpoint import load_model, save_model
from compressdrop.cli import main
from compressdrop.data import load_dataset
from compressdrop.errors import DataError, InputError
from compressdrop.export import ExportError, export_onnx
from compressdrop.models import build_model
from compressdrop.recipes import load_recipe


def run(args, expect=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _recipe(threshold: float) -> dict:
    r = load_recipe("lenet300-lognormal").to_dict()
    r["prune"]["threshold"] = threshold
    return r


@pytest.fixture(scope="module")
def gated_file(tmp_path_factory):
    """A gated LeNet-300-100 whose units' SNRs are spread, saved with a recipe that prunes at
    the SNR of its gates' 40 % quantile; that threshold is returned too."""
    d = tmp_path_factory.mktemp("gated")
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 8, 8))
    cd.attach(model, gate="lognormal", example_inputs=torch.randn(2, 1, 8, 8))
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.copy_(torch.linspace(-4.0, 2.0, g.num_units))
    snr = torch.cat([g.snr().detach() for _, g in cd.named_gates(model)])
    thr = float(snr.quantile(0.4))
    save_model(model, d / "gated.pt", recipe=_recipe(thr))
    return d / "gated.pt", thr


def _units(path) -> str:
    return load_model(path).prune_report.architecture()


def test_prune_of_a_gated_model_takes_the_threshold_it_trained_with(gated_file, tmp_path):
    path, thr = gated_file
    run(["prune", path, "-o", tmp_path / "a.pt"])
    run(["prune", path, "-o", tmp_path / "b.pt", "-t", thr])
    run(["prune", path, "-o", tmp_path / "c.pt", "-t", 1.0])  # the family's default
    assert _units(tmp_path / "a.pt") == _units(tmp_path / "b.pt") != _units(tmp_path / "c.pt")
    # --recipe names the prune settings instead; an unknown one is an error
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(1.0)))
    run(["prune", path, "-o", tmp_path / "d.pt", "--recipe", tmp_path / "r.yaml"])
    assert _units(tmp_path / "d.pt") == _units(tmp_path / "c.pt")
    res = run(["prune", path, "-o", tmp_path / "e.pt", "--recipe", "nope"], expect=1)
    assert "nope" in res.stderr and not (tmp_path / "e.pt").exists()


def test_prune_of_a_gated_model_refuses_training_options(gated_file, tmp_path):
    path, _ = gated_file
    res = run(["prune", path, "-o", tmp_path / "s.pt", "--data", "digits"], expect=1)
    assert "trained gates" in res.stderr and "data" in res.stderr
    res = run(["prune", path, "-o", tmp_path / "s.pt", "--seed", 3, "--device", "cpu"], expect=1)
    assert "--seed, --device" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_threshold_must_be_finite_and_not_negative(gated_file, tmp_path, bad):
    path, _ = gated_file
    res = run(["prune", path, "-o", tmp_path / "s.pt", "-t", bad], expect=1)
    assert "finite number ≥ 0" in res.stderr and not (tmp_path / "s.pt").exists()
    model = load_model(path)
    with pytest.raises(InputError, match="finite number ≥ 0"):
        cd.prune(model, bad)
    with pytest.raises(InputError, match="finite number ≥ 0"):
        cd.mask_(model, bad)
    res = run(["sweep", path, "--data", "digits", "-t", f"1,{bad}", "--out", tmp_path / "sw"], 1)
    assert "finite number ≥ 0" in res.stderr and not (tmp_path / "sw").exists()


def test_sweep_latency_batch_and_threads_must_be_positive(gated_file, tmp_path):
    path, _ = gated_file
    for opt in ("--batch", "--threads"):
        res = run(["sweep", path, "--data", "digits", opt, 0, "--out", tmp_path / "sw"], 2)
        assert opt in res.output
    assert not (tmp_path / "sw").exists()


def test_an_empty_output_name_or_an_existing_folder_is_a_clear_error(gated_file, tmp_path):
    path, _ = gated_file
    for cmd in ("prune", "export"):
        res = run([cmd, path, "-o", ""], expect=2)
        assert "empty file name" in res.output
        (tmp_path / "out.onnx").mkdir(exist_ok=True)
        res = run([cmd, path, "-o", tmp_path / "out.onnx"], expect=2)
        assert "is a folder" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert list((tmp_path / "out.onnx").iterdir()) == []
    from compressdrop.workflows import export_file, prune_file

    for fn in (prune_file, export_file):
        with pytest.raises(InputError, match="empty file name"):
            fn(path, "")
        for where in (".", tmp_path / ".."):  # Path("") is "." too
            with pytest.raises(InputError, match="name a file, or a folder that is not there"):
                fn(path, where)
        with pytest.raises(InputError, match="is a folder"):
            fn(path, tmp_path / "out.onnx")


def test_an_opset_the_exporter_cannot_write_is_an_error(tmp_path):
    model = build_model("lenet300", (1, 8, 8))
    with pytest.raises(ExportError, match="could not write ONNX opset 11"):
        export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


def test_an_npz_whose_class_cannot_be_split_names_the_file(tmp_path):
    x = np.random.default_rng(0).random((21, 1, 4, 4), dtype=np.float32)
    y = np.array([0] * 10 + [1] * 10 + [2])
    np.savez(tmp_path / "rare.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"rare\.npz: class 2 has 1 example"):
        load_dataset(str(tmp_path / "rare.npz"))
    # three classes of two: a fifth held out is 2 test examples, fewer than the classes
    np.savez(tmp_path / "few.npz", x=x[:6], y=np.array([0, 0, 1, 1, 2, 2]))
    with pytest.raises(DataError, match=r"few\.npz: a test fraction of 0.2 of 6 examples"):
        load_dataset(str(tmp_path / "few.npz"))


def test_an_empty_data_spec_is_named():
    with pytest.raises(DataError, match="empty data spec"):
        load_dataset("")


def test_train_and_eval_refuse_an_npz_with_nan_inputs_before_any_work(gated_file, tmp_path):
    # before: training ran into "loss is nan ... lower the learning rate?", eval printed nll nan
    x = np.random.default_rng(0).random((200, 1, 8, 8), dtype=np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(200) % 10)
    out = tmp_path / "run"
    res = run(
        ["train", "--recipe", "lenet300-lognormal", "--data", tmp_path / "nan.npz", "--out", out],
        expect=1,
    )
    assert "nan.npz: x has 1 non-finite values (1 NaN, 0 ±Inf)" in res.output
    assert "loss is nan" not in res.output and not (out / "checkpoint.pt").exists()
    res = run(["eval", gated_file[0], "--data", tmp_path / "nan.npz"], expect=1)
    assert "nan.npz: x has 1 non-finite values" in res.output


def test_load_and_save_model_are_part_of_the_top_level_api(gated_file, tmp_path):
    path, _ = gated_file
    model = cd.load_model(path)
    cd.save_model(model, tmp_path / "again.pt")
    assert cd.is_gated(cd.load_model(tmp_path / "again.pt"))


def test_a_damaged_checkpoint_names_the_damage_not_an_unsafe_way_to_load_it(tmp_path):
    import zipfile

    from compressdrop.checkpoint import load_checkpoint
    from compressdrop.errors import CheckpointError

    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as zin, zipfile.ZipFile(tmp_path / "bad.pt", "w") as z:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):  # an opcode no unpickler knows
                data = data[:2] + b"\xff" + data[3:]
            z.writestr(item, data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "Unsupported operand 255" in str(info.value)
    assert "weights_only" not in str(info.value)


def test_an_onnx_file_given_to_prune_says_what_is_needed(tmp_path):
    export_onnx(build_model("lenet300", (1, 8, 8)), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    for cmd in (["prune", tmp_path / "m.onnx", "-o", tmp_path / "s.pt"],
                ["export", tmp_path / "m.onnx", "-o", tmp_path / "s.pt2"]):  # fmt: skip
        res = run(cmd, expect=1)
        assert "an ONNX model" in res.stderr and "PyTorch model it came from" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.filterwarnings("ignore::compressdrop.GatingWarning")  # the stream stays whole
def test_prune_of_a_gated_model_takes_the_uniform_rule_it_trained_with(tmp_path):
    from compressdrop.workflows import prune_file

    torch.manual_seed(0)
    vit = build_model("vit", (1, 8, 8), patch=2, dim=16, depth=2, heads=4, mlp=24)
    cd.attach(vit, gate="lognormal", example_inputs=torch.randn(2, 1, 8, 8))
    with torch.no_grad():  # the two layers' MLPs would keep different numbers of neurons
        for i, (_, g) in enumerate(cd.named_gates(vit)):
            g.log_sigma.copy_(torch.linspace(-4.0, 2.0 + 2 * i, g.num_units))
    r = load_recipe("vit-lognormal").to_dict()
    r["prune"] = {"threshold": 1.0, "uniform": True}
    save_model(vit, tmp_path / "gated.pt", recipe=r)

    def widths(path) -> list[int]:
        slim = load_model(path)
        return [layer.linear1.out_features for layer in slim.encoder.layers]

    prune_file(tmp_path / "gated.pt", tmp_path / "u.pt")
    prune_file(tmp_path / "gated.pt", tmp_path / "n.pt", uniform=False)
    assert len(set(widths(tmp_path / "u.pt"))) == 1
    assert len(set(widths(tmp_path / "n.pt"))) == 2


def test_an_onnx_graph_that_draws_samples_is_scored_with_them_without_mc(gated_file, tmp_path):
    """It ended in a traceback (its (samples, batch, classes) output read as logits)."""
    from compressdrop.workflows import evaluate_file, prune_file

    path, _ = gated_file
    prune_file(path, tmp_path / "slim.pt", mc_samples=4)
    res = evaluate_file(tmp_path / "slim-mc.onnx", "digits")
    assert res["mc"]["samples"] == 4 and 0 <= res["accuracy"] <= 1
    assert res["accuracy"] == res["mc"]["accuracy"]


def test_one_include_or_exclude_pattern_is_a_pattern_not_its_characters():
    def gated_names(**kw) -> list[str]:
        mlp = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
            torch.nn.Linear(8, 2),
        )  # fmt: skip
        cd.attach(mlp, example_inputs=torch.randn(2, 4), **kw)
        return [n for n, _ in cd.named_gates(mlp)]

    assert gated_names(include="0*") == gated_names(include=["0*"]) == ["0"]
    assert gated_names(exclude="0*") == gated_names(exclude=["0*"]) == ["2"]
    assert gated_names(include=torch.nn.Linear) == ["0", "2"]


@pytest.mark.parametrize("case", ["converted after attach", "attached without an example", "bf16"])
def test_prune_follows_the_models_dtype(case):
    """Converted after attach, the float32 example attach recorded met float64 weights (a raw
    RuntimeError); attached in float64 without an example, tracing got a float32 input; a bf16
    model's parity check held it to float32's tolerance and asked for a bug report."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip
    x = torch.randn(4, 8)
    if case == "converted after attach":
        cd.attach(mlp, example_inputs=x).double()
    elif case == "attached without an example":
        cd.attach(mlp.double())
    else:
        cd.attach(mlp.bfloat16(), example_inputs=x.bfloat16())
    with torch.no_grad():
        for _, g in cd.named_gates(mlp):
            g.log_sigma.copy_(torch.linspace(-4.0, 2.0, g.num_units))
    slim = cd.prune(mlp, 1.0)
    assert slim.prune_report.units_after < slim.prune_report.units_before
    assert next(slim.parameters()).dtype == next(mlp.parameters()).dtype


def test_a_sampling_onnx_graph_of_token_ids_takes_them_as_integers(tmp_path):
    """The Monte-Carlo sampler fed every graph float32 inputs, which a token model refuses."""
    from compressdrop.uncertainty import export_mc_onnx, keep_noise, mc_evaluate_onnx

    from .test_inputs import TokenNet

    torch.manual_seed(0)
    model = TokenNet().eval()
    ids = torch.randint(0, 50, (16, 7))
    cd.attach(model, example_inputs=ids[:2])
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.copy_(torch.linspace(-4.0, 1.0, g.num_units))
    slim = cd.prune(model, 1.0)
    export_mc_onnx(keep_noise(model, slim, 1.0), ids[:2], tmp_path / "mc.onnx", samples=4)
    res = mc_evaluate_onnx(tmp_path / "mc.onnx", ids, torch.randint(0, 3, (16,)), samples=4)
    assert res["samples"] == 4 and 0 <= res["accuracy"] <= 1


def _noisy_token_net(model, ids):
    """``model`` gated on ``ids``, pruned at SNR 1 with spread gates, its noise kept."""
    from compressdrop.uncertainty import keep_noise

    cd.attach(model, example_inputs=ids[:2])
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.copy_(torch.linspace(-4.0, 1.0, g.num_units))
    return keep_noise(model, cd.prune(model, 1.0), 1.0)


class _FlatTokenNet(torch.nn.Module):
    """Token ids → embedding → flattened: it takes one sequence length only."""

    def __init__(self, tokens: int = 7) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.fc1 = torch.nn.Linear(4 * tokens, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids).flatten(1))))


def test_a_sampling_onnx_graph_of_token_ids_takes_any_length_where_the_model_does(tmp_path):
    """The MC graph of token ids had its sequence length fixed at the example's (its eval at
    another context was a raw onnxruntime error); now it is dynamic as export_onnx's, and a
    model of one length gets a fixed graph with a warning and a clear error at another."""
    import onnxruntime as ort

    from compressdrop.errors import InputError
    from compressdrop.uncertainty import export_mc_onnx, mc_evaluate_onnx

    from .test_inputs import TokenNet

    torch.manual_seed(0)
    ids, y = torch.randint(0, 50, (16, 7)), torch.randint(0, 3, (16,))
    noisy = _noisy_token_net(TokenNet().eval(), ids)
    export_mc_onnx(noisy, ids[:2], tmp_path / "mc.onnx", samples=4)
    shape = ort.InferenceSession(tmp_path / "mc.onnx").get_inputs()[0].shape
    assert isinstance(shape[1], str)  # dynamic
    longer = torch.randint(0, 50, (16, 12))
    res = mc_evaluate_onnx(tmp_path / "mc.onnx", longer, y, samples=4)
    assert res["samples"] == 4 and 0 <= res["accuracy"] <= 1

    noisy = _noisy_token_net(_FlatTokenNet().eval(), ids)
    with pytest.warns(UserWarning, match="length 7 only"):
        export_mc_onnx(noisy, ids[:2], tmp_path / "flat.onnx", samples=4)
    with pytest.raises(InputError, match=r"shape \(7,\) after the batch.*context=7"):
        mc_evaluate_onnx(tmp_path / "flat.onnx", longer, y, samples=4)


def test_only_token_ids_try_a_dynamic_length_and_other_failures_say_nothing_of_it(tmp_path):
    from compressdrop.export._check import with_lengths

    class Pixels(torch.nn.Module):  # bytes of an image, flat: no sequence
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float() / 255)

    x = torch.randint(0, 256, (2, 64), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no word of a sequence length
        with_lengths(export_onnx, Pixels().eval(), x, tmp_path / "p.onnx")

    class Branchy(torch.nn.Module):  # data-dependent control flow: no export at all
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids).mean(1)
            return h if bool(h.sum() > 0) else -h

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ExportError):
            with_lengths(
                export_onnx, Branchy().eval(), torch.randint(0, 20, (2, 8)), tmp_path / "b.onnx"
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx"]


def test_labels_the_model_has_no_output_for_are_named_before_any_work(
    gated_file, tmp_path, monkeypatch
):
    """A 10-output model against data with 20 classes: eval, eval --mc and the ONNX evaluator
    failed with torch's "IndexError: Target 13 is out of bounds" traceback, prune only after
    its training stages, and sweep only after its first prune and export."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(20), 10)
    np.savez(tmp_path / "twenty.npz", x=rng.random((200, 1, 8, 8), dtype=np.float32), y=y)
    data = str(tmp_path / "twenty.npz")
    path, _ = gated_file
    from compressdrop.workflows import evaluate_file, export_file

    # a trained model cannot change its outputs: no --arch-arg advice (sweep has no such option)
    scored = "labels up to 19 .*: the model was trained for 10: score it on data of those"
    with pytest.raises(InputError, match=scored):
        evaluate_file(path, data)
    from compressdrop.evaluation import sweep as sweep_module
    from compressdrop.workflows import sweep_file

    def swept(*args, **kwargs):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(sweep_module, "sweep", swept)
    with pytest.raises(InputError, match=scored):
        sweep_file(path, data, out=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()
    with pytest.raises(InputError, match=scored):
        evaluate_file(path, data, mc_samples=3)
    export_file(path, tmp_path / "m.onnx")
    with pytest.raises(InputError, match="gives 10 outputs but the data has labels up to 19"):
        evaluate_file(tmp_path / "m.onnx", data)
    plain = build_model("lenet300", (1, 8, 8))
    save_model(plain, tmp_path / "plain.pt")
    res = run(["prune", tmp_path / "plain.pt", "--data", data, "-o", tmp_path / "s.pt"], expect=1)
    assert "gives 10 outputs" in res.output and "--arch-arg num_classes=20" in res.output
    assert "epoch" not in res.output  # refused before any training
    assert not (tmp_path / "s.pt").exists()


def test_a_folder_output_for_a_model_that_cannot_have_one_is_refused_before_training(tmp_path):
    """`prune model.pt --data ... -o out/slimfolder` trained for the whole recipe and only then
    said that a folder is for Hugging Face models."""
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "plain.pt")
    res = run(["prune", tmp_path / "plain.pt", "--data", "digits", "-o", tmp_path / "f"], expect=1)
    assert "a folder is written for Hugging Face transformers models only" in res.output
    assert "epoch" not in res.output and not (tmp_path / "f").exists()
    # export says which names it takes (it offered .pt, which export refuses)
    res = run(["export", tmp_path / "plain.pt", "-o", tmp_path / "f"], expect=1)
    assert "use a .onnx or .pt2 file name" in res.output and ".pt," not in res.output


def test_a_new_run_in_an_old_runs_folder_leaves_none_of_its_files(tmp_path):
    """Training again into the same --out with ONNX export off left the first run's slim.onnx
    and slim.pt2 beside the new slim.pt, passing for the new run's; a leftover checkpoint.pt was
    replaced without a word. A run that fails leaves the earlier run's files as they were."""
    from compressdrop.data import load_digits
    from compressdrop.training.runner import run_recipe

    from tests.test_cli import tiny_recipe

    out = tmp_path / "run"
    first = tiny_recipe(tmp_path / "a.yaml", pretrain=1, sparsify=1, finetune=0)
    run(["train", "--recipe", first, "--out", out])
    before = sorted(p.name for p in out.iterdir())
    assert "slim.onnx" in before

    def stop(event):
        if event.get("event") == "epoch":
            raise KeyboardInterrupt

    second = tiny_recipe(tmp_path / "b.yaml", pretrain=1, sparsify=1, finetune=0, onnx=False)
    with pytest.raises(KeyboardInterrupt):  # stopped after its first epoch's checkpoint
        run_recipe(load_recipe(str(second)), load_digits(), out, progress=stop)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "checkpoint.pt"])
    # resumed to its end, it removes what it did not write (a review found them kept then)
    said = run(["train", "--recipe", second, "--out", out, "--resume"]).output
    assert "removed an earlier run's slim.onnx, slim.pt2" in said
    assert sorted(p.name for p in out.iterdir()) == ["gated.pt", "report.json", "slim.pt"]
    (out / "checkpoint.pt").write_bytes(b"an interrupted run's")
    said = run(["train", "--recipe", first, "--out", out]).output
    assert "an earlier run's checkpoint.pt" in said and "--resume" in said


def test_arch_mistakes_are_named_as_the_user_typed_them(tmp_path):
    """`--arch mynets` spoke of an "arch record"; a factory module in the current folder failed
    with "No module named" and no word of the path; --arch beside a .pt2 was silently unused."""
    net = build_model("lenet300", (1, 8, 8)).eval()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(cd.CompressDropError, match="--arch mynets: factory 'mynets' must look"):
        load_model(tmp_path / "sd.pt", arch="mynets")
    with pytest.raises(cd.CompressDropError, match=r"not_a_module_here.*PYTHONPATH=\."):
        load_model(tmp_path / "sd.pt", arch="not_a_module_here:build")
    program = torch.export.export(
        net, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "m.pt2")
    with pytest.raises(cd.CompressDropError, match="holds its own structure"):
        load_model(tmp_path / "m.pt2", arch="tests.test_formats:user_net")


def test_ctrl_c_in_train_says_how_to_go_on(tmp_path, monkeypatch):
    """Ctrl-C printed click's "Aborted!" and nothing of --resume."""
    import compressdrop.workflows as workflows

    def interrupted(*args, **kwargs):
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "checkpoint.pt").write_bytes(b"an epoch's")
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "train", interrupted)
    res = run(["train", "--recipe", "lenet300-lognormal", "--out", tmp_path / "o"], expect=130)
    assert "interrupted; continue with the same command and --resume" in res.output


def test_the_output_may_not_be_the_model_it_reads(gated_file, tmp_path):
    """`prune G.pt -o G.pt` wrote the slim model over the trained gates, which then could not be
    pruned again at another threshold; an export over its own `.pt2` the same."""
    import shutil

    path, _ = gated_file
    gated = tmp_path / "g.pt"
    shutil.copy(path, gated)
    before = gated.read_bytes()
    for out in (gated, tmp_path / "." / "g.pt"):  # any spelling of the same file
        res = run(["prune", gated, "-o", out], expect=1)
        assert "it is the model this reads" in res.stderr
    assert gated.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["g.pt"]
    run(["export", gated, "-o", tmp_path / "m.pt2"])
    program = (tmp_path / "m.pt2").read_bytes()
    res = run(["export", tmp_path / "m.pt2", "-o", tmp_path / "m.pt2"], expect=1)
    assert "it is the model this reads" in res.stderr
    assert (tmp_path / "m.pt2").read_bytes() == program
    run(["prune", gated, "-o", tmp_path / "s.pt"])  # another file: as before


def test_every_file_a_prune_writes_is_checked_before_training_and_none_is_left_alone(
    gated_file, tmp_path, monkeypatch
):
    """A new-user walk: ``-o X.pt2`` writes ``X.onnx`` too, which was checked only after
    training (a folder named ``X.onnx`` failed the run at its end, and left ``X.pt2`` behind)."""
    path, _ = gated_file
    torch.save(build_model("lenet300", (1, 8, 8)).state_dict(), tmp_path / "plain.pt")
    (tmp_path / "ee.onnx").mkdir()
    args = ["--arch", "lenet300", "--arch-arg", "input_shape=[1,8,8]", "--data", "digits"]
    res = run(["prune", tmp_path / "plain.pt", *args, "-o", tmp_path / "ee.pt2"], expect=1)
    assert "ee.onnx: it is a folder" in res.output and "sparsify" not in res.output
    (tmp_path / "ee-mc.onnx").mkdir()
    res = run(["prune", path, "--mc-samples", 4, "-o", tmp_path / "ee.pt"], expect=1)
    assert "ee-mc.onnx: it is a folder" in res.output
    (tmp_path / "ee-mc.onnx").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ee.onnx", "plain.pt"]

    # a companion that fails while written: neither file stays
    from compressdrop.workflows import prune_file

    def fail(*a, **k):
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr("compressdrop.export.export_onnx", fail)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        prune_file(path, tmp_path / "slim.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ee.onnx", "plain.pt"]


def test_a_relative_data_path_is_recorded_so_eval_finds_it_from_elsewhere(tmp_path, monkeypatch):
    """A new-user walk: ``--data rgb.npz`` was recorded as given, so ``eval`` of the checkpoint
    (its default data) from another folder could not read it."""
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    d = load_dataset("digits")
    x, y = d.x_train[:120].numpy(), d.y_train[:120].numpy()
    np.savez(tmp_path / "work" / "d.npz", x=x, y=y)
    torch.save(build_model("lenet300", (1, 8, 8)).state_dict(), tmp_path / "work" / "w.pt")
    recipe = tmp_path / "work" / "r.yaml"
    recipe.write_text(
        "stages: {pretrain: {epochs: 0}, sparsify: {epochs: 1}, finetune: {epochs: 1}}"
    )
    monkeypatch.chdir(tmp_path / "work")
    arch = ["--arch", "lenet300", "--arch-arg", "input_shape=[1,8,8]"]
    run(["prune", "w.pt", *arch, "--data", "d.npz", "--recipe", "r.yaml", "-o", "s.pt"])
    recorded = load_model("s.pt").compressdrop_meta["recipe"]["data"]["name"]
    assert recorded == str(tmp_path / "work" / "d.npz")
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = run(["eval", tmp_path / "work" / "s.pt"])
    assert "accuracy" in res.output


def test_eval_on_the_digits_stand_in_says_to_name_the_data(tmp_path):
    """A new-user walk: ``eval slim.pt2`` (a file that records no data) scored the built-in
    digits and failed on their shape without pointing at ``--data``."""
    save_model(build_model("lenet300", (3, 4, 4)), tmp_path / "m.pt")
    run(["export", tmp_path / "m.pt", "-o", tmp_path / "m.onnx"])
    for name in ("m.pt", "m.onnx"):
        res = run(["eval", tmp_path / name], expect=1)
        assert "records no data of its own" in res.output and "with --data" in res.output
    res = run(["eval", tmp_path / "m.onnx", "--data", "digits"], expect=1)
    assert "records no data" not in res.output  # digits named: the shape error alone


class _GrayNet(torch.nn.Module):
    """Takes (batch, 8, 8): gray images without a channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_gray_images_are_given_without_their_channel_axis_to_a_program_that_takes_h_w(tmp_path):
    """An .npz of (N, 8, 8) is read as (N, 1, 8, 8); a .pt2 exported on (batch, 8, 8) gets them
    as (N, 8, 8) in eval and prune, not an error about shapes."""
    ds = load_dataset("digits")
    x, y = ds.x_train[:200, 0].numpy() * 255, ds.y_train[:200].numpy()  # (N, 8, 8) pixels
    np.savez(tmp_path / "gray.npz", x=x, y=y)
    net = _GrayNet().eval()
    program = torch.export.export(
        net, (torch.rand(4, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "gray.pt2")
    data = ["--data", tmp_path / "gray.npz"]
    assert "accuracy" in run(["eval", tmp_path / "gray.pt2", *data]).output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages: {pretrain: {epochs: 0}, sparsify: {epochs: 1}, finetune: {epochs: 1}}"
    )
    run(["prune", tmp_path / "gray.pt2", "-o", tmp_path / "slim.pt", *data, "--recipe", recipe])
    assert load_model(tmp_path / "slim.pt")(torch.rand(3, 8, 8)).shape == (3, 10)
