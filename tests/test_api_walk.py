"""What a new user of the Python API ran into: wrong inputs, misuse, and the messages they get."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError


class SmallCNN(nn.Module):
    """A user's own net: conv → BN → conv → pool → flatten → linear, on (1, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.out = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


def _gated() -> nn.Module:
    torch.manual_seed(0)
    return cd.attach(SmallCNN(), example_inputs=torch.randn(2, 1, 8, 8)).eval()


def test_attach_names_example_inputs_the_model_does_not_run_on():
    with pytest.raises(
        InputError, match=r"does not run on example_inputs \(\(2, 3, 8, 8\) float32"
    ):
        cd.attach(SmallCNN(), example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"does not run on example_inputs.*float32.*double"):
        cd.attach(SmallCNN().double(), example_inputs=torch.randn(2, 1, 8, 8))


def test_prune_names_wrong_example_inputs_and_takes_a_list():
    net = _gated()
    with pytest.raises(InputError, match=r"does not run on example_inputs \(\(2, 3, 8, 8\)"):
        cd.prune(net, 1.0, example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match="got ndarray"):
        cd.prune(net, 1.0, example_inputs=torch.randn(2, 1, 8, 8).numpy())
    slim = cd.prune(net, 1.0, example_inputs=[torch.randn(2, 1, 8, 8)])  # as attach takes it
    assert slim.prune_report.max_rel_error < 1e-4


@pytest.mark.parametrize("export", [cd.export_onnx, cd.export_program], ids=["onnx", "program"])
def test_exports_name_an_example_the_model_does_not_run_on(tmp_path, export):
    slim = cd.prune(_gated(), 1.0)
    path = tmp_path / "slim.out"
    with pytest.raises(InputError, match=r"does not run on example_input \(\(2, 3, 8, 8\)"):
        export(slim, torch.randn(2, 3, 8, 8), path)
    with pytest.raises(InputError, match=r"does not run on example_input \(\(2, 1, 8, 8\) float32"):
        export(SmallCNN().double(), torch.randn(2, 1, 8, 8), path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("export", [cd.export_onnx, cd.export_program], ids=["onnx", "program"])
def test_an_example_the_model_does_not_run_on_is_named_without_torchs_log(tmp_path, export):
    """torch logged the failed trace (about forty lines, "failed while attempting to run meta for
    aten.mm.default", a traceback) on stderr before the error that names the input's shape."""
    import logging

    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = logged.append  # type: ignore[method-assign]
    # torch's loggers that print for themselves (fake_tensor's does not propagate) and the root
    ends = [logging.getLogger("torch")] + [
        logging.getLogger(n)
        for n, lg in list(logging.root.manager.loggerDict.items())
        if n.startswith("torch.") and isinstance(lg, logging.Logger) and not lg.propagate
    ]
    for lg in ends:
        lg.addHandler(handler)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    try:
        with pytest.raises(InputError, match=r"does not run on example_input \(\(2, 7\) float"):
            export(net, torch.randn(2, 7), tmp_path / "m.out")
    finally:
        for lg in ends:
            lg.removeHandler(handler)
    errors = [r.getMessage()[:200] for r in logged if r.levelno >= logging.ERROR]
    assert errors == []
    assert list(tmp_path.iterdir()) == []


def test_export_mc_onnx_names_an_example_the_model_does_not_run_on(tmp_path):
    gated = _gated()
    noisy = cd.keep_noise(gated, cd.prune(gated, 1.0))
    with pytest.raises(InputError, match=r"does not run on example \(\(4, 3, 8, 8\)"):
        cd.export_mc_onnx(noisy, torch.randn(4, 3, 8, 8), tmp_path / "mc.onnx", samples=4)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_and_sweep_name_inputs_and_labels_of_different_lengths():
    from compressdrop.evaluation import evaluate
    from compressdrop.evaluation.sweep import sweep

    net, x, y = _gated(), torch.randn(10, 1, 8, 8), torch.randint(0, 3, (9,))
    with pytest.raises(InputError, match="10 inputs but 9 labels"):
        evaluate(net, x, y)
    with pytest.raises(InputError, match="10 inputs but 9 labels"):
        sweep(net, x, y, [1.0], repeats=1, latency_batch=4)


def test_a_threshold_that_prunes_every_unit_warns_at_the_callers_line():
    net = _gated()
    for call in (cd.prune, cd.mask_):
        with pytest.warns(cd.PruningWarning, match="prunes every unit") as caught:
            call(net, 1e9)
        assert {w.filename for w in caught} == {__file__}


def test_torch_compile_wrappers_attach_refused_by_name_and_pruned_through():
    with pytest.raises(InputError, match=r"attach to the model, then compile it"):
        cd.attach(torch.compile(SmallCNN()), example_inputs=torch.randn(2, 1, 8, 8))
    net = _gated()
    with torch.no_grad():
        for _, gate in cd.named_gates(net):
            gate.mu[::2] = -10.0  # every other unit: θ near 0, low SNR
            gate.log_sigma[::2] = 0.5
    compiled = torch.compile(net)  # compiles lazily: prune must not run the wrapper
    slim = cd.prune(compiled, 1.0)
    expected = cd.prune(net, 1.0)
    assert (
        slim.prune_report.architecture() == expected.prune_report.architecture() == "8-8-16 → 4-4-8"
    )
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(slim(x), cd.mask_(net, 1.0)(x), rtol=1e-4, atol=1e-5)


def test_a_float64_convolution_export_is_refused_in_words(tmp_path):
    """onnxruntime's CPU provider has no float64 Conv: export_onnx ended in onnxruntime's own
    NotImplemented exception; it is an ExportError saying to export model.float(), and nothing
    is written (a float64 MLP, which onnxruntime runs, still exports)."""
    from compressdrop.export import ExportError, export_onnx

    conv = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).double()
    with pytest.raises(ExportError, match=r"float64 model .*Conv.*export model\.float\(\)"):
        export_onnx(conv, torch.randn(2, 1, 8, 8, dtype=torch.float64), tmp_path / "c.onnx")
    assert list(tmp_path.iterdir()) == []
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 3)).double()
    export_onnx(mlp, torch.randn(2, 8, dtype=torch.float64), tmp_path / "m.onnx")


