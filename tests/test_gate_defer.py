"""A gated convolution followed by a ReLU and a pool in an nn.Sequential multiplies after the pool
in eager training (compressdrop/gates/_defer.py): the same outputs and gradients as multiplying
at the convolution, only where θ ≥ 0 and the pool provably runs, loud where it did not, and
nothing of it left after detach."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gates import GATES, _defer
from compressdrop.gating import gated as gated_mod
from compressdrop.gating.gated import Gated

NONNEGATIVE = [f for f, cls in GATES.items() if cls.nonnegative]


def _net(act: nn.Module | None, pool: nn.Module, dims: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    acts = [] if act is None else [copy.deepcopy(act)]
    return nn.Sequential(
        conv(3, 8, 3), *acts, pool, conv(8, 6, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    )


def _attach(family: str, net: nn.Module, x: torch.Tensor) -> nn.Module:
    net(x)  # materialize the lazy layer
    torch.manual_seed(0)
    net = cd.attach(net, gate=family, example_inputs=x[:2]).train()
    with torch.no_grad():  # spread the gates, prune one unit: θ = 0 exactly for it
        for g in {m.gate for m in net.modules() if isinstance(m, Gated)}:
            for p in g.parameters():
                p.add_(0.3 * torch.randn_like(p))
            g.pruned[0] = True
    return net


def _step(net: nn.Module, x: torch.Tensor, deferred: bool) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(3)
    with _defer.off() if not deferred else torch.enable_grad():
        out = net(x)
        (out.square().mean() + cd.kl(net) / 50).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    return out.detach(), grads


def _spy(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = gated_mod.defer

    def spy(layer, out):
        calls.append(real(layer, out))
        return calls[-1]

    monkeypatch.setattr(gated_mod, "defer", spy)
    return calls


POOLS = {
    "max": (nn.ReLU(), nn.MaxPool2d(2), 2),
    "max-ceil-padded": (nn.ReLU(), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), 2),
    "avg": (nn.ReLU(), nn.AvgPool2d(2), 2),
    "adaptive-avg": (nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(3), 2),
    "adaptive-max": (nn.LeakyReLU(0.1), nn.AdaptiveMaxPool2d(2), 2),
    "no-activation": (None, nn.MaxPool2d(2), 2),
    "conv1d": (nn.ReLU(), nn.MaxPool1d(2), 1),
}


@pytest.mark.parametrize("family", NONNEGATIVE)
@pytest.mark.parametrize("case", list(POOLS))
def test_multiplying_after_the_pool_keeps_outputs_and_gradients(family, case, monkeypatch):
    act, pool, dims = POOLS[case]
    net = _net(act, copy.deepcopy(pool), dims)
    x = torch.randn(16, 3, 8, 8) if dims == 2 else torch.randn(16, 3, 12)
    net = _attach(family, net, x)
    assert [i for i, _, _ in vars(net)[_defer.KEY]] == [0]
    calls = _spy(monkeypatch)
    out_a, a = _step(net, x, deferred=True)
    assert calls == [True]  # the first conv defers; the second has no pool after it
    out_b, b = _step(net, x, deferred=False)
    assert calls == [True, False]  # switched off: not armed
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gaussian_theta_is_never_deferred_in_eager_mode(monkeypatch):
    """ReLU(θx) ≠ θ·ReLU(x) for θ < 0: the variational gate multiplies at the convolution. Its
    max-pool is hooked all the same, for a compiled step, where it pools x·θ itself
    (``tests/test_gate_signed_pool.py``); an average pool is not."""
    x = torch.randn(4, 3, 8, 8)
    net = _attach("variational", _net(nn.ReLU(), nn.MaxPool2d(2)), x)
    assert not GATES["variational"].nonnegative
    calls = _spy(monkeypatch)
    net(x)
    assert calls == [False]
    assert any(_defer._apply in m._forward_hooks.values() for m in net.modules())
    net = _attach("variational", _net(nn.ReLU(), nn.AvgPool2d(2)), x)
    assert not any(_defer._apply in m._forward_hooks.values() for m in net.modules())


def test_a_gated_layer_called_outside_its_sequential_multiplies_at_once(monkeypatch):
    net = _net(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(8, 3, 8, 8)
    net = _attach("hardconcrete", net, x)
    calls = _spy(monkeypatch)
    conv = net[0].module
    for part in (net[0], net[:2]):  # the layer alone, and a slice without the pool
        out = part(x)
        ungated = conv(x) if part is net[0] else F.relu(conv(x))
        assert not torch.equal(out, ungated)
        assert (out[:, 0] == 0).all()  # the pruned unit is multiplied by 0 right there
    assert calls == [False, False]  # not armed: no pool is sure to run after it


def test_a_hook_of_the_users_between_sees_gated_values(monkeypatch):
    net = _net(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(8, 3, 8, 8)
    net = _attach("lognormal", net, x)
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    calls = _spy(monkeypatch)
    net(x)
    assert calls == [False] and (seen[0][:, 0] == 0).all()  # multiplied before the ReLU


def test_a_deferred_multiply_that_never_ran_raises(monkeypatch):
    net = _net(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(8, 3, 8, 8)
    net = _attach("concrete", net, x)
    pool = net[2]
    pool._forward_hooks.clear()  # the pool no longer applies it
    with pytest.raises(InputError, match="deferred its multiply to the pool"):
        net(x)
    assert "armed" not in vars(net[0]) and "pending" not in vars(net[0])
    pool.register_forward_hook(_defer._apply)
    calls = _spy(monkeypatch)

    def boom(x):
        raise RuntimeError("boom")

    net[1].forward = boom  # a forward pass that raises between the gated layer and the pool
    with pytest.raises(RuntimeError, match="boom"):
        net(x)
    assert calls == [True]
    assert "armed" not in vars(net[0]) and "pending" not in vars(net[0])  # disarmed all the same
    del net[1].forward
    out = net[0](x)  # called on its own afterwards: multiplies at once
    assert (out[:, 0] == 0).all() and calls == [True, False]


def test_eval_no_grad_and_detach():
    net = _net(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(8, 3, 8, 8)
    net = _attach("lognormal", net, x)
    with torch.no_grad():  # Monte-Carlo draws in training mode: deferred, the same function
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(1)
        with _defer.off():
            b = net(x)
    torch.testing.assert_close(a, b)
    cd.detach(net)
    ours = (_defer._arm, _defer._settle, _defer._pass_on, _defer._apply)
    for m in net.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        assert not any(fn in ours for fn in hooks)
        assert not {_defer.KEY, "defer_ok"} & set(vars(m))
    assert net(x).shape == (8, 5)


def _pool_net() -> nn.Sequential:
    """One gated convolution (then ReLU, pool); the last layer is the output, never gated."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(5)
    )


