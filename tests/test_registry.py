"""The per-layer-type registry: built-in types come from it, and a user's own layer type is one
``register_layer`` call away from being gated, costed, folded and pruned exactly."""

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.dropout import LSTM
from compressdrop.gating import LayerSpec, register_layer, spec_of
from compressdrop.gating.registry import _SPECS


class TLinear(nn.Module):
    """A linear map whose weight is stored transposed, (in, out): a layer Torch-Pruning has no
    pruner for."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _tlinear_pruner():
    import torch_pruning as tp

    class TLinearPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = [i for i in range(layer.weight.shape[1]) if i not in set(idxs)]
            layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = [i for i in range(layer.weight.shape[0]) if i not in set(idxs)]
            layer.weight = nn.Parameter(layer.weight.data[keep].clone())
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return TLinearPruner()


@pytest.fixture
def tlinear_registered():
    register_layer(
        TLinear,
        LayerSpec(
            role="producer",
            kind="neuron",
            unit_dim=-1,
            unit_costs=lambda m, out: (float(m.weight.shape[0] if out else m.weight.shape[1]),) * 2,
            fold=lambda m, s: m.weight.mul_(s),
            pruner=_tlinear_pruner,
        ),
    )
    yield
    del _SPECS[TLinear]


def test_built_in_types_have_specs():
    assert spec_of(nn.Linear(2, 3)).unit_dim == -1 and spec_of(nn.Conv2d(1, 2, 3)).unit_dim == 1
    assert spec_of(nn.BatchNorm2d(4)).role == "norm"
    assert spec_of(LSTM(3, 4)).wrapper is cd.gating.GatedLSTM  # the subclass's own spec wins
    assert "compressdrop.dropout.LSTM" in spec_of(nn.LSTM(3, 4)).why_not(nn.LSTM(3, 4))
    assert spec_of(nn.ReLU()) is None


def test_a_registered_custom_layer_is_gated_and_pruned_exactly(tlinear_registered):
    torch.manual_seed(0)
    net = nn.Sequential(TLinear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    cd.attach(net, example_inputs=x[:2])
    assert [n for n, _ in cd.named_gates(net)] == ["0"]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(net(x), torch.randint(0, 3, (32,))) + cd.kl(net) / 32
    opt.zero_grad()
    loss.backward()
    opt.step()
    gate = next(iter(cd.named_gates(net)))[1]
    snr = gate.snr().detach()
    thr = float(snr.median())
    slim = cd.prune(net, thr, example_inputs=x[:4])
    kept = int((snr >= thr).sum())
    assert 0 < kept < 16
    assert slim[0].weight.shape == (6, kept) and slim[2].in_features == kept
    net.eval()
    with torch.no_grad():
        cd.mask_(net, thr)
        torch.testing.assert_close(slim(x), net(x), rtol=1e-5, atol=1e-6)


def test_register_layer_refuses_what_is_not_a_module():
    with pytest.raises(ValueError, match=r"not an nn\.Module subclass"):
        register_layer(int, spec_of(nn.Linear(1, 1)))
