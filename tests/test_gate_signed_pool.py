"""A compiled step's gated convolution before a max-pool with θ of either sign (the variational
family's): the pool takes x·θ itself as one autograd function that keeps what the plain graph
keeps (``compressdrop/gates/_signed_pool.py``). Its gradients, the compiled step against eager,
the bytes kept, and where it does not apply."""

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.gates._signed_pool import SignedMaxPool
from compressdrop.models import build_model

from .test_gate_compiled import _kept_bytes, assert_compiled_step_matches_eager
from .test_gate_compiled_readers import _fresh  # noqa: F401 (autouse: dynamo reset)

POOLS = {
    "max2d": (nn.MaxPool2d(2), 2),
    "overlapping": (nn.MaxPool2d(3, stride=1), 2),
    "ceil": (nn.MaxPool2d(2, ceil_mode=True), 2),
    "adaptive": (nn.AdaptiveMaxPool2d(3), 2),
    "max1d": (nn.MaxPool1d(2), 1),
    "max3d": (nn.MaxPool3d(2), 3),
}


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("rows", [4, 1], ids=["per-example", "per-batch"])
@pytest.mark.parametrize("name", list(POOLS))
def test_signed_max_pool_is_the_pool_of_the_product_with_its_gradients(name, rows, relu):
    pool, dims = POOLS[name]
    x = torch.randn(4, 3, *(5,) * dims, dtype=torch.float64, requires_grad=True)
    factor = torch.randn(rows, 3, *(1,) * dims, dtype=torch.float64)  # either sign
    factor = factor.requires_grad_()

    def plain(x, factor):
        y = pool(x * factor)
        return torch.relu(y) if relu else y

    def fused(x, factor):
        return SignedMaxPool.apply(x, factor, pool, relu)

    torch.testing.assert_close(fused(x, factor), plain(x, factor))
    assert torch.autograd.gradcheck(fused, (x, factor))


def test_a_zero_factor_gets_a_zero_gradient():
    """θ = 0 (a pruned unit): its parameters' derivative is 0 there, as the gate multiply gives."""
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    factor = torch.tensor([[[[0.0]], [[-1.5]]]], dtype=torch.float64, requires_grad=True)
    SignedMaxPool.apply(x, factor, nn.MaxPool2d(2), True).sum().backward()
    assert factor.grad[0, 0, 0, 0] == 0 and factor.grad[0, 1, 0, 0] != 0


def _net(pool: nn.Module, act: nn.Module | None, dims: int = 2) -> tuple[nn.Module, tuple]:
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
    shape = (1,) + (8,) * dims
    torch.manual_seed(2)
    layers = [conv(1, 6, 3), *([act] if act is not None else []), pool, nn.Flatten()]
    net = nn.Sequential(*layers, nn.LazyLinear(4))
    net(torch.randn(2, *shape))
    net = cd.attach(net, gate="variational", example_inputs=torch.randn(2, *shape)).train()
    return net, shape


@pytest.mark.parametrize(
    "pool, act",
    [
        (nn.MaxPool2d(2), nn.ReLU()),
        (nn.MaxPool2d(2), nn.ReLU(inplace=True)),
        (nn.AdaptiveMaxPool2d(3), nn.ReLU()),
        (nn.MaxPool2d(3, stride=2), None),
        # not pooled with θ: an average pool, a LeakyReLU
        (nn.AvgPool2d(2), nn.ReLU()),
        (nn.MaxPool2d(2), nn.LeakyReLU()),
    ],
    ids=["relu", "relu-inplace", "adaptive", "no-activation", "avg", "leaky"],
)
def test_a_compiled_variational_step_matches_eager(pool, act):
    net, shape = _net(pool, act)
    x, y = torch.randn(5, *shape), torch.randint(0, 4, (5,))
    assert_compiled_step_matches_eager(net, x, y)


def test_a_window_of_padding_alone_keeps_its_minus_inf():
    """padding=1, dilation=7 on an 8-wide map (after a 3-wide convolution): one window holds
    padding alone, -inf; relu after the pool would make it 0, so the ReLU stays before it."""
    net, shape = _net(nn.MaxPool2d(2, stride=1, padding=1, dilation=7), nn.ReLU())
    x = torch.randn(5, *shape)
    torch.manual_seed(3)
    compiled = torch.compile(net, backend="aot_eager_decomp_partition", fullgraph=True)(x)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled, net(x), equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["example", "batch"])
def test_a_compiled_variational_lenet5_keeps_what_the_plain_one_keeps(noise):
    """Before, the compiled graph kept each convolution's float output for the gradient of θ:
    2.1–2.2× the plain step's bytes (BENCHMARKS.md §3); now 0.63–0.68×, as the other families."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    plain = _kept_bytes(build_model("lenet5", input_shape=(1, 28, 28)).train(), x, y, False)
    net = cd.attach(
        build_model("lenet5", input_shape=(1, 28, 28)), "variational", gate_kwargs={"noise": noise}
    ).train()
    assert_compiled_step_matches_eager(net, x, y)
    assert _kept_bytes(net, x, y, True) <= 0.8 * plain
