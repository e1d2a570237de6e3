"""A gate followed by a ReLU keeps the ReLU's output for its backward pass, not its own input:
the same gradients as keeping the input, one activation-sized tensor fewer, loud on an in-place
change, and nothing of it left in a detached or pruned model."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gates._mul import ATTR, RELUS, relu_takes_over, remove_relu_hooks
from compressdrop.gating.gated import Gated


def _net(relu: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), copy.deepcopy(relu),
        nn.Conv2d(8, 6, 3), copy.deepcopy(relu), nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )  # fmt: skip


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    (F.cross_entropy(net(x), y) + cd.kl(net) / 50).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return grads


@pytest.mark.parametrize(
    "relu", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()], ids=["relu", "inplace", "relu6"]
)
def test_handing_over_to_the_relu_keeps_the_gradients(gate_cls, relu):
    torch.manual_seed(0)
    net = cd.attach(_net(relu), gate=gate_cls.family, example_inputs=torch.randn(2, 3, 8, 8))
    net.train()
    hooked = [m for m in net.modules() if relu_takes_over in m._forward_hooks.values()]
    assert len(hooked) == 2 and all(type(m) in RELUS for m in hooked)
    assert [m.__dict__.get("gate_inplace") for m in net.modules() if isinstance(m, Gated)] == [
        True,
        True,
    ]
    plain = copy.deepcopy(net)
    remove_relu_hooks(plain)  # the gates keep their inputs, multiplied out of place
    with torch.no_grad():  # spread the gates, prune one unit: θ = 0 exactly for it
        for g in [m.gate for m in net.modules() if isinstance(m, Gated)]:
            for p in g.parameters():
                p.add_(0.3 * torch.randn_like(p))
            g.pruned[0] = True
        plain.load_state_dict(net.state_dict())
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    a, b = _grads(net, x, y), _grads(plain, x, y)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_gate_keeps_the_relu_output_not_the_layer_output():
    net = cd.attach(_net(nn.ReLU()), gate="lognormal", example_inputs=torch.randn(2, 3, 8, 8))
    net.train()
    outputs = {}
    net[2].register_forward_hook(lambda m, i, o: outputs.setdefault("relu", o))
    y = net[1](net[0](torch.randn(4, 3, 8, 8)))  # conv → gated BN: the gate multiplied in place
    kept = y.grad_fn.kept
    assert kept.divide and kept.tensor.data_ptr() == y.data_ptr()
    r = net[2](y)
    assert kept.tensor.data_ptr() == outputs["relu"].data_ptr() == r.data_ptr()
    assert not hasattr(y, ATTR)  # handed over once, no reference cycle left on the tensor
    r.sum().backward()


def test_an_inplace_change_after_the_gate_is_an_error_not_a_wrong_gradient():
    net = cd.attach(_net(nn.ReLU()), gate="concrete", example_inputs=torch.randn(2, 3, 8, 8))
    net.train()
    x = torch.randn(4, 3, 8, 8)
    r = net[2](net[1](net[0](x)))
    out = r.clone()
    r.mul_(2)  # changes the tensor the gate (and the ReLU) kept
    with pytest.raises(RuntimeError, match=r"in-?place"):
        out.sum().backward()
    y = net[1](net[0](x))  # the gate's own output, kept until a ReLU takes over
    out = y.clone()
    y.mul_(2)
    with pytest.raises(InputError, match=r"compressdrop: .* in-place"):
        out.sum().backward()


def test_only_a_relu_right_after_a_gated_layer_is_hooked():
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )  # fmt: skip
    net = cd.attach(seq, gate="concrete", example_inputs=torch.randn(2, 3, 8, 8))
    hooked = [type(m) for m in net.modules() if relu_takes_over in m._forward_hooks.values()]
    assert hooked == [nn.ReLU]  # the GELU after the first conv is not (its derivative is not 0/1)


def test_detach_and_prune_leave_no_hook_behind():
    net = cd.attach(_net(nn.ReLU()), gate="hardconcrete", example_inputs=torch.randn(2, 3, 8, 8))
    slim = cd.prune(copy.deepcopy(net))
    for model in (slim, cd.detach(copy.deepcopy(net))):
        assert not any(m._forward_hooks for m in model.modules())
        assert not any("gate_inplace" in vars(m) for m in model.modules())
        assert b"relu_takes_over" not in pickle.dumps(model)


def test_a_layer_output_that_a_hook_saw_is_not_changed_in_place():
    net = cd.attach(_net(nn.ReLU()), gate="lognormal", example_inputs=torch.randn(2, 3, 8, 8))
    net.train()
    seen = []
    net[1].module.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    out, copy_at_the_time = seen[0]
    torch.testing.assert_close(out, copy_at_the_time, rtol=0, atol=0)


def test_torchvision_mobilenet_inplace_relu6_hands_over_with_the_same_gradients():
    from tests.torchvision_models import import_torchvision

    tv = import_torchvision()
    x = torch.randn(4, 3, 32, 32)
    net = cd.attach(tv.models.mobilenet_v2(num_classes=5, width_mult=0.25), example_inputs=x[:2])
    net.train()
    hooked = [m for m in net.modules() if relu_takes_over in m._forward_hooks.values()]
    assert len(hooked) > 10 and all(isinstance(m, nn.ReLU6) and m.inplace for m in hooked)
    plain = copy.deepcopy(net)
    remove_relu_hooks(plain)
    y = torch.randint(0, 5, (4,))
    a, b = _grads(net, x, y), _grads(plain, x, y)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_output_no_hooked_relu_reads_holds_nothing_of_the_gate():
    net = cd.attach(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)),
        gate="concrete",
        example_inputs=torch.randn(2, 3, 8, 8),
    ).train()
    y = net[0](torch.randn(4, 3, 8, 8))  # kept by a user, say: it must not keep x alive too
    assert not hasattr(y, ATTR)
