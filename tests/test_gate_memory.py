"""A gate followed by a ReLU keeps the ReLU's output for its backward pass, not its own input:
the same gradients as keeping the input, one activation-sized tensor fewer, loud on an in-place
change, and nothing of it left in a detached or pruned model."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gates import _proj
from compressdrop.gates._mul import (
    ATTR,
    RELUS,
    kept_tensors,
    relu_takes_over,
    remove_relu_hooks,
)
from compressdrop.gating.gated import Gated


def _net(relu: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), copy.deepcopy(relu),
        nn.Conv2d(8, 6, 3), copy.deepcopy(relu), nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )  # fmt: skip


def _spread_and_prune_one(net: nn.Module) -> None:
    """Spread every gate's parameters and prune its first unit (θ = 0 exactly for it)."""
    with torch.no_grad():
        for _, g in cd.named_gates(net):
            for p in g.parameters():
                p.add_(0.3 * torch.randn_like(p))
            g.pruned[0] = True


def _same_grads_as_keeping_inputs(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The gradients of a step equal those with every hand-off off (each gate keeps its input)."""
    a = _grads(net, x, y)
    with cd.gates.hand_overs_off():
        b = _grads(net, x, y)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


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


class _Encoder(nn.Module):
    """Two stock encoder layers (their MLPs' neurons gated) and a classifier."""

    def __init__(self, activation) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=24, dropout=0.1, activation=activation, batch_first=True
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


ACTIVATIONS = ["relu", "gelu", nn.GELU(), nn.ReLU()]


def _gated_encoder(family: str, activation) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream (LayerNorm)
        net = cd.attach(_Encoder(activation), family, granularity="neuron",
                        example_inputs=torch.randn(2, 5, 16))  # fmt: skip
    return net.train()


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["relu", "gelu", "GELU", "ReLU"])
def test_a_transformer_layer_mlp_hands_over_with_the_same_gradients(gate_cls, activation):
    """The gate of a stock transformer layer's linear1 multiplies in place and keeps the ReLU's
    output or (GELU) its own output, which GELU keeps: the gradients of keeping its input, a
    pruned unit (θ = 0) and dropout included."""
    net = _gated_encoder(gate_cls.family, activation)
    linear1 = net.enc.layers[0].linear1
    assert vars(linear1).get("gate_inplace") is True
    relu = activation in ("relu",) or isinstance(activation, nn.ReLU)
    assert vars(linear1).get("relu_after" if relu else "inplace_alone") is True
    _spread_and_prune_one(net)
    _same_grads_as_keeping_inputs(net, torch.randn(8, 5, 16), torch.randint(0, 3, (8,)))


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for one forward pass of ``net`` on ``x``,
    and those the gates keep beside it."""
    return sum(_saved_storages(net, x))


def _saved_storages(net: nn.Module, x: torch.Tensor) -> list[int]:
    """The sizes in bytes of the distinct storages :func:`_saved_bytes` counts."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    for t in kept_tensors(
        getattr(out, "logits", out)
    ):  # (a Hugging Face model's output)  # what the gates keep outside the hooks
        pack(t)
    return list(seen.values())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_transformer_layer_mlp_keeps_no_more_than_the_plain_layer(activation):
    """Gated by a family with θ > 0, the layers keep (for backward) the plain layers' bytes plus
    the gates' θ: the MLP's (B, T, U) activations once, not the layer output besides (1.14–1.20×
    for the encoder of BENCHMARKS §3 before)."""
    net = _gated_encoder("lognormal", activation)
    plain = cd.detach(copy.deepcopy(net)).train()
    x = torch.randn(64, 16, 16)  # a (B, T, U) activation: 64 bytes per example and unit
    torch.manual_seed(1)
    gated = _saved_bytes(net, x)
    torch.manual_seed(1)
    alone = _saved_bytes(plain, x)
    # per example and unit: θ, and the log-normal draw's float64 uniform and quantile; per
    # unit, a few float64 terms of the posterior (16 at most)
    draws = sum((64 * (4 + 16) + 16 * 8) * g.num_units for _, g in cd.named_gates(net))
    assert alone < gated <= alone + draws
    with cd.gates.hand_overs_off():
        torch.manual_seed(1)
        assert _saved_bytes(net, x) >= gated + 2 * 64 * 16 * 24 * 4  # each layer's (B, T, U)


