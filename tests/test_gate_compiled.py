"""A compiled training step (``torch.compile``) keeps no more for its backward pass than the
plain model's where the eager hand-offs apply (``compressdrop/gates/_compiled.py``): the gate
multiply keeps its output, a ReLU after a gated layer is applied by the gate, and a gated
convolution's multiply moves past its ReLU and pool. Same values and gradients as eager."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.gates._compiled import _KeepOutput
from compressdrop.models import BasicBlock, build_model

# the min-cut partitioner inductor uses, without inductor's code generation (seconds, not a
# minute, per graph): what the compiled graph keeps for its backward pass is its choice
BACKEND = "aot_eager_decomp_partition"


@pytest.mark.parametrize("relu", [False, True], ids=["multiply", "with-relu"])
@pytest.mark.parametrize("rows", [5, 1], ids=["per-example", "per-batch"])
def test_keep_output_has_the_gradient_of_the_plain_product(relu, rows):
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    factor = (torch.rand(rows, 3, 1, 1, dtype=torch.float64) + 0.1).requires_grad_()

    def plain(x, factor):
        y = x * factor
        return torch.relu(y) if relu else y

    assert torch.autograd.gradcheck(lambda x, f: _KeepOutput.apply(x, f, relu), (x, factor))
    torch.testing.assert_close(_KeepOutput.apply(x, factor, relu), plain(x, factor))


def test_keep_output_gives_zero_where_the_factor_is_zero():
    """θ = 0 (a pruned unit, a hard-concrete draw clamped at 0) gets 0, not Σ g·x: nothing of it
    reaches the gate's parameters, whose derivative there is 0."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    factor = torch.tensor([[[0.5], [0.0], [2.0]]], dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    _KeepOutput.apply(x, factor, False).backward(g)
    expected = (g * x).sum((0, 2), keepdim=True)
    torch.testing.assert_close(factor.grad[:, [0, 2]], expected[:, [0, 2]])
    assert factor.grad[0, 1, 0] == 0


def assert_compiled_step_matches_eager(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str = BACKEND
) -> None:
    """The loss (cross-entropy + KL/100) and every gradient of ``net`` on ``(x, y)``, compiled
    with ``fullgraph=True`` and eager, from the same random state: equal to rounding."""

    def loss_fn(x, y):
        return F.cross_entropy(net(x), y) + cd.kl(net) / 100

    results = []
    for fn in (torch.compile(loss_fn, backend=backend, fullgraph=True), loss_fn):
        torch.manual_seed(5)
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0])
    for compiled, eager in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(compiled, eager)


def _kept_bytes(net: nn.Module, x: torch.Tensor, y: torch.Tensor, gated: bool) -> int:
    """Bytes the compiled step's graph keeps for backward, parameters left out."""
    torch._dynamo.reset()

    def loss_fn(x, y):
        loss = F.cross_entropy(net(x), y)
        return loss + cd.kl(net) / 100 if gated else loss

    fn = torch.compile(loss_fn, backend=BACKEND, fullgraph=True)
    fn(x, y).backward()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, y)
    loss.backward()
    torch._dynamo.reset()
    return sum(kept.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, noise", [("concrete", "example"), ("hardconcrete", "example"), ("lognormal", "batch")]
)
def test_compiled_lenet5_keeps_what_the_plain_one_keeps(family, noise):
    """Conv → ReLU → max-pool twice, then Linear → ReLU: before, the compiled graph kept each
    convolution's float output for the gradient of θ (2.2× the plain step's bytes). (The
    log-normal draw per example keeps float64 terms per example and unit of its own, 1.14× here:
    it is measured in BENCHMARKS.md §3, with one draw per mini-batch here.)"""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    plain = _kept_bytes(build_model("lenet5", input_shape=(1, 28, 28)).train(), x, y, False)
    net = cd.attach(
        build_model("lenet5", input_shape=(1, 28, 28)), gate=family, gate_kwargs={"noise": noise}
    ).train()
    assert _kept_bytes(net, x, y, True) <= 1.1 * plain


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lognormal", "variational", "hardconcrete"])
def test_compiled_mlp_with_batch_noise_keeps_what_the_plain_one_keeps(family):
    """Linear → ReLU: the gate applies the ReLU and keeps its output, which the next layer keeps
    anyway (before: the layer's output as well, 1.3× and more). One θ per mini-batch, so that
    what the draw itself keeps is per unit, not per example."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    plain = _kept_bytes(build_model("lenet300", input_shape=(1, 28, 28)).train(), x, y, False)
    net = cd.attach(
        build_model("lenet300", input_shape=(1, 28, 28)),
        gate=family,
        gate_kwargs={"noise": "batch"},
    ).train()
    assert _kept_bytes(net, x, y, True) <= 1.1 * plain


class _TinyResNet(nn.Module):
    """Two of compressdrop's basic blocks (the second downsamples): residual streams with shared
    gates, gated BatchNorms before the add, and a ReLU module after ``bn1``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


