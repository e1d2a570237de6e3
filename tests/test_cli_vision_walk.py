"""A new user's torchvision-style image classifiers through the CLI (a third walk): what their
models do with the wrong inputs is a clear error that names the problem, never a traceback or a
half-written file."""

import numpy as np
import pytest
import torch
from torch import nn

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError

from .test_cli import run


class SizedNet(nn.Module):
    """A classifier that checks its input's size with ``torch._assert``, as torchvision's
    ``VisionTransformer`` does (an ``AssertionError``, not a ``RuntimeError``)."""

    def __init__(self, image_size: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.image_size = image_size
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(
            x.shape[-1] == self.image_size,
            f"Wrong image width! Expected {self.image_size} but got {x.shape[-1]}!",
        )
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def sized_net(**kwargs) -> nn.Module:
    """The factory that ``--arch tests.test_cli_vision_walk:sized_net`` names."""
    return SizedNet(**kwargs)


def test_a_models_own_size_assertion_is_named_as_the_datas_misfit(tmp_path):
    """A ViT state_dict or pickle given images of another size failed in `eval` and `prune` with
    the model's raw traceback (``AssertionError: Wrong image height! Expected 32 but got 64!``)."""
    torch.manual_seed(0)
    torch.save(SizedNet().state_dict(), tmp_path / "sd.pt")
    x = np.random.default_rng(0).random((12, 3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "big.npz", x=x, y=np.arange(12) % 3)
    arch = ["--arch", "tests.test_cli_vision_walk:sized_net"]
    slim = tmp_path / "slim.pt2"
    for cmd in (["eval"], ["prune", "-o", slim]):
        res = run([*cmd, tmp_path / "sd.pt", *arch, "--data", tmp_path / "big.npz"], expect=1)
        assert "cannot run on data 'big' (examples of shape (3, 16, 16)" in res.stderr
        assert "Wrong image width! Expected 8 but got 16!" in res.stderr
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz", "sd.pt"]


class BakedView(nn.Module):
    """A torchvision ViT's patch step in small: ``reshape(n, hidden, positions)`` with every size
    given, which ``torch.export`` without ``dynamic_shapes`` fixes at the example's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 4, stride=4), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.reshape(h.shape[0], 8, h.shape[2] * h.shape[3]).mean(-1))


def test_a_pt2_whose_fixed_batch_reshape_fails_at_another_size_is_refused_with_the_advice(
    tmp_path,
):
    """Such a program cannot run at another batch size even on fake tensors, so the batch-size
    check was skipped with a warning ("the sizes of its tensors are not known before it runs")
    and `prune` then failed on the data: ``shape '[4, 32, 16]' is invalid``, without the advice
    to export with a dynamic batch."""
    torch.manual_seed(0)
    path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(BakedView().eval(), (torch.randn(4, 3, 16, 16),)), path)
    with pytest.raises(CheckpointError, match=r"fixed batch size of 4 .*dynamic_shapes"):
        load_model(path)
    res = run(["eval", path, "--data", "digits"], expect=1)
    assert "fixed batch size of 4" in res.stderr and "Traceback" not in res.output
    assert "batch-size check was not run" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.pt2"]


def _nan_onnx(path) -> None:
    """A linear classifier of 4 features and 3 classes whose bias holds a NaN, in ONNX."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.array([np.nan, 0.0, 0.0], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["output"])],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_a_model_whose_outputs_are_nan_scores_no_accuracy(tmp_path):
    """A diverged checkpoint's NaN logits were read as class 0 by ``argmax``: `eval` printed
    accuracy 0.40 (the share of class 0) beside NLL nan. A prediction that holds a NaN is wrong
    in PyTorch, onnxruntime and Monte-Carlo scoring alike."""
    from compressdrop.evaluation import evaluate
    from compressdrop.evaluation.onnx_eval import evaluate_onnx
    from compressdrop.uncertainty.mc import scores

    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.bias[0] = float("nan")
    x, y = torch.randn(9, 4), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    got = evaluate(net, x, y)
    assert got.accuracy == 0.0 and np.isnan(got.nll)
    _nan_onnx(tmp_path / "nan.onnx")
    onnx_got = evaluate_onnx(tmp_path / "nan.onnx", x, y, device="cpu")
    assert onnx_got["accuracy"] == 0.0 and np.isnan(onnx_got["nll"])
    probs = torch.full((4, 3), 1 / 3)
    probs[0] = float("nan")  # one example NaN, three of class 0 that the others get right
    probs[1:, 0] = 0.5
    assert scores(probs, torch.tensor([0, 0, 0, 1]))["accuracy"] == 0.5
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), x_test=x.numpy(), y_test=y.numpy())
    res = run(["eval", tmp_path / "nan.onnx", "--data", tmp_path / "d.npz", "--json"])
    assert '"accuracy": 0.0' in res.stdout and '"nll": NaN' in res.stdout


class PooledNet(nn.Module):
    """A BatchNorm on a 1×1 feature map, as MobileNetV3's and EfficientNet's last conv at 32×32
    and ResNet's last stage have: in training it needs 2 examples in a batch."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(8, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def pooled_net(**kwargs) -> nn.Module:
    """The factory that ``--arch tests.test_cli_vision_walk:pooled_net`` names."""
    return PooledNet(**kwargs)


def test_a_last_batch_of_one_example_joins_the_batch_before_it(tmp_path):
    """9 training examples in batches of 4 left a last batch of 1, and `prune` of a MobileNetV3
    or EfficientNet on an .npz failed mid-training with BatchNorm's raw ``ValueError: Expected
    more than 1 value per channel when training``."""
    import yaml

    torch.manual_seed(0)
    torch.save(PooledNet().state_dict(), tmp_path / "sd.pt")
    rng = np.random.default_rng(0)
    x, y = rng.random((9, 3, 8, 8), dtype=np.float32), np.arange(9) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:6], y_test=y[:6])
    recipe = {
        "data": {"batch_size": 4, "val_fraction": 0.0},
        "stages": {"sparsify": {"epochs": 1}, "finetune": {"epochs": 1}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    arch = ["--arch", "tests.test_cli_vision_walk:pooled_net"]
    data = ["--data", tmp_path / "d.npz", "--recipe", tmp_path / "r.yaml"]
    run(["prune", tmp_path / "sd.pt", *arch, *data, "-o", tmp_path / "slim.pt"])
    slim = load_model(tmp_path / "slim.pt", arch="tests.test_cli_vision_walk:pooled_net")
    assert slim(torch.from_numpy(x)).shape == (9, 3)
