"""The fast paths of the gates change nothing but the speed: cached per-unit terms give the same
values and gradients as recomputing them, the training draws follow the closed forms, one draw
per mini-batch (noise="batch") broadcasts over the examples, and a gated training step compiles
with fullgraph=True for every family."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gates import ConcreteGate, Gate, LogNormalGate, noise_shard
from compressdrop.gates._mul import gate_multiply
from compressdrop.models import build_model

from .test_gate_compiled import assert_compiled_step_matches_eager
from .test_gates import UNITS, randomize_


def _no_cache(monkeypatch):
    monkeypatch.setattr(Gate, "_memo", lambda self, name, compute: compute())


def _step(gate: Gate, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    torch.manual_seed(seed)
    y = gate(x, dim=1)
    kl = gate.kl()
    ((y**2).mean() + kl).backward()
    grads = [p.grad.clone() for p in gate.parameters()]
    gate.zero_grad()
    return y.detach(), kl.detach(), grads


@pytest.mark.parametrize("shape", [(5, UNITS), (5, UNITS, 4, 3)], ids=["neuron", "channel"])
def test_cache_does_not_change_values_or_gradients(gate_cls, shape, monkeypatch):
    cached = randomize_(gate_cls(UNITS)).train()
    plain = copy.deepcopy(cached)
    opts = [torch.optim.SGD(g.parameters(), lr=0.1) for g in (cached, plain)]
    x = torch.randn(shape)
    for seed in range(3):  # three steps: the cache must follow every parameter update
        a = _step(cached, x, seed)
        with monkeypatch.context() as m:
            _no_cache(m)
            b = _step(plain, x, seed)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        # the shared terms sum the sample's and the KL's gradient before passing it on, the
        # uncached path sums them at the parameter: the same gradient up to float rounding
        for ga, gb in zip(a[2], b[2], strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
        for g, opt in zip((cached, plain), opts, strict=True):
            for p, gp in zip(g.parameters(), a[2] if g is cached else b[2], strict=True):
                p.grad = gp
            opt.step()
        with torch.no_grad():  # continue both from the same point
            for pa, pb in zip(cached.parameters(), plain.parameters(), strict=True):
                torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-9)
                pb.copy_(pa)


def test_terms_are_computed_once_per_step(gate_cls):
    g = randomize_(gate_cls(UNITS)).train()
    calls = []
    memo = g._memo

    def counting(name, compute):
        return memo(name, lambda: calls.append(name) or compute())

    g._memo = counting  # type: ignore[method-assign]
    for _ in range(2):
        y, kl = g(torch.randn(4, UNITS)), g.kl()
        assert len(calls) == len(set(calls)), calls  # nothing recomputed within the step
        (y.sum() + kl).backward()
        with torch.no_grad():
            for p in g.parameters():
                p.add_(0.01)
        calls.clear()


def test_cache_survives_gradient_accumulation_and_grad_mode_changes(gate_cls):
    g = randomize_(gate_cls(UNITS)).train()
    x = torch.randn(4, UNITS)
    torch.manual_seed(0)
    (g(x).sum() + g.kl()).backward()  # no optimizer step between the two micro-batches:
    torch.manual_seed(0)
    (g(x).sum() + g.kl()).backward()  # the freed graph of the first must not be reused
    grads = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    torch.manual_seed(0)
    (g(x).sum() + g.kl()).backward()
    for acc, one in zip(grads, g.parameters(), strict=True):
        torch.testing.assert_close(acc, 2 * one.grad)
    g.zero_grad()
    g.mask()  # terms computed under no_grad ...
    g.kl().backward()  # ... are not reused where a gradient is needed
    assert all(p.grad is not None and (p.grad != 0).any() for p in g.parameters())


def test_cache_follows_load_state_dict_to_and_copies(gate_cls):
    g = randomize_(gate_cls(UNITS))
    fresh = gate_cls(UNITS)
    before = g.snr().detach().clone()
    g.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(g.snr(), fresh.snr())
    g.load_state_dict(randomize_(gate_cls(UNITS)).state_dict())
    torch.testing.assert_close(g.snr(), before)
    g.train()(torch.randn(3, UNITS)).sum().backward()  # the cache now holds graphs
    for clone in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        torch.testing.assert_close(clone.kl(), g.kl())
    g64 = g.double()
    assert g64.kl().dtype == torch.float64 and g64.expected().dtype == torch.float64


def test_pruned_units_are_zero_in_both_modes_after_the_mask_changes(gate_cls):
    g = randomize_(gate_cls(UNITS))
    x = torch.ones(3, UNITS)
    assert (g.train()(x) != 0).all(dim=0).any()  # nothing pruned yet
    g.pruned[1::2] = True
    for mode in (g.train(), g.eval()):
        y = mode(x)
        assert (y[:, 1::2] == 0).all() and (y[:, 0::2] != 0).any()


def test_training_draws_follow_the_closed_forms(gate_cls):
    n = 200_000
    g = randomize_(gate_cls(UNITS))
    with torch.no_grad():
        s = g.sample(n).double()  # the training path, float32 where the family allows it
        mean, std = g.expected().double(), (g.expected() / g.snr()).double()
    stderr = s.std(0) / math.sqrt(n)
    if isinstance(g, ConcreteGate):  # the relaxation's mean is the Bernoulli's up to its bias
        assert ((s.mean(0) - mean).abs() < 0.05).all()
        return
    assert ((s.mean(0) - mean).abs() <= 5 * stderr + 1e-6).all(), (s.mean(0), mean)
    c = (s - s.mean(0)) ** 2
    std_err = c.std(0) / (2 * s.std(0) * math.sqrt(n))
    assert ((s.std(0) - std).abs() <= 5 * std_err + 1e-6).all(), (s.std(0), std)


def test_batch_noise_draws_one_factor_per_unit_and_batch(gate_cls):
    g = randomize_(gate_cls(UNITS, noise="batch")).train()
    assert "noise='batch'" in repr(g)
    for shape, dim in (((5, UNITS), 1), ((5, UNITS, 4, 3), 1)):
        y = g(torch.ones(shape), dim=dim)
        theta = y.movedim(dim, 1).reshape(shape[0], UNITS, -1)
        assert torch.equal(theta, theta[:1, :, :1].expand_as(theta))  # one θ for the batch
    a, b = g(torch.ones(5, UNITS)), g(torch.ones(5, UNITS))
    assert not torch.equal(a, b)  # a new draw per forward pass
    loss = (g(torch.randn(5, UNITS, 4, 3)) ** 2).sum() + g.kl()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and (p.grad != 0).any() for p in g.parameters())
    for rank in range(2):  # in a sharded run every rank draws the same θ
        torch.manual_seed(3)
        with noise_shard(rank, 2, 6):
            y = g(torch.ones(3, UNITS))
        torch.manual_seed(3)
        torch.testing.assert_close(y, g(torch.ones(3, UNITS)))


def test_batch_noise_through_attach_and_bad_values():
    net = cd.attach(
        build_model("lenet300", input_shape=(1, 8, 8)),
        gate="hardconcrete",
        gate_kwargs={"noise": "batch"},
    ).train()
    assert all(g.noise == "batch" for _, g in cd.named_gates(net))
    F.cross_entropy(net(torch.randn(7, 1, 8, 8)), torch.arange(7)).backward()
    with pytest.raises(InputError, match="noise"):
        LogNormalGate(3, noise="unit")


@pytest.mark.parametrize("rows", [5, 1], ids=["per-example", "per-batch"])
def test_gate_multiply_gradcheck(rows):
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(rows, 3, dtype=torch.float64, requires_grad=True)
    ref = x * theta.reshape(rows, 3, 1, 1)
    for inplace in (False, True):  # in place: the gate keeps x·θ and divides by θ

        def mul(x, theta, inplace=inplace):
            return gate_multiply(x * 1, theta, inplace, True)  # x * 1: a layer output, not a leaf

        assert torch.autograd.gradcheck(mul, (x, theta))
        torch.testing.assert_close(mul(x, theta), ref)


def _tiny_gated(family: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = cd.attach(build_model("lenet5", input_shape=(1, 12, 12)), gate=family).train()
    return net, torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))


def test_gated_loss_compiles_fullgraph_and_matches_eager(gate_cls):
    net, x, y = _tiny_gated(gate_cls.family)
    assert_compiled_step_matches_eager(net, x, y, backend="aot_eager")
    net.eval()
    torch.testing.assert_close(torch.compile(net, backend="aot_eager", fullgraph=True)(x), net(x))
    torch._dynamo.reset()


def test_gated_training_step_with_backward_traces_as_one_graph(gate_cls):
    net, x, y = _tiny_gated(gate_cls.family)

    def step(x, y):
        loss = F.cross_entropy(net(x), y) + cd.kl(net) / 100
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(step)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_gated_step_compiles_with_inductor(gate_cls):
    net, x, y = _tiny_gated(gate_cls.family)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.compile(
        lambda x, y: F.cross_entropy(net(x), y) + cd.kl(net) / 100, fullgraph=True
    )
    for _ in range(2):
        loss = loss_fn(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    torch._dynamo.reset()