def test_mc_predict_on_inputs_of_another_shape_names_them():
    """mc_predict's stacked batch failed with the layer's error quoting 300×192 (10 inputs ×
    30 samples, flattened) instead of the inputs' own shape."""
    from compressdrop.models import build_model
    from compressdrop.uncertainty import mc_predict

    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=3)
    cd.attach(net, "lognormal", example_inputs=torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match=r"cannot run on x \(examples of shape \(3, 8, 8\)"):
        mc_predict(net, torch.randn(10, 3, 8, 8), samples=30)
    assert mc_predict(net, torch.randn(10, 1, 8, 8), samples=3).mean.shape == (10, 3)


def test_an_export_to_a_directory_names_the_path_given(tmp_path):
    """export_onnx(model, x, "out/") failed at the very end with an IsADirectoryError naming
    its temporary file; the path given is named, before any export."""
    from compressdrop.export import export_onnx

    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write .*out: it is a directory"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == [
        "out"
    ]


def test_a_model_that_cannot_run_keeps_its_own_error_as_the_cause():
    """run_on_examples blames the inputs, which is what usually fails; where the model itself is
    at fault, its own error is the InputError's cause, not dropped (a review)."""
    from compressdrop.runtime import run_on_examples

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("a bug in forward")

    with pytest.raises(InputError, match="a bug in forward") as info:
        run_on_examples(Broken(), torch.randn(3, 4), "x")
    assert isinstance(info.value.__cause__, RuntimeError)