def _same_as_undeferred(net: nn.Module, x: torch.Tensor, monkeypatch, deferred: bool) -> None:
    calls = _spy(monkeypatch)
    out_a, a = _step(net, x, deferred=True)
    out_b, b = _step(net, x, deferred=False)
    assert calls[0] is deferred
    torch.testing.assert_close(out_a, out_b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_in_place_change_after_the_pool_is_allowed(monkeypatch):
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(5)
    )
    x = torch.randn(8, 3, 8, 8)
    _same_as_undeferred(_attach("lognormal", net, x), x, monkeypatch, deferred=True)


class _NormalizingConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.mul_(0.5))  # scales its input in place


@pytest.mark.parametrize("case", ["pre-hook", "subclass", "bypass"])
def test_a_layer_after_the_pool_that_may_change_it_in_place_gets_a_copy(case, monkeypatch):
    nxt = _NormalizingConv(8, 8, 1) if case == "subclass" else nn.Conv2d(8, 8, 1)
    act = nn.ReLU(inplace=True)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nxt, act, nn.Flatten())
    net.append(nn.LazyLinear(5))
    x = torch.randn(8, 3, 8, 8)
    net = _attach("lognormal", net, x)
    if case == "pre-hook":
        net[3].register_forward_pre_hook(lambda m, a: (a[0].clamp_(max=1.0),))
    if case == "bypass":  # an ablation: the layer's output replaced by its input
        net[3].register_forward_hook(lambda m, i, o: i[0])
    _same_as_undeferred(net, x, monkeypatch, deferred=True)


