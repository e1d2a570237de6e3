"""A gate shared by several sites (a residual stream): one θ per forward pass at every site, and
the same gradients under activation checkpointing as without it (compressdrop/gates/_replay.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import compressdrop as cd
from compressdrop.gates import GATES


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class _Residual(nn.Module):
    """A stem and two residual blocks on one stream of 8 channels: one gate, three sites.
    ``segments`` says what runs checkpointed: the blocks one by one, or the stem with the first
    block (the shared gate's first site inside a segment)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1, self.b2 = _Block(8), _Block(8)
        self.fc = nn.Linear(8, 3)
        self.reentrant: bool | None = None  # None: no checkpointing
        self.segments = "blocks"

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return fn(x)
        return checkpoint(fn, x, use_reentrant=self.reentrant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.segments == "blocks":
            x = self._run(self.b2, self._run(self.b1, self.stem(x)))
        else:
            x = self.b2(self._run(lambda t: self.b1(self.stem(t)), x))
        return self.fc(x.mean((2, 3)))


def _gated(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = cd.attach(_Residual(), family, example_inputs=torch.randn(2, 1, 6, 6)).train()
    shared = [g for _, g in cd.named_gates(model) if g.shared]
    assert len(shared) == 1 and len(list(cd.gating.sites(model))) >= 3
    return model


def _draws_of(gate) -> list[torch.Tensor]:
    """Record every θ ``gate`` hands a site (an instance attribute over the method)."""
    draws: list[torch.Tensor] = []
    method = gate._training_sample

    def record(batch: int) -> torch.Tensor:
        theta = method(batch)
        draws.append(theta.detach().clone())
        return theta

    gate._training_sample = record
    return draws


@pytest.mark.parametrize("family", sorted(GATES))
def test_every_site_sees_one_draw_per_forward_and_the_next_forward_a_new_one(family):
    model = _gated(family)
    gate = next(g for _, g in cd.named_gates(model) if g.shared)
    draws = _draws_of(gate)
    x = torch.randn(4, 1, 6, 6)
    state = torch.get_rng_state()
    model(x)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.randint(0, 2**62, (1,))  # the pass's seed: all the global stream gave (one gate here)
    assert torch.equal(torch.get_rng_state(), after)
    first = list(draws)
    assert len(first) == 3 and all(torch.equal(d, first[0]) for d in first)
    model(x)
    assert all(torch.equal(d, draws[3]) for d in draws[3:]) and not torch.equal(draws[3], first[0])


@pytest.mark.parametrize("segments", ["blocks", "stem and first block"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["lognormal", "hardconcrete"])
def test_checkpointing_gives_the_gradients_of_the_plain_run(family, reentrant, segments):
    """Before, a shared θ drawn once was reused across segments: with the first site inside a
    segment the non-reentrant variant raised CheckpointError and the reentrant one left the gate
    without a gradient; with it outside, the reentrant one raised (a graph freed twice)."""
    model = _gated(family)
    model.segments = segments
    results = []
    for mode in (None, reentrant):
        model.reentrant = mode
        model.zero_grad()
        torch.manual_seed(1)
        x = torch.randn(4, 1, 6, 6, requires_grad=True)  # the reentrant variant needs one
        loss = model(x).square().mean() + cd.kl(model) / 100
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        assert grad is not None and results[1][1][name] is not None, name
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-8, msg=name)
