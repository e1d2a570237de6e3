"""The gates of one family computed as one (compressdrop/gates/bank.py) change nothing but the
speed: the same draws, KL and gradients as gate by gate, step after step, also under activation
checkpointing; the per-step terms are computed once for all the gates; gates that cannot be
concatenated (other settings, a subclass with its own KL) are computed on their own."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import compressdrop as cd
from compressdrop.gates import GATES, LogNormalGate, VariationalGate, bank
from compressdrop.gates import lognormal as lognormal_module
from compressdrop.gating import GatingWarning
from compressdrop.models import build_model

from .test_gates import randomize_

BANKED = list(GATES.values())


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


@pytest.mark.parametrize("cls", BANKED, ids=lambda c: c.family)
def test_banked_steps_match_gate_by_gate_steps(cls):
    banked = _vit(cls.family)
    single = copy.deepcopy(banked)
    assert len(bank._banks([g for _, g in cd.named_gates(banked)])[0]) == 1  # one bank of 8
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (banked, single)]
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for seed in range(3):  # the banks must follow every parameter update
        a = _step(banked, opts[0], x, y, seed)
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


class _Checkpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 3)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.a, self.b):
            if self.reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_draws(reentrant):
    """A recomputed segment restores the random stream and must draw the θ of the first pass (a
    draw shared by the bank across segments was tried and failed exactly here)."""
    torch.manual_seed(0)
    model = cd.attach(_Checkpointed(), "lognormal", example_inputs=torch.randn(2, 8)).train()
    for _, g in cd.named_gates(model):
        randomize_(g)
    results = []
    for mode in (None, reentrant):
        model.reentrant = mode
        model.zero_grad()
        torch.manual_seed(1)
        x = torch.randn(5, 8, requires_grad=True)  # the reentrant variant needs an input with grad
        loss = model(x).square().mean() + cd.kl(model) / 100
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