def test_second_derivatives_are_exact_or_refused(monkeypatch):
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    net = _attach("hardconcrete", _pool_net().double(), x.detach())

    def penalty(deferred: bool) -> torch.Tensor:  # ‖∂L/∂x‖², differentiated again
        torch.manual_seed(3)
        with cd.gates.hand_overs_off() if not deferred else torch.enable_grad():
            (gx,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad(gx.square().sum(), net[0].gate.log_alpha)
        return g2

    torch.testing.assert_close(penalty(True), penalty(False))
    assert penalty(True).abs().sum() > 0
    # the ReLU hand-off, and a pool multiplied in place (a convolution reads it next), keep no
    # input to differentiate again: an error that names the way out
    relu_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    pool_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 5, 3), nn.Flatten())
    for case in (relu_net, pool_net):
        case = _attach("hardconcrete", case.double(), x.detach())
        assert sum(isinstance(m, Gated) for m in case.modules()) == 1
        with pytest.raises(InputError, match="hand_overs_off"):  # at the first backward pass
            torch.autograd.grad(case(x).square().sum(), x, create_graph=True)
    with cd.gates.hand_overs_off():
        (gx,) = torch.autograd.grad(relu_net(x).square().sum(), x, create_graph=True)
    assert torch.autograd.grad(gx.square().sum(), relu_net[0].gate.log_alpha)[0].isfinite().all()


def test_a_swapped_activation_or_a_pool_across_channels_is_not_deferred(monkeypatch):
    x = torch.randn(8, 3, 8, 8)
    net = _attach("lognormal", _pool_net(), x)
    with torch.no_grad():
        net[0].module.weight.mul_(20)  # beyond ReLU6's cap
    net[1] = nn.ReLU6()  # swapped after attach: does not commute with θ
    _same_as_undeferred(net, x, monkeypatch, deferred=False)
    # a 2-d pool after a 1-d convolution pools across its channels
    net1d = nn.Sequential(
        nn.Conv1d(3, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d((3, 1), 1, (1, 0)),
        nn.Flatten(),
        nn.LazyLinear(5),
    )
    net1d = _attach("lognormal", net1d, torch.randn(8, 3, 12))
    assert _defer.KEY not in vars(net1d)


# dynamo's own warning when it traces a pool whose input requires grad (any model, gated or not)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_parts_global_hooks_and_threads(monkeypatch):
    x = torch.randn(8, 3, 8, 8)
    net = _attach("concrete", _pool_net(), x)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:  # a module-wide hook could read the gated layer's output
        _same_as_undeferred(net, x, monkeypatch, deferred=False)
    finally:
        handle.remove()
    for part in (0, 2):  # the gated layer or the pool compiled on its own
        net = _attach("concrete", _pool_net(), x)
        net[part].compile(backend="eager")
        monkeypatch.undo()
        _same_as_undeferred(net, x, monkeypatch, deferred=False)
    torch._dynamo.reset()
    net = _attach("concrete", _pool_net(), x)
    errors = []

    def draw() -> None:  # Monte-Carlo passes in training mode, two threads at once
        try:
            with torch.no_grad():
                for _ in range(200):
                    net(x[:2])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=draw) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_hand_overs_off_under_activation_checkpointing_covers_the_backward_pass():
    """The switch is read when a layer runs, and non-reentrant checkpointing runs the layers
    again during backward: with backward inside the context the gradients are those of the
    unsegmented run; outside it the recomputation hands over again, which PyTorch refuses (loud,
    never a wrong gradient)."""
    from torch.utils.checkpoint import CheckpointError, checkpoint

    x = torch.randn(6, 3, 8, 8)
    net = _attach("lognormal", _pool_net(), x)

    def grads(segmented: bool, backward_inside: bool = True) -> dict[str, torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(5)
        with cd.gates.hand_overs_off():
            out = checkpoint(net, x, use_reentrant=False) if segmented else net(x)
            loss = out.square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, segmented = grads(False), grads(True)
    assert plain.keys() == segmented.keys() and any("gate" in n for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(segmented[name], g, msg=name)
    with pytest.raises(CheckpointError):
        grads(True, backward_inside=False)
