"""The gates of one family computed as one (compressdrop/gates/bank.py) change nothing but the
speed: with the same noise, the same outputs, KL and gradients as gate by gate, step after step;
a bank's draw gives each gate the draw its own formula gives for those uniforms; the per-step
terms are computed once for all the gates; a gate takes the bank's draw once per pass and never
after a backward pass through it; gates that cannot be concatenated (other settings, a subclass
with its own KL) are computed on their own."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import compressdrop as cd
from compressdrop.gates import GATES, LogNormalGate, VariationalGate, bank
from compressdrop.gates import lognormal as lognormal_module
from compressdrop.gating import GatingWarning
from compressdrop.models import build_model

from .test_gates import randomize_

BANKED = list(GATES.values())
# the noise each family's sample() draws: (function, dtype)
NOISE = {
    "lognormal": (torch.rand, torch.float64),
    "variational": (torch.randn, torch.float32),
    "concrete": (torch.rand, torch.float32),
    "hardconcrete": (torch.rand, torch.float32),
}


def _vit(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vit", input_shape=(1, 8, 8), num_classes=3)
    with warnings.catch_warnings():  # the last layer's MLP output feeds a LayerNorm: ungated
        warnings.simplefilter("ignore", GatingWarning)
        model = cd.attach(model, family, example_inputs=torch.randn(2, 1, 8, 8), kl_cost="flops")
    for _, g in cd.named_gates(model):
        randomize_(g)
    return model.train()


def _step(model, opt, x, y, seed):
    torch.manual_seed(seed)
    out = model(x)
    kl = cd.kl(model)
    opt.zero_grad()
    (F.cross_entropy(out, y) + kl / 100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return out.detach(), kl.detach(), grads


def _fixed_noise(m: pytest.MonkeyPatch, step: int) -> None:
    """Uniforms and normals that depend on nothing but the step: the same noise for a bank's
    draw and for each gate's own (the draws themselves are compared below)."""
    u, z = 0.2 + 0.6 * (step % 3) / 2, 0.5 * (step - 1)
    m.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, u, **kw))
    m.setattr(torch, "randn", lambda *shape, **kw: torch.full(shape, z, **kw))


