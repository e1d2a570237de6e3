"""The single run of a ``.pt2`` graph at load (the batch-size check) is bounded by the sizes its
program declares: a graph that asks for more memory than its weights justify is not run."""

import pytest
import torch
from torch import nn

from compressdrop.checkpoint import CheckpointError, load_model
from compressdrop.programs import ProgramWarning, records


class Baked(nn.Module):
    """A graph that bakes its batch of 2 into a reshape, beside a constant of ``n`` x ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv, self.fc, self.n = nn.Conv2d(1, 32, 3), nn.Linear(16, 10), n

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.reshape(h.shape[0], 16, -1).mean(-1)) + torch.ones(self.n, self.n).sum()


def save(net: nn.Module, path):
    torch.export.save(torch.export.export(net.eval(), (torch.randn(2, 1, 8, 8),)), path)
    return path


def test_a_graph_that_asks_for_more_than_its_weights_justify_is_not_run_at_load(
    tmp_path, monkeypatch
):
    """A 13 KB file whose graph made ``aten.ones([45000, 45000])`` took 8 GB in ``load_model``:
    its sizes are in the program, so its run is skipped (with a warning that says why) when they
    come to more than 64 times its weights plus a fixed allowance (1 MiB here: 4 MB of ones)."""
    monkeypatch.setattr(records, "_RUN_FIXED_BYTES", 1 << 20)
    path = save(Baked(1000), tmp_path / "big.pt2")
    with pytest.warns(ProgramWarning, match=r"check was not run .*come to 4 MiB.* over the 1 MiB"):
        model = load_model(path)  # not run: its baked batch size is not found either
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    small = save(Baked(10), tmp_path / "small.pt2")
    with pytest.raises(CheckpointError, match="fixed batch size of 2"):  # run, and judged
        load_model(small)


def test_the_sizes_inside_a_conds_branches_count_too(tmp_path, monkeypatch):
    class Cond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            big = lambda h: h + torch.ones(1000, 1000).sum()  # noqa: E731
            return torch.cond(h.sum() > 0, big, lambda h: h - 1, (h,))

    monkeypatch.setattr(records, "_RUN_FIXED_BYTES", 1 << 20)
    with pytest.warns(ProgramWarning, match="come to 4 MiB"):
        load_model(save(Cond(), tmp_path / "cond.pt2"))
