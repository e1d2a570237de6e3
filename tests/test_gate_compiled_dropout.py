"""In a compiled training step, the gated ``linear1`` of a PyTorch transformer layer leaves its
multiply to the dropout after its ReLU (``gates/_compiled.py``, ``read_by_dropout``). The loss and
gradients are the same as eager, and no MLP activation is kept beyond what the plain step keeps.
The multiply stays at the gate wherever moving it would change the function or what someone
sees: θ that may be negative (variational), a ReLU6, a hook on the dropout."""

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.gates import GATES, _compiled

from .test_gate_compiled import _kept_bytes, assert_compiled_step_matches_eager
from .test_gate_compiled_readers import _fresh  # noqa: F401 (autouse: dynamo reset)

# no decomposition: the dropout draws its random numbers as eager does (the decomposing backends
# draw them otherwise, so no step with a dropout would match eager there)
BACKEND = "aot_eager"
B, T, D, FF = 8, 16, 32, 64


class _Encoder(nn.Module):
    def __init__(self, activation: str | nn.Module = "relu") -> None:
        super().__init__()
        self.embed = nn.Linear(12, D)
        layer = nn.TransformerEncoderLayer(
            D, 4, FF, dropout=0.25, activation=activation, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _gated(family: str, activation: str | nn.Module = "relu") -> nn.Module:
    torch.manual_seed(0)
    net = _Encoder(activation)
    example = torch.randn(2, T, 12)
    # the MLP neurons (the stream passes through LayerNorm, the heads are not what is tested)
    return cd.attach(net, family, example_inputs=example, include="*.linear1").train()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(B, T, 12), torch.randint(0, 3, (B,))


@pytest.mark.parametrize("family", list(GATES))
def test_a_compiled_encoder_step_matches_eager_with_the_multiply_past_the_dropout(family):
    """(Whether the multiply moved shows in what the step keeps: the tests below.)"""
    net = _gated(family)
    assert_compiled_step_matches_eager(net, *_data(), backend=BACKEND)
    assert not _compiled._TRACE.deferred and _compiled._TRACE.next_dropout is None


def _extra_bytes(family: str) -> int:
    x, y = _data()
    plain = _kept_bytes(_Encoder().train(), x, y, gated=False)
    return _kept_bytes(_gated(family), x, y, gated=True) - plain


@pytest.mark.parametrize("family", ["lognormal", "concrete", "hardconcrete"])
def test_a_compiled_encoder_step_keeps_no_mlp_activation_of_its_own(family):
    """Before, the gate applied the ReLU and kept its output, beside the dropout's output that
    linear2 keeps: one (B, T, FF) activation more per layer. Now what the gates add is their
    per-example draws, a fraction of one activation."""
    activation = B * T * FF * 4
    assert _extra_bytes(family) < activation / 2


def test_variational_gates_keep_the_relus_output_as_before():
    """θ may be negative, so relu(x·θ) is not relu(x)·θ: the gate applies the ReLU and keeps its
    output, more than one activation (what every family kept before the move: 54–61 kB here,
    against 5–11 kB now for the others)."""
    assert _extra_bytes("variational") > B * T * FF * 4


def test_a_relu6_keeps_the_multiply_at_the_gate():
    """relu6(x·θ) is not relu6(x)·θ: moved past it, the step would not match eager."""
    net = _gated("lognormal", activation=nn.ReLU6())
    assert_compiled_step_matches_eager(net, *_data(), backend=BACKEND)


def test_a_hook_on_the_dropout_sees_what_it_saw_before():
    """A forward hook on the dropout sees its output as in eager mode: x·θ passed through the
    ReLU and the dropout, not the product without θ."""
    net = _gated("hardconcrete")
    seen: dict[str, list[torch.Tensor]] = {"compiled": [], "eager": []}
    mode = ["compiled"]
    layer = net.encoder.layers[0]
    layer.dropout.register_forward_hook(lambda m, a, out: seen[mode[0]].append(out.detach()))
    x, _ = _data()
    torch.manual_seed(3)
    torch.compile(net, backend=BACKEND, fullgraph=True)(x)
    mode[0] = "eager"
    torch.manual_seed(3)
    net(x)
    torch.testing.assert_close(seen["compiled"][0], seen["eager"][0])


def test_detach_removes_the_dropouts_hook():
    net = _gated("lognormal")
    dropouts = [layer.dropout for layer in net.encoder.layers]
    assert all(_compiled.dropout_takes_over in d._forward_hooks.values() for d in dropouts)
    cd.detach(net)
    assert not any(d._forward_hooks for d in dropouts)


def test_a_hook_on_the_gate_keeps_the_multiply_at_the_gate():
    """A forward hook on the gate module may change the gate's output (here a clamp, which
    commutes with the ReLU but not with θ): moved past the dropout, the multiply would come after
    the hook and the step would not match eager (before the move it did)."""
    net = _gated("hardconcrete")
    for layer in net.encoder.layers:
        layer.linear1.gate.register_forward_hook(lambda m, a, out: out.clamp(max=0.05))
    assert_compiled_step_matches_eager(net, *_data(), backend=BACKEND)