@pytest.mark.parametrize("cls", BANKED, ids=lambda c: c.family)
def test_banked_steps_match_gate_by_gate_steps(cls, monkeypatch):
    banked = _vit(cls.family)
    single = copy.deepcopy(banked)
    assert len(bank._banks([g for _, g in cd.named_gates(banked)])[0]) == 1  # one bank of 8
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (banked, single)]
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for seed in range(3):  # the banks must follow every parameter update
        with monkeypatch.context() as m:
            _fixed_noise(m, seed)
            a = _step(banked, opts[0], x, y, seed)
        with monkeypatch.context() as m:
            _fixed_noise(m, seed)
            with bank.off():
                b = _step(single, opts[1], x, y, seed)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # the same draws
        # one dot product against a sum of per-gate ones: float32 rounding apart
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=0)
        for ga, gb in zip(a[2], b[2], strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
        for pa, pb in zip(banked.parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_the_step_terms_of_every_lognormal_gate_are_computed_once_a_step(monkeypatch):
    model = _vit("lognormal")
    calls = []
    real = lognormal_module.step_terms

    def counting(mu, *a, **k):
        calls.append(mu.numel())
        return real(mu, *a, **k)

    monkeypatch.setattr(lognormal_module, "step_terms", counting)
    n_gates = len(list(cd.named_gates(model)))
    total = sum(g.num_units for _, g in cd.named_gates(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    for seed in range(2):
        calls.clear()
        _step(model, opt, x, y, seed)
        assert calls == [total], (n_gates, calls)  # once, for all the units
    with torch.no_grad():  # eval mode primes nothing and draws nothing
        calls.clear()
        model.eval()(x)
        assert calls == []


def test_gates_that_differ_are_not_concatenated():
    torch.manual_seed(0)
    a, b = randomize_(LogNormalGate(5)), randomize_(LogNormalGate(7, low=-10.0))
    c = randomize_(VariationalGate(4))
    d = randomize_(VariationalGate(3)).double()

    class Doubled(LogNormalGate):  # a subclass with its own KL is never banked
        def kl_per_unit(self) -> torch.Tensor:
            return 2 * super().kl_per_unit()

    e, f = randomize_(Doubled(4)), randomize_(Doubled(6))
    gates = [a, b, c, d, e, f]
    banks, single = bank._banks(gates)
    assert banks == [] and sorted(map(id, single)) == sorted(map(id, gates))
    expected = sum(g.kl().double() for g in gates)
    torch.testing.assert_close(bank.kl_sum(gates).double(), expected, rtol=1e-6, atol=0)


def test_a_bank_follows_in_place_updates_and_new_parameters():
    torch.manual_seed(0)
    gates = [randomize_(LogNormalGate(n)) for n in (3, 5, 8)]
    first = bank.kl_sum(gates)
    with torch.no_grad():
        gates[1].mu.add_(0.3)  # an optimizer step: the version changes
    second = bank.kl_sum(gates)
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, sum(g.kl() for g in gates), rtol=1e-6, atol=0)
    gates[2].log_sigma = torch.nn.Parameter(gates[2].log_sigma.detach() - 1.0)  # a new object
    torch.testing.assert_close(bank.kl_sum(gates), sum(g.kl() for g in gates), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", BANKED, ids=lambda c: c.family)
def test_a_bank_draw_gives_each_gate_its_own_formula_for_its_columns(cls):
    torch.manual_seed(0)
    gates = [randomize_(cls(n)) for n in (3, 5, 8)]
    weights = [torch.randn(4, g.num_units) for g in gates]
    torch.manual_seed(1)
    draws = bank._Draws(gates)
    thetas = [draws.take(g, i, 4) for i, g in enumerate(gates)]
    sum((w * t).sum() for w, t in zip(weights, thetas, strict=True)).backward()
    banked = [p.grad.clone() for g in gates for p in g.parameters()]
    for g in gates:
        g.zero_grad()
        g.clear_cache()
    torch.manual_seed(1)  # the same noise, split by columns, through each gate's own sample()
    real, dtype = NOISE[cls.family]
    cols = real(4, 16, dtype=dtype).split([3, 5, 8], dim=1)
    alone = []
    for g, c in zip(gates, cols, strict=True):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch, real.__name__, lambda *shape, c=c, **kw: c.clone())
            alone.append(g.sample(4))
    for t, a in zip(thetas, alone, strict=True):
        # element-wise code on a longer row: the vectorized loop and its scalar tail may round a
        # transcendental function apart by one unit in the last place (seen: hard concrete)
        torch.testing.assert_close(t, a, rtol=2**-22, atol=0)
    sum((w * t).sum() for w, t in zip(weights, alone, strict=True)).backward()
    for ga, gb in zip(banked, [p.grad for g in gates for p in g.parameters()], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


def test_a_gate_takes_the_bank_draw_once_a_pass_and_never_after_a_backward():
    torch.manual_seed(0)
    gates = [randomize_(LogNormalGate(n)).train() for n in (4, 6)]
    bank.prime(gates)
    x = torch.ones(3, 4)
    first, again = gates[0](x), gates[0](x)  # the second call of the pass draws on its own
    assert not torch.equal(first, again)
    first.sum().backward()  # spends the bank's draw (its graph is freed)
    y = gates[1](torch.ones(3, 6))  # a later take falls back to the gate's own draw
    y.sum().backward()
    assert gates[1].mu.grad is not None
    clone = copy.deepcopy(gates[0])  # a slot is not copied (nor pickled)
    assert clone._bank_slot is None and gates[0]._bank_slot is not None


def test_a_bank_draw_is_not_reused_after_the_parameters_change():
    torch.manual_seed(0)
    gates = [randomize_(VariationalGate(n)).train() for n in (4, 6)]
    bank.prime(gates)
    gates[0](torch.ones(2, 4))
    with torch.no_grad():
        gates[1].mu.mul_(3.0)  # an optimizer step between the bank's draw and this gate's take
    slot = gates[1]._bank_slot
    assert slot is not None and slot[0].take(gates[1], 1, 2) is None
