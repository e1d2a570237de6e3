"""The single run of a ``.pt2`` graph at load (the batch-size check) is bounded by the sizes its
program declares: a graph that asks for more memory than its weights justify is not run."""

import pytest
import torch
from torch import nn

from compressdrop.checkpoint import CheckpointError, load_model
from compressdrop.programs import ProgramWarning, _measure


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
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
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

    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
    with pytest.warns(ProgramWarning, match="come to 4 MiB"):
        load_model(save(Cond(), tmp_path / "cond.pt2"))


def _lying(path, n: int):
    """``Baked(1)``'s archive with its ``ones`` node told to make ``n`` x ``n``, while the size
    the file declares for that node's output stays ``[1, 1]``."""
    import io
    import json
    import zipfile

    src = zipfile.ZipFile(save(Baked(1), path))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("models/model.json"):
                doc = json.loads(data)
                for node in doc["graph_module"]["graph"]["nodes"]:
                    if node["target"] == "torch.ops.aten.ones.default":
                        node["inputs"][0]["arg"]["as_ints"] = [n, n]
                data = json.dumps(doc).encode()
            dst.writestr(info.filename, data)
    path.write_bytes(out.getvalue())
    return path


def test_the_sizes_are_measured_not_read_off_what_the_file_declares(tmp_path, monkeypatch):
    """A 9 KB file whose node made ``aten.ones([30000, 30000])`` while declaring ``[1, 4]`` for
    its output passed the bound and took 3.8 GB in ``load_model``: the sizes are now those the
    operators make, found on fake tensors."""
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
    with pytest.warns(ProgramWarning, match=r"come to 4 MiB.* over the 1 MiB"):
        load_model(_lying(tmp_path / "lie.pt2", 1000))


class NoGrad(Baked):
    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


class Autocast(Baked):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x).float()


@pytest.mark.parametrize("cls", [NoGrad, Autocast])
def test_a_wrapper_s_body_is_measured_and_the_check_still_runs(cls, tmp_path, monkeypatch):
    """``torch.no_grad()`` or ``torch.autocast`` inside a forward exports (in training mode) as
    a higher-order wrapper around its body: the body's sizes are measured, and a baked batch
    inside it is still found."""
    program = torch.export.export(cls(10).train(), (torch.randn(2, 1, 8, 8),))
    assert any("wrap_with" in str(n.target) for n in program.graph.nodes)
    torch.export.save(program, tmp_path / "small.pt2")
    with pytest.raises(CheckpointError, match="fixed batch size of 2"):
        load_model(tmp_path / "small.pt2")
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
    torch.export.save(torch.export.export(cls(1000).train(), (torch.randn(2, 1, 8, 8),)),
                      tmp_path / "big.pt2")  # fmt: skip
    with pytest.warns(ProgramWarning, match=r"come to \d MiB.* over the 1 MiB"):
        load_model(tmp_path / "big.pt2")


def test_a_convolutions_workspace_counts_too(tmp_path, monkeypatch):
    """A float64 convolution runs through im2col on the CPU: a buffer of batch x kernel x output
    positions that no fake kernel returns (424 MiB for one ``Conv2d(1, 1, 31)`` on 200 x 200,
    with the fake run's outputs at 1 MB)."""
    conv = nn.Conv2d(1, 1, 31, bias=False).double()
    program = torch.export.export(conv, (torch.randn(1, 1, 64, 64, dtype=torch.float64),))
    torch.export.save(program, tmp_path / "conv.pt2")
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 4 << 20)  # the outputs: well under
    with pytest.warns(ProgramWarning, match=r"come to 17 MiB.* over the 4 MiB"):
        load_model(tmp_path / "conv.pt2")


class Ones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x))) + torch.ones(1000, 1000).sum() * 0


def test_a_gated_files_program_is_measured_before_its_gates_are_attached(tmp_path, monkeypatch):
    """Loading a gated file of a program attaches its gates by tracing the program: that run was
    not measured (a 39 KB file's ``aten.ones([12000, 12000])`` took 549 MiB at load)."""
    import warnings

    import compressdrop as cd
    from compressdrop.checkpoint import save_model

    batch = torch.export.Dim("batch")
    program = torch.export.export(Ones(), (torch.randn(2, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "ones.pt2")
    net = load_model(tmp_path / "ones.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(net, gate="lognormal", example_inputs=torch.randn(2, 64))
    save_model(net, tmp_path / "gated.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        assert cd.is_gated(load_model(tmp_path / "gated.pt"))  # 4 MB of ones: under 256 MiB
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
    with pytest.raises(CheckpointError, match=r"not run to attach the gates: .*come to 4 MiB"):
        load_model(tmp_path / "gated.pt")


class Gather(Baked):
    """Baked's graph beside ``w[i, j]``: ``n`` zeros for ``i``, a 0-d ``j``, ``w`` of 1,000
    columns, so the index makes ``n`` x 1,000 floats."""

    def __init__(self, n: int) -> None:
        super().__init__(1)
        self.register_buffer("w", torch.ones(1, 1, 1000))
        self.register_buffer("i", torch.zeros(n, dtype=torch.long))
        self.register_buffer("j", torch.tensor(0))

    def forward(self, x):
        return super().forward(x) + torch.ops.aten.index.Tensor(self.w, [self.i, self.j]).mean()


def test_an_index_that_broadcasts_a_0d_index_is_measured_at_its_real_size(tmp_path, monkeypatch):
    """helper-47's fuzzer: torch's fake kernel of ``aten.index.Tensor`` drops the broadcast
    dimensions where a 0-d index follows a longer one, so ``w(1, 1, 1000)[zeros(1000), j()]``
    measured 4 KB for the 4 MB it makes, and ran at load (1,000 times that from a file of a few
    KB more). ``program_to_module`` gives such an index the shape the fake kernel measures right,
    the same result."""
    monkeypatch.setattr(_measure, "_RUN_FIXED_BYTES", 1 << 20)
    path = save(Gather(1000), tmp_path / "gather.pt2")
    with pytest.warns(ProgramWarning, match=r"check was not run .*come to 4 MiB.* over the 2 MiB"):
        model = load_model(path)
    x = torch.randn(2, 1, 8, 8)
    want = Gather(1000).eval()
    want.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(model(x), want(x))  # the index's result unchanged
    with pytest.raises(CheckpointError, match="fixed batch size of 2"):  # small: run, and judged
        load_model(save(Gather(10), tmp_path / "small.pt2"))


_IDX = {
    "none": None,
    "0d": torch.tensor(1),
    "1d": torch.tensor([0, 1]),
    "2d": torch.tensor([[1], [0]]),
}


@pytest.mark.parametrize(
    "names",
    [("1d", "0d"), ("0d", "1d"), ("2d", "0d", "0d"), ("none", "1d", "0d"), ("0d", "0d"), ("1d",)],
)
def test_the_checked_index_gives_aten_s_result_and_a_fake_shape_that_matches_it(names):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from compressdrop.programs._checked import CHECKED

    index, x = CHECKED[torch.ops.aten.index.Tensor], torch.randn(2, 3, 2, 5)
    indices = [_IDX[n] for n in names]
    want = torch.ops.aten.index.Tensor(x, indices)
    assert torch.equal(index(x, indices), want)
    with FakeTensorMode() as mode:
        fakes = [None if t is None else mode.from_tensor(t) for t in indices]
        assert index(mode.from_tensor(x), fakes).shape == want.shape