@pytest.mark.slow
def test_compiled_resnet_keeps_what_the_plain_one_keeps():
    """The gates before a residual add multiply as plain tensor code: a first version kept their
    output there too (y = x·θ for Σ g·y/θ), 1.14× the plain step's bytes on the
    ResNet-18-sized net where the graph had kept nothing of the gates' own (1.003×)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    plain = _kept_bytes(_TinyResNet().train(), x, y, False)
    example = torch.randn(2, 3, 16, 16)
    net = cd.attach(_TinyResNet(), gate="concrete", example_inputs=example).train()
    assert _kept_bytes(net, x, y, True) <= 1.05 * plain


class _Mixed(nn.Module):
    """Hand-offs of every kind beside ones that must not apply: ReLU6 (applied by its module,
    not the gate), LeakyReLU and an average pool (deferred), a gated layer read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 6, 3), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU6()
        )
        self.mlp = nn.Sequential(nn.Linear(8 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.convs(x).flatten(1))
        return self.head(F.relu(h) + h)


def test_compiled_step_matches_eager_with_every_kind_of_hand_off(gate_cls):
    torch.manual_seed(1)
    net = cd.attach(_Mixed(), gate=gate_cls.family, example_inputs=torch.randn(2, 1, 12, 12))
    net.train()
    x, y = torch.randn(5, 1, 12, 12), torch.randint(0, 10, (5,))
    assert_compiled_step_matches_eager(net, x, y)
    net.eval()  # then a compiled forward pass outside training: no hand-off, no mark left over
    torch.testing.assert_close(torch.compile(net, backend=BACKEND, fullgraph=True)(x), net(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
@pytest.mark.parametrize(
    "pool", [nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(3)], ids=["max", "adaptive"]
)
def test_compiled_relu_then_max_pool_runs_as_max_pool_then_relu(inplace, pool):
    """Compiled, a gated convolution's ReLU passes its input on and the max-pool's hook applies
    it after pooling (relu(maxpool(x))·θ, the same values; inductor's CPU code for the other
    order is 2.4× slower): the same loss and gradients as eager, for every family that defers."""
    for family in ("lognormal", "concrete", "hardconcrete"):
        torch.manual_seed(2)
        net = nn.Sequential(
            nn.Conv2d(1, 6, 3), nn.ReLU(inplace=inplace), pool, nn.Flatten(), nn.LazyLinear(10)
        )
        net(torch.randn(2, 1, 8, 8))
        net = cd.attach(net, gate=family, example_inputs=torch.randn(2, 1, 8, 8)).train()
        x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))

        assert_compiled_step_matches_eager(net, x, y)
        torch._dynamo.reset()


@pytest.mark.parametrize("dims", [1, 2])
def test_compiled_max_pool_with_a_window_of_padding_alone_keeps_its_minus_inf(dims):
    """padding=1, dilation=7 on a 6-wide map: the one window holds padding alone, -inf in plain
    PyTorch and eager; relu(maxpool(x)) would make it 0, so the ReLU stays before the pool."""
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if dims == 1 else (nn.Conv2d, nn.MaxPool2d)
    shape = (1,) + (8,) * dims
    torch.manual_seed(2)
    net = nn.Sequential(conv(1, 6, 3), nn.ReLU(), pool(2, stride=1, padding=1, dilation=7))
    net = nn.Sequential(*net, nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, *shape))
    net = cd.attach(net, gate="concrete", example_inputs=torch.randn(2, *shape)).train()
    x = torch.randn(3, *shape)
    torch.manual_seed(5)
    compiled = torch.compile(net, backend=BACKEND, fullgraph=True)(x)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled, net(x), equal_nan=True)
    torch._dynamo.reset()
