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


class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc": torch.nn.Linear(16, 16), "back": torch.nn.Linear(16, 16)})
            for _ in range(2)
        )
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.layers:  # a residual block: its hidden units `fc` are gated
            h = h + block["back"](torch.relu(block["fc"](h)))
        return self.out(h)


def _gated_blocks() -> tuple[_Blocks, torch.Tensor]:
    """``_Blocks`` gated on its hidden units, block 0 keeping 12 units at threshold 1 and block 1
    keeping 4: uniform pruning keeps 8 each ("8-8"), free "12-4"."""
    import compressdrop as cd

    torch.manual_seed(0)
    net = _Blocks().eval()
    net.arch = {"factory": "tests.test_uniform:_Blocks", "input_shape": [8], "kwargs": {}}
    x = torch.randn(4, 8)
    cd.attach(net, example_inputs=x, include=["layers.*.fc"])
    gates = dict(cd.named_gates(net))
    with torch.no_grad():
        gates["layers.0.fc"].log_sigma.copy_(torch.tensor([-5.0] * 12 + [3.0] * 4))
        gates["layers.1.fc"].log_sigma.copy_(torch.tensor([-5.0] * 4 + [3.0] * 12))
    return net, x


def test_a_uniform_prune_keeps_its_noise_for_monte_carlo(tmp_path):
    """`prune --mc-samples` of a uniform prune failed ("noisy site has 2 units but the layer gives
    4"): keep_noise re-masked the gates without `uniform`; and the slim files were already
    written. The report records `uniform`, keep_noise follows it, and finish checks first."""
    from compressdrop.training.finish import finish
    from compressdrop.uncertainty import keep_noise

    net, x = _gated_blocks()
    slim, files = finish(net, tmp_path / "slim.pt", threshold=1.0, mc_samples=4, uniform=True)
    assert slim.prune_report.architecture_after == "8-8" and slim.prune_report.uniform
    assert files is not None and {"mc_checkpoint", "mc_onnx"} <= set(files.paths)
    noisy = keep_noise(net, slim)  # the report says uniform
    with torch.no_grad():
        torch.testing.assert_close(noisy(x), slim(x))


def test_sweep_prunes_as_prune_would_uniform_or_free(tmp_path):
    """`sweep` ignored a recipe's `prune.uniform`: for one gated model and threshold it reported
    12-4 where `prune` wrote 8-8. It now follows the recipe, and `--uniform/--free` choose."""
    import numpy as np

    from compressdrop.checkpoint import save_model
    from compressdrop.recipes import Recipe
    from compressdrop.workflows import sweep_file

    net, _ = _gated_blocks()
    recipe = Recipe.from_dict({"prune": {"uniform": True}}).to_dict()
    save_model(net, tmp_path / "gated.pt", recipe=recipe)
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=gen.normal(size=(60, 8)).astype("f4"), y=gen.integers(0, 3, 60))
    kw = {"thresholds": [1.0], "arch": "tests.test_uniform:_Blocks", "batch": 4}
    for uniform, want in ((None, "8-8"), (False, "12-4"), (True, "8-8")):
        res = sweep_file(tmp_path / "gated.pt", str(tmp_path / "d.npz"), out=tmp_path / "s",
                         uniform=uniform, **kw)  # fmt: skip
        assert res["rows"][-1]["architecture"] == want, uniform


def test_prune_free_overrides_a_recipes_uniform(tmp_path):
    """A recipe with `prune.uniform: true` could not be pruned free from the CLI (`--uniform`
    was a flag with no way back; a new-user walk): `--free` now says so."""
    from compressdrop.checkpoint import load_model, save_model
    from compressdrop.recipes import Recipe

    from .test_cli import run

    net, _ = _gated_blocks()
    save_model(
        net, tmp_path / "gated.pt", recipe=Recipe.from_dict({"prune": {"uniform": True}}).to_dict()
    )
    arch = ["--arch", "tests.test_uniform:_Blocks", "-t", "1"]
    for flag, want in (([], "8-8"), (["--free"], "12-4"), (["--uniform"], "8-8")):
        out = tmp_path / f"slim{len(flag)}{want}.pt"
        run(["prune", tmp_path / "gated.pt", *arch, *flag, "-o", out])
        assert (
            load_model(out, arch="tests.test_uniform:_Blocks").prune_report.architecture_after
            == want
        )
