"""A BatchNorm and the gate after it run as one autograd function in eager training
(``compressdrop/gates/_bn.py``): the values, gradients and running statistics of the two apart,
no activation kept beyond what the plain BatchNorm keeps (a residual block's last BatchNorm kept
its output besides), and the unfused path wherever something could tell the difference."""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.gates import _bn

from .test_gate_memory import _resnets, _saved_bytes, _spread_and_prune_one

FUSED = "_GatedBatchNormBackward"


class _Net(nn.Module):
    """A layer, a BatchNorm, a tanh (no hand-off: nothing after the BatchNorm keeps what the gate
    needs), then a head; ``dims``: 0 for (B, C) features, else a conv of that many dimensions."""

    def __init__(self, dims: int, **bn) -> None:
        super().__init__()
        if dims == 0:
            self.layer, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8, **bn)
        else:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
            self.layer, self.bn = conv(3, 8, 3, padding=1), norm(8, **bn)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.bn(self.layer(x)))
        return self.head(y.flatten(2).mean(-1) if y.dim() > 2 else y)


def _input(dims: int, batch: int = 5) -> torch.Tensor:
    shape = (batch, 6) if dims == 0 else (batch, 3, *(5,) * dims)
    return 2 * torch.randn(shape) + 1  # a mean away from 0: the centring matters


def _gated(dims: int, family: str = "lognormal", noise: str = "example", **bn) -> nn.Module:
    torch.manual_seed(0)
    net = cd.attach(_Net(dims, **bn), family, example_inputs=_input(dims, 2),
                    gate_kwargs={"noise": noise})  # fmt: skip
    assert [n for n, _ in cd.named_gates(net)] == ["bn"]
    _spread_and_prune_one(net)  # θ = 0 exactly for one unit
    return net.train()


def _graph(out: torch.Tensor) -> set[str]:
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def _step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict, set[str]]:
    """Output, gradients (the input's too) and buffers after one step, and the graph's nodes."""
    x = x.clone().requires_grad_()
    torch.manual_seed(3)
    out = net(x)
    (out.square().sum() + cd.kl(net) / 50).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    net.zero_grad()
    return out.detach(), grads, {n: b.clone() for n, b in net.named_buffers()}, _graph(out)


def _same_as_apart(net: nn.Module, x: torch.Tensor) -> None:
    apart = copy.deepcopy(net)
    out, grads, buffers, nodes = _step(net, x)
    with _bn.off():
        out2, grads2, buffers2, nodes2 = _step(apart, x)
    assert FUSED in nodes and FUSED not in nodes2
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads2.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in buffers:  # running mean and variance, batches tracked
        torch.testing.assert_close(buffers[name], buffers2[name], msg=name)


@pytest.mark.parametrize("family", ["lognormal", "variational", "concrete", "hardconcrete"])
@pytest.mark.parametrize("noise", ["example", "batch"])
def test_the_fused_batchnorm_has_the_values_and_gradients_of_the_two_apart(family, noise):
    net = _gated(2, family, noise)
    for _ in range(2):  # the running statistics move the same way over steps
        _same_as_apart(net, _input(2))


@pytest.mark.parametrize("dims", [0, 1, 3])
@pytest.mark.parametrize(
    "bn",
    [{}, {"track_running_stats": False}, {"momentum": None}],
    ids=["default", "no-running-stats", "cumulative-average"],
)
def test_every_batchnorm_shape_and_setting_fuses_with_the_same_results(dims, bn):
    net = _gated(dims, **bn)
    for _ in range(2):
        _same_as_apart(net, _input(dims))


def test_a_frozen_batchnorm_fuses_with_the_same_gradients():
    net = _gated(2)
    for p in net.bn.module.parameters():
        p.requires_grad_(False)
    _same_as_apart(net, _input(2))
    _, grads, _, _ = _step(net, _input(2))
    assert "bn.module.weight" not in grads and "bn.gate.log_sigma" in grads


def test_a_residual_blocks_last_batchnorm_keeps_no_output_of_its_own():
    """The ResNets' BatchNorms that no ReLU takes over from (a block's last, whose output the
    shortcut is added to; the downsampling shortcut's; torchvision's stem) keep nothing beyond
    the plain ones: the gated step keeps the plain step's bytes plus the gates' own few per unit,
    and each of those BatchNorms' outputs more with the fusion off."""
    x = torch.randn(32, 3, 16, 16)
    for name, model in _resnets().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cd.GatingWarning)
            net = cd.attach(model, "lognormal", example_inputs=x[:2],
                            gate_kwargs={"noise": "batch"}).train()  # fmt: skip
        plain = cd.detach(copy.deepcopy(net)).train()
        fused = [
            n for n, m in net.named_modules()
            if type(m).__name__ == "Gated" and isinstance(m.module, nn.BatchNorm2d)
            and not vars(m).get("relu_after") and not vars(m).get("inplace_alone")
        ]  # fmt: skip
        assert fused, name
        outputs: list[int] = []  # bytes of those BatchNorms' outputs, from the plain twin

        def size(_m: nn.Module, _i: tuple, out: torch.Tensor, into: list = outputs) -> None:
            into.append(out.numel() * out.element_size())

        hooks = [plain.get_submodule(n).register_forward_hook(size) for n in fused]
        torch.manual_seed(1)
        alone = _saved_bytes(plain, x)
        for h in hooks:
            h.remove()
        torch.manual_seed(1)
        gated = _saved_bytes(net, x)
        # one θ per unit (noise="batch") and a few float64 terms of the posterior (16 at most),
        # and the BatchNorms' biases (parameters, which the plain BatchNorm does not keep)
        own = sum(16 * 8 * g.num_units for _, g in cd.named_gates(net))
        biases = sum(net.get_submodule(n).module.bias.nbytes for n in fused)
        assert alone < gated <= alone + own + biases, name
        with _bn.off():
            torch.manual_seed(1)
            assert _saved_bytes(net, x) >= gated + sum(outputs), name


