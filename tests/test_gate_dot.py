"""The gradient of θ as a batched matrix-vector product for large activations on CPU
(``compressdrop/gates/_dot.py``): the values of ``torch.linalg.vecdot`` to float32 rounding, in
the gate's own backward pass and in the fused BatchNorm's, and differentiable again."""

import copy

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.gates import _dot
from compressdrop.gates._dot import unit_dot

from .test_gate_batchnorm import _gated, _input, _same_as_apart, _step


@pytest.fixture
def bmm_always(monkeypatch):
    """The batched product at every size; yields the list of its calls."""
    calls: list = []
    bmm = torch.bmm
    monkeypatch.setattr(_dot, "BMM_BYTES", 0)
    monkeypatch.setattr(torch, "bmm", lambda *t: calls.append(t[0].shape) or bmm(*t))
    yield calls


def test_unit_dot_takes_the_batched_product_from_its_size_on(monkeypatch):
    a, b = torch.randn(4, 3, 50), torch.randn(4, 3, 50)
    expected = torch.linalg.vecdot(a, b)
    seen = []
    monkeypatch.setattr(torch, "bmm", lambda *t: seen.append(1) or torch.matmul(*t))
    torch.testing.assert_close(unit_dot(a, b), expected)
    assert not seen  # 2.4 kB: below 32 MB
    monkeypatch.setattr(_dot, "BMM_BYTES", a.numel() * 4)
    torch.testing.assert_close(unit_dot(a, b), expected)
    assert seen == [1]
    seen.clear()
    torch.testing.assert_close(unit_dot(a.transpose(0, 1).contiguous().transpose(0, 1), b),
                               expected)  # fmt: skip
    assert not seen  # not contiguous: vecdot, no copy


def test_unit_dot_is_differentiable_twice_either_way(bmm_always):
    a = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit_dot, (a, b))
    assert torch.autograd.gradgradcheck(unit_dot, (a, b))


@pytest.mark.parametrize("family", ["lognormal", "hardconcrete"])
def test_the_fused_batchnorm_gives_the_same_gradients_with_the_batched_product(family, bmm_always):
    net = _gated(2, family)
    _same_as_apart(net, _input(2))
    assert len(bmm_always) == 2  # the fused backward, and the gate's own with the fusion off


def test_the_fused_batchnorm_keeps_its_gradient_for_an_input_far_from_zero_mean():
    """Σ g·(x − mean) is taken as Σ g·x − mean·Σ g, which loses a factor |mean| / spread of
    float32's precision; at about 45 (here) the gradients still agree to 1e-4."""
    net = _gated(2)
    with torch.no_grad():
        net.layer.bias.add_(80.0 * net.layer.weight.flatten(1).norm(dim=1))
    _same_as_apart(net, _input(2))


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def test_a_gated_convolution_gets_the_same_gradients_with_the_batched_product(request):
    torch.manual_seed(0)
    net = cd.attach(_Conv(), "lognormal", example_inputs=torch.randn(2, 3, 8, 8)).train()
    other = copy.deepcopy(net)
    x = torch.randn(5, 3, 8, 8)
    _, grads, _, nodes = _step(net, x)
    calls = request.getfixturevalue("bmm_always")
    _, grads2, _, _ = _step(other, x)
    assert "_GateMulBackward" in nodes and calls == [(5 * 6, 1, 36)]
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], rtol=1e-5, atol=1e-7, msg=name)