def test_detach_gives_a_transformer_layer_its_own_activation_back():
    net = _gated_encoder("concrete", "relu")
    assert isinstance(net.enc.layers[0].activation, nn.ReLU)  # hooked while gated
    assert not any(n.endswith("activation") for n, _ in net.named_modules())  # no submodule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream (LayerNorm)
        decoder = cd.attach(
            nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, batch_first=True), "concrete",
            granularity="neuron", example_inputs=(torch.randn(2, 5, 16), torch.randn(2, 4, 16)),
        )  # fmt: skip
    for model in (decoder, copy.deepcopy(decoder), pickle.loads(pickle.dumps(decoder))):
        # TransformerDecoderLayer.__setstate__ put F.relu over a registered module (a review)
        assert isinstance(model.activation, nn.ReLU), model
        assert relu_takes_over in model.activation._forward_hooks.values()
    for model in (cd.detach(copy.deepcopy(net)), cd.prune(copy.deepcopy(net))):
        assert all(layer.activation is F.relu for layer in model.enc.layers)
        assert not any(n.endswith("activation") for n, _ in model.named_modules())
        assert not any(m._forward_hooks for m in model.modules())
        assert b"relu_takes_over" not in pickle.dumps(model)


class _Tokens(nn.Module):
    """A token MLP in an nn.Sequential (units last), as torchvision's ViT and ConvNeXt have."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 24), act, nn.Dropout(0.1), nn.Linear(24, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x).mean(1))


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU()], ids=["gelu", "silu"])
def test_a_gelu_after_a_gated_layer_in_a_sequential_shares_what_it_keeps(gate_cls, act):
    """A GELU or SiLU keeps its input for its own backward pass: the gated Linear before it
    multiplies in place and keeps that same tensor, with the gradients of keeping its input."""
    torch.manual_seed(0)
    net = cd.attach(_Tokens(act), gate_cls.family, granularity="neuron",
                    example_inputs=torch.randn(2, 5, 16)).train()  # fmt: skip
    assert vars(net.mlp[0]).get("inplace_alone") is True
    _spread_and_prune_one(net)
    x, y = torch.randn(8, 16, 16), torch.randint(0, 3, (8,))
    _same_grads_as_keeping_inputs(net, x, y)
    with cd.gates.hand_overs_off():
        torch.manual_seed(1)
        apart = _saved_bytes(net, x)
    torch.manual_seed(1)
    assert _saved_bytes(net, x) <= apart - 8 * 16 * 24 * 4  # the (B, T, U) output kept once
    # in place on the Linear's (B, T, U) output, a view: traced out of place (autograd's graph
    # would not lead back to the Linear), gated, and no hand-off: the SiLU changes what it keeps
    inplace_silu = cd.attach(_Tokens(nn.SiLU(inplace=True)), gate_cls.family, granularity="neuron",
                             example_inputs=torch.randn(2, 5, 16))  # fmt: skip
    assert [n for n, _ in cd.named_gates(inplace_silu)] == ["mlp.0", "mlp.3"]
    assert inplace_silu.mlp[1].inplace is True  # given back after tracing
    assert "inplace_alone" not in vars(inplace_silu.mlp[0])
    _spread_and_prune_one(inplace_silu)
    _same_grads_as_keeping_inputs(inplace_silu, x, y)
    snr = torch.cat([g.snr().detach() for _, g in cd.named_gates(inplace_silu)])
    slim = cd.prune(inplace_silu.eval(), threshold=float(snr.median()), example_inputs=x)
    assert slim.mlp[0].out_features < 24 and slim.mlp[1].inplace is True  # exact: prune checks


def _resnets() -> dict:
    from compressdrop.models import build_model

    from tests.torchvision_models import import_torchvision

    tv = import_torchvision()
    bottleneck = tv.models.resnet.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5)
    return {
        "compressdrop": build_model("resnet", input_shape=(3, 16, 16), num_classes=5),
        "torchvision-basic": tv.models.resnet18(num_classes=5),
        "torchvision-bottleneck": bottleneck,
    }


@pytest.mark.parametrize("name", ["compressdrop", "torchvision-basic", "torchvision-bottleneck"])
def test_a_resnet_blocks_relu_takes_over_with_the_same_gradients(name):
    """A ResNet block calls its ReLU module outside an nn.Sequential (torchvision's in place):
    the gated BN before it hands over as in a Sequential, with the gradients of keeping its
    input; the BN whose output the shortcut is added to (in place in torchvision) does not."""
    torch.manual_seed(0)
    net = _resnets()[name]
    x = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        net = cd.attach(net, "hardconcrete", example_inputs=x[:2]).train()
    blocks = [m for m in net.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    handed = ["bn1", "bn2"] if name.endswith("bottleneck") else ["bn1"]
    for block in blocks:
        for bn in ("bn1", "bn2", "bn3"):
            if isinstance(getattr(block, bn, None), Gated):
                assert vars(getattr(block, bn)).get("relu_after", False) == (bn in handed), bn
    _spread_and_prune_one(net)
    _same_grads_as_keeping_inputs(net, x, torch.randint(0, 5, (4,)))


def test_squeezenet_fire_convolutions_hand_over_to_their_relus_with_the_same_gradients():
    """SqueezeNet's Fire calls each convolution's own in-place ReLU module on its output alone:
    the gated convolutions hand over as in an nn.Sequential (they kept their outputs: 1.33× a
    plain step's bytes with per-batch noise), with the gradients of keeping their inputs."""
    from tests.torchvision_models import families

    build, side = families()["SqueezeNet"]
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side)
    net = cd.attach(build(), "concrete", example_inputs=x).train()
    fires = [m for m in net.modules() if type(m).__name__ == "Fire"]
    assert fires
    for fire in fires:
        for conv in ("squeeze", "expand1x1", "expand3x3"):
            assert vars(getattr(fire, conv)).get("relu_after") is True, conv
    _spread_and_prune_one(net)
    _same_grads_as_keeping_inputs(net, x, torch.randint(0, 10, (2,)))
    plain = cd.detach(copy.deepcopy(net)).train()
    torch.manual_seed(1)
    gated = _saved_bytes(net, x)
    with cd.gates.hand_overs_off():
        torch.manual_seed(1)
        apart = _saved_bytes(net, x)
    torch.manual_seed(1)
    alone = _saved_bytes(plain, x)
    assert gated - alone < (apart - alone) / 4


def test_a_resnet_block_pickled_before_its_relu_module_still_runs():
    from compressdrop.models import BasicBlock

    block = BasicBlock(4, 4).eval()
    del block.relu  # as an instance of the class before it had the module
    again = pickle.loads(pickle.dumps(block))
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(again(x), torch.relu(block.bn2(block.conv2(torch.relu(
        block.bn1(block.conv1(x))))) + x))  # fmt: skip


@pytest.mark.parametrize("where", ["wrapper", "global"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_hook_that_reads_the_gated_output_turns_the_hand_off_off(where, activation):
    """A forward hook on the gated wrapper, or a global one, is a second reader of the gated
    output (and, global, of the layer's output before an in-place multiply): the hand-off
    assumed one reader and lost the hook's share of the gradient (a review: 0.9 to 70 relative
    error on the gate's parameters). With such a hook the gate keeps its input."""
    net = _gated_encoder("lognormal", activation)
    _spread_and_prune_one(net)
    linear1 = net.enc.layers[0].linear1
    store: list[torch.Tensor] = []

    def keep(module, args, out):
        if module is linear1 or module is linear1.module:
            store.append(out)

    handle = (
        linear1.register_forward_hook(keep)
        if where == "wrapper"
        else nn.modules.module.register_module_forward_hook(keep)
    )
    try:
        x, y = torch.randn(8, 5, 16), torch.randint(0, 3, (8,))

        def grads() -> dict:
            torch.manual_seed(3)
            loss = F.cross_entropy(net(x), y) + sum((t**2).sum() for t in store) / 100
            store.clear()
            loss.backward()
            out = {n: p.grad.clone() for n, p in net.named_parameters()}
            net.zero_grad()
            return out

        a = grads()
        with cd.gates.hand_overs_off():
            b = grads()
    finally:
        handle.remove()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def _gated_vit(family: str) -> nn.Module:
    """The tiny ViT of BENCHMARKS §1 (4 layers of 4 heads), heads and MLP neurons gated."""
    from compressdrop.models import build_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream (LayerNorm)
        net = cd.attach(build_model("vit", input_shape=(1, 28, 28)), family,
                        example_inputs=torch.randn(2, 1, 28, 28))  # fmt: skip
    return net.train()


def test_a_head_gate_and_its_projection_keep_what_the_plain_projection_keeps(gate_cls):
    """A head gate and the output projection after it run as one function that keeps the
    attention's output and θ, not their product besides (BENCHMARKS §3: the ViT's log-normal step
    kept 1.13× the plain step's bytes), with the gradients of computing them apart, a pruned
    head (θ = 0) included."""
    net = _gated_vit(gate_cls.family)
    heads = [m for m in net.modules() if type(m).__name__ == "HeadGated"]
    assert len(heads) == 4
    _spread_and_prune_one(net)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    _same_grads_as_keeping_inputs(net, x, y)
    plain = cd.detach(copy.deepcopy(net)).train()

    def inputs_kept(model: nn.Module) -> int:  # storages of a projection input's size
        torch.manual_seed(1)
        return _saved_storages(model, x).count(8 * 17 * 64 * 4)  # 17 tokens of 64, float32

    gated = inputs_kept(net)
    assert gated == inputs_kept(plain) > 0
    with cd.gates.hand_overs_off():  # computed apart: each projection's input twice
        assert inputs_kept(net) == gated + len(heads)
    with _proj.off():  # the benchmark's switch for the fusion alone
        assert inputs_kept(net) == gated + len(heads)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["per-example", "per-batch"])
def test_the_fused_projection_has_the_derivatives_of_the_gate_then_the_projection(
    conv1d, per_batch
):
    """First and second derivatives of the fused head gate and projection against finite
    differences (float64), θ per example or (noise="batch") one per mini-batch; the values are
    those of multiplying, then projecting."""
    from compressdrop.gates._proj import _GatedLinear

    torch.manual_seed(0)
    B, T, H, D, out = 3, 4, 2, 3, 5
    x = torch.randn(B, T, H * D, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(1 if per_batch else B, H, dtype=torch.float64, requires_grad=True)
    shape = (H * D, out) if conv1d else (out, H * D)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True)

    def fused(*args):
        return _GatedLinear.apply(*args, conv1d)

    scaled = (x.unflatten(-1, (H, D)) * theta[:, None, :, None]).flatten(-2)
    expected = scaled @ w + b if conv1d else F.linear(scaled, w, b)
    torch.testing.assert_close(fused(x, theta, w, b), expected)
    assert torch.autograd.gradcheck(fused, (x, theta, w, b))
    assert torch.autograd.gradgradcheck(fused, (x, theta, w, b))


def test_a_hooked_projection_runs_as_it_is():
    """A hook on the output projection sees its input, the gated heads: the projection runs as
    a module then, not fused."""
    net = _gated_vit("lognormal")
    proj = next(m for m in net.modules() if type(m).__name__ == "HeadGated").module
    seen = []
    proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    assert seen == [(2, 17, 64)]


class _Attention(nn.Module):
    """One self-attention (its weights spelled out: no fused kernel) between two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.att(h, h, h, need_weights=True)[0])


def _gated_attention(family: str = "lognormal") -> tuple[nn.Module, nn.Module]:
    """The gated :class:`_Attention` in training mode, and its head-gated projection."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        net = cd.attach(_Attention(), family, example_inputs=torch.randn(2, 5, 8)).train()
    _spread_and_prune_one(net)
    (wrapper,) = [m for m in net.modules() if type(m).__name__ == "HeadGated"]
    return net, wrapper


def _fused_and_apart(net: nn.Module, run) -> None:
    """``run(net)`` (tensors) fused and with the fusion off: the same values."""
    torch.manual_seed(3)
    a = run(net)
    with _proj.off():
        torch.manual_seed(3)
        b = run(net)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def _value_and_grads(x: torch.Tensor):
    def run(net: nn.Module) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_()
        out = net(xs)
        params = [p for p in net.parameters() if p.requires_grad]
        return [out, *torch.autograd.grad(out.pow(2).mean(), [xs, *params])]

    return run


class _Clamped(cd.gates.LogNormalGate):
    """A family of one's own whose multiply is not the base class's."""

    def multiply(self, x, theta, dim=1, relu_after=False, inplace=False):
        return super().multiply(x, theta.clamp(max=0.5), dim, relu_after, inplace)


@pytest.mark.parametrize(
    "change", ["gate-hook", "gate-pre-hook", "backward-hook", "instance-forward", "multiply"]
)
def test_what_the_unfused_path_runs_keeps_the_fusion_off(change):
    """The fused projection calls neither the gate nor the projection as modules: a hook on
    either (forward or backward), a forward set on the projection instance (as accelerate's
    ``add_hook_to_module`` sets one) or a gate class with its own ``multiply`` runs unfused."""
    net, wrapper = _gated_attention()
    gate, proj = wrapper.gate, wrapper.module
    calls = []
    if change == "gate-hook":
        gate.register_forward_hook(lambda m, a, out: calls.append(1) or out * 0.5)
    elif change == "gate-pre-hook":
        gate.register_forward_pre_hook(lambda m, a: calls.append(1) or (a[0].clamp(max=0.1),))
    elif change == "backward-hook":
        proj.register_full_backward_hook(lambda m, gi, go: calls.append(1) or (gi[0] * 2,))
    elif change == "instance-forward":
        forward = proj.forward
        proj.forward = lambda t: calls.append(1) or forward(t.clamp(max=0.1))
    else:
        gate.__class__ = _Clamped  # nothing to count: the values tell
    _fused_and_apart(net, _value_and_grads(torch.randn(3, 7, 8)))
    assert change == "multiply" or len(calls) == 2  # once fused, once apart


@pytest.mark.parametrize("shape", [(0, 7, 8), (3, 0, 8)], ids=["no-examples", "no-tokens"])
def test_the_fused_projection_takes_an_empty_batch(shape):
    """An empty batch or sequence passes backward as it does unfused (no -1 to infer there)."""
    net, _ = _gated_attention()
    _fused_and_apart(net, _value_and_grads(torch.randn(*shape)))


@pytest.mark.parametrize("how", ["forward-ad", "torch.func", "batched-backward"])
def test_the_fused_projection_under_forward_ad_functorch_and_a_vectorized_backward(how):
    """Forward-mode AD and ``torch.func`` (``_GatedLinear`` has no ``jvp`` and no
    ``setup_context``) run unfused, and a vmapped backward pass (``is_grads_batched``,
    ``jacobian(vectorize=True)``) runs through the fused one, as they all did unfused."""
    import torch.autograd.forward_ad as fwAD

    net, _ = _gated_attention("concrete")  # its draws are tensor code: torch.func runs them
    x = torch.randn(2, 3, 8)

    def jvp(model: nn.Module) -> list[torch.Tensor]:
        with fwAD.dual_level():
            return [fwAD.unpack_dual(model(fwAD.make_dual(x, torch.ones_like(x)))).tangent]

    def func_grad(model: nn.Module) -> list[torch.Tensor]:
        params = {k: v.detach() for k, v in model.named_parameters()}
        loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
        return list(torch.func.grad(loss)(params).values())

    def batched(model: nn.Module) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_()
        out = model(xs)
        eye = torch.eye(out.numel()).view(-1, *out.shape)
        return list(torch.autograd.grad(out, xs, eye, is_grads_batched=True))

    runs = {"forward-ad": jvp, "torch.func": func_grad, "batched-backward": batched}
    _fused_and_apart(net, runs[how])


def test_a_frozen_gate_and_projection_keep_no_attention_output():
    """With neither θ nor the projection's weight trained, the fused function keeps no more than
    the two apart (θ for the input's gradient): the attention's output is not kept for nothing."""
    net, wrapper = _gated_attention()
    wrapper.gate.requires_grad_(False)
    wrapper.module.requires_grad_(False)
    x = torch.randn(16, 32, 8, requires_grad=True)

    def kept(model: nn.Module) -> int:
        torch.manual_seed(1)
        return _saved_storages(model, x).count(16 * 32 * 16 * 4)  # the (B, T, 16) float32 output

    fused = kept(net)
    with _proj.off():
        assert fused == kept(net)
