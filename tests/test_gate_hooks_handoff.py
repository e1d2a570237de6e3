"""A hook on a gate module (or a backward hook on its wrapper) turns the hand-offs off: the ReLU
taken into the gate (compiled), the multiply moved past a pool (eager and compiled) and the
in-place multiply would each let the hook see, or change, another tensor than the gate's output
x·θ (``compressdrop/gates/_compiled.py``, ``unseen``)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd

from .test_gate_compiled import assert_compiled_step_matches_eager
from .test_gate_compiled_readers import _fresh  # noqa: F401 (autouse: dynamo reset)

BACKEND = "aot_eager"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return cd.attach(net, gate="hardconcrete", example_inputs=torch.randn(2, 8)).train()


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    )
    return cd.attach(net, gate="lognormal", example_inputs=torch.randn(2, 1, 8, 8)).train()


def test_a_hook_that_changes_the_gates_output_runs_before_the_relu_compiled():
    """A shift does not commute with the ReLU: had the gate applied the ReLU itself, the hook
    would shift relu(x·θ) and the ReLU pass that on, where eager gives relu(x·θ − 0.1)."""
    net = _mlp()
    net[0].gate.register_forward_hook(lambda m, a, out: out - 0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    assert_compiled_step_matches_eager(net, x, y, backend=BACKEND)


def test_a_hook_on_a_deferred_gate_sees_the_convolutions_output_times_theta():
    """Eager: with the multiply moved past the pool the gate's forward would not run at the
    convolution at all; a hook on it sees what it saw without the move."""
    net = _lenet()
    seen: list[torch.Tensor] = []
    net[0].gate.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    x = torch.randn(5, 1, 8, 8)
    torch.manual_seed(3)
    out = net(x)
    reference = copy.deepcopy(net)
    with cd.gates.hand_overs_off():
        torch.manual_seed(3)
        expected = reference(x)
    assert len(seen) == 2 and seen[0].shape == (5, 4, 6, 6)
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(out, expected)


def test_a_full_backward_hook_on_the_wrapper_sees_the_gradient_of_its_output():
    """The gradient the hook sees is that of the gated layer's output x·θ, with the gates'
    parameter gradients those of the step without hand-offs."""
    grads: dict[str, list[torch.Tensor]] = {"as is": [], "off": []}
    mode = ["as is"]
    results = {}
    for name in ("as is", "off"):
        net = _mlp()
        net[0].register_full_backward_hook(lambda m, gi, go: grads[mode[0]].append(go[0].clone()))
        mode[0] = name
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = torch.arange(6) % 4
        torch.manual_seed(3)
        if name == "off":
            with cd.gates.hand_overs_off():
                loss = F.cross_entropy(net(x), y)
        else:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        results[name] = {n: p.grad.clone() for n, p in net.named_parameters()}
    torch.testing.assert_close(grads["as is"][0], grads["off"][0])
    for n in results["off"]:
        torch.testing.assert_close(results["as is"][n], results["off"][n], msg=n)