@pytest.mark.parametrize(
    "how", ["hook on the BatchNorm", "hook on the gate", "eval", "hand-overs off", "no grad"]
)
def test_what_could_tell_the_difference_keeps_the_fusion_off(how):
    net, x = _gated(2), _input(2)
    contexts = {"hand-overs off": cd.gates.hand_overs_off, "no grad": torch.no_grad}
    context = contexts.get(how, torch.enable_grad)
    if how == "hook on the BatchNorm":
        net.bn.module.register_forward_hook(lambda *_: None)
    elif how == "hook on the gate":
        net.bn.gate.register_forward_pre_hook(lambda *_: None)
    elif how == "eval":
        net.bn.module.eval()
    with context():
        torch.manual_seed(3)
        out = net(x)
    assert out.grad_fn is None or FUSED not in _graph(out)
    with _bn.off(), context():
        torch.manual_seed(3)
        torch.testing.assert_close(out, net(x))


def test_one_value_per_channel_is_batchnorms_own_error():
    net = _gated(0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(_input(0, batch=1))


@pytest.mark.parametrize("noise", ["example", "batch"])
def test_a_second_derivative_through_the_fused_batchnorm_is_the_two_apart(noise):
    """A gradient penalty (``create_graph=True``) trains the same, fused or apart."""
    net = _gated(2, "hardconcrete", noise)
    apart = copy.deepcopy(net)
    x = _input(2)
    results = []
    for model, switch in ((net, contextlib.nullcontext), (apart, _bn.off)):
        xs = x.clone().requires_grad_()
        with switch():
            torch.manual_seed(3)
            out = model(xs)
            (g,) = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
            (g.square().sum() + out.sum()).backward()
        assert (FUSED in _graph(out)) == (model is net)
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6,
                                   msg=name)  # fmt: skip


def test_a_cross_entropy_step_trains_the_same_gates():
    """A few Adam steps of a gated net, fused and apart, end at the same parameters."""
    nets = [_gated(2, "hardconcrete"), _gated(2, "hardconcrete")]
    x, y = _input(2, 16), torch.randint(0, 4, (16,))
    for i, net in enumerate(nets):
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        torch.manual_seed(5)
        for _ in range(3):
            with _bn.off() if i else torch.enable_grad():
                loss = F.cross_entropy(net(x), y) + cd.kl(net) / 50
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), (_, b) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [0, 2])
def test_a_float32_batchnorm_on_a_half_precision_input_fuses_with_the_same_gradients(dims, dtype):
    """A half-precision net whose BatchNorms stay in float32 (its statistics kept exact, as the
    mixed-precision recipes do): the batch statistics are float32, the input and θ are not."""
    net = _gated(dims).to(dtype)
    net.bn.module.float()
    x = _input(dims).to(dtype)
    apart = copy.deepcopy(net)
    out, grads, buffers, nodes = _step(net, x)
    with _bn.off():
        out2, grads2, buffers2, _ = _step(apart, x)
    assert FUSED in nodes
    torch.testing.assert_close(out, out2)
    for name in grads2:
        torch.testing.assert_close(grads[name], grads2[name], rtol=2e-2, atol=2e-3, msg=name)
    for name in buffers2:
        torch.testing.assert_close(buffers[name], buffers2[name], msg=name)


@pytest.mark.parametrize("dropped", ["weight", "bias"])
def test_a_batchnorm_whose_weight_or_bias_was_dropped_runs_unfused(dropped):
    """An affine BatchNorm whose bias (or weight) was set to None after attach (folded into the
    next layer, say): ``F.batch_norm`` takes None for either, so the two apart run."""
    net, x = _gated(2), _input(2)
    setattr(net.bn.module, dropped, None)
    out, grads, _, nodes = _step(copy.deepcopy(net), x)
    with _bn.off():
        out2, grads2, _, _ = _step(net, x)
    assert FUSED not in nodes
    torch.testing.assert_close(out, out2)
    assert grads.keys() == grads2.keys()
