"""The uniform keep rule: gates at the same place of each block keep as many units."""

from __future__ import annotations

import torch

from compressdrop.gates import LogNormalGate
from compressdrop.pruning.uniform import family_key, uniform_keep


def _gate(units: int, sigmas: list[float], blocks: int = 1) -> LogNormalGate:
    g = LogNormalGate(units)
    with torch.no_grad():
        g.log_sigma.copy_(torch.tensor(sigmas))  # larger σ: lower SNR
    if blocks > 1:
        g.unit_blocks = blocks  # type: ignore[assignment]
    return g


def test_members_of_a_family_keep_the_mean_number_each_its_own_best():
    a = _gate(4, [-5, -5, -5, 3])  # the threshold keeps 3
    b = _gate(4, [3, 3, -5, 3])  # keeps 1
    head = _gate(3, [3, -5, 3])  # alone in its family: unchanged
    gates = [("layers.0.fc", a), ("layers.1.fc", b), ("head", head)]
    assert family_key("layers.0.fc", a) == family_key("layers.1.fc", b) == ("layers.#.fc", 4, 1)
    keeps = {id(g): g.mask(1.0) for _, g in gates}
    out = uniform_keep(gates, keeps)
    assert out[id(a)].sum() == out[id(b)].sum() == 2  # round((3 + 1) / 2)
    assert out[id(a)][:3].sum() == 2 and out[id(b)][2]  # each keeps its highest SNRs
    assert torch.equal(out[id(head)], keeps[id(head)])


def test_blocks_keep_as_many_each():
    a = _gate(4, [-5, -5, -5, -5], blocks=2)  # keeps 4
    b = _gate(4, [-5, 3, 3, 3], blocks=2)  # keeps 1
    gates = [("l.0.attn", a), ("l.1.attn", b)]
    out = uniform_keep(gates, {id(g): g.mask(1.0) for _, g in gates})
    for g in (a, b):  # round(2.5 / 2) = 1 per block
        assert out[id(g)].reshape(2, 2).sum(1).tolist() == [1, 1]
    assert out[id(b)][0]


def test_uniform_pruning_of_a_net_without_repeated_blocks_says_it_changes_nothing():
    """`--uniform` on an MLP did nothing, silently."""
    import pytest

    import compressdrop as cd
    from compressdrop.models import build_model
    from compressdrop.pruning import PruningWarning

    net = build_model("lenet300", (1, 8, 8))
    cd.attach(net, example_inputs=torch.randn(2, 1, 8, 8))
    with pytest.warns(PruningWarning, match="uniform pruning changes nothing here"):
        slim = cd.prune(net, 1.0, uniform=True)
    assert slim.prune_report.architecture() == cd.prune(net, 1.0).prune_report.architecture()
