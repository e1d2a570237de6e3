"""Models that take token ids or several inputs: attach records what the inputs are (shape,
dtype, the id range), so that prune, a gated checkpoint and both exports make fitting inputs."""

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop import add_safe_factories
from compressdrop.checkpoint import load_model, save_model
from compressdrop.export.program import export_program


class TokenNet(nn.Module):
    """Token ids → embedding → mean over tokens → MLP."""

    def __init__(self, vocab: int = 50, tokens: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 3)
        self.arch = {"factory": "tests.test_inputs:TokenNet", "input_shape": [tokens], "kwargs": {}}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


class TwoInputNet(nn.Module):
    """Two positional inputs, each through its own layer, then summed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 12), nn.Linear(3, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(y)))


add_safe_factories([TokenNet])


def _spread(model: nn.Module) -> float:
    """Give the one gate SNRs that differ; return their median."""
    gate = next(iter(cd.named_gates(model)))[1]
    with torch.no_grad():
        gate.log_sigma.copy_(torch.linspace(-3, 1, gate.num_units))
    return float(gate.snr().detach().median())


def test_token_ids_attach_prune_reload_and_export(tmp_path):
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids = torch.randint(0, 50, (4, 7))
    cd.attach(model, example_inputs=ids[:2])
    assert [n for n, _ in cd.named_gates(model)] == ["fc1"]
    (spec,) = cd.gating.input_specs_of(model)
    assert spec["dtype"] == "int64" and spec["shape"] == [7] and spec["high"] <= 50
    thr = _spread(model)
    slim = cd.prune(model, thr)  # its parity check draws ids, not floats
    assert slim.fc1.out_features < 32 and slim.prune_report.max_rel_error <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(slim(ids), cd.mask_(model, thr)(ids), rtol=1e-5, atol=1e-6)
    save_model(model, tmp_path / "gated.pt")
    again = load_model(tmp_path / "gated.pt")  # re-attaches on token ids
    assert cd.is_gated(again)
    assert max(cd.export_onnx(slim, ids[:2], tmp_path / "s.onnx").max_rel_error.values()) <= 1e-4
    assert max(export_program(slim, ids[:2], tmp_path / "s.pt2").max_rel_error.values()) <= 1e-5


def test_two_positional_inputs_attach_and_prune(tmp_path):
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    cd.attach(model, example_inputs=(x[:2], y[:2]))
    assert [n for n, _ in cd.named_gates(model)] == ["a"]  # a and b write one stream: one gate
    thr = _spread(model)
    slim = cd.prune(model, thr)
    assert slim.a.out_features == slim.b.out_features < 12
    with torch.no_grad():
        torch.testing.assert_close(slim(x, y), cd.mask_(model, thr)(x, y), rtol=1e-5, atol=1e-6)
    # both exporters take the inputs as a tuple (they raised AttributeError: 'tuple' object has
    # no attribute 'detach'), each with a dynamic batch, checked at batches 1, 7 and 64
    from compressdrop.export import ExportError, export_onnx, export_program
    from compressdrop.runtime import ort_session

    rep = export_onnx(slim, (x, y), tmp_path / "s.onnx")
    assert set(rep.max_rel_error) == {1, 7, 64} and max(rep.max_rel_error.values()) <= 1e-5
    session, _ = ort_session(tmp_path / "s.onnx", "cpu")
    a, b = torch.randn(5, 5), torch.randn(5, 3)
    feeds = dict(zip([i.name for i in session.get_inputs()], (a.numpy(), b.numpy())))
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(session.run(None, feeds)[0]), slim(a, b), rtol=1e-5, atol=1e-6
        )
    assert max(export_program(slim, (x, y), tmp_path / "s.pt2").max_rel_error.values()) <= 1e-5
    loaded = torch.export.load(tmp_path / "s.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), slim(a, b))
    with pytest.raises(ExportError, match="differ in batch size"):
        export_onnx(slim, (x, y[:2]), tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()


def test_named_inputs_are_refused_by_name():
    """A dict of inputs went on to "AttributeError: 'dict' object has no attribute 'shape'"."""
    from compressdrop.errors import InputError

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(InputError, match=r"tensor or a tuple of tensors.*got dict"):
        cd.attach(net, example_inputs={"image": torch.randn(2, 4)})
    assert not cd.is_gated(net)
    cd.attach(net, example_inputs=[torch.randn(2, 4)])  # a list is a tuple of positional inputs
    assert cd.is_gated(net)


class _LengthBaked(nn.Module):
    """Token ids → mean of their embeddings written as sum / length: an export at one length
    bakes the divisor in."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).sum(1) / ids.shape[1])


def test_a_program_refuses_shapes_it_was_not_exported_for_by_name(tmp_path):
    """compressdrop drops a ``.pt2``'s guards (their code comes from the file), and torch's
    input check went with them: a program exported at 7 tokens ran at 12 and divided by 7, wrong
    numbers and no error (a reshape to the length failed deep in the graph instead, ``shape
    '[-1, 9]' is invalid``). Now the shapes it was exported for are checked before each call,
    in copies too; another batch size still runs (load checks the graph does not depend on
    it), and a dynamic length is held to its exported range."""
    import copy

    from compressdrop.errors import InputError

    torch.manual_seed(0)
    net = _LengthBaked().eval()
    ids = torch.randint(0, 50, (2, 7))
    torch.export.save(torch.export.export(net, (ids,)), tmp_path / "fixed.pt2")
    model = load_model(tmp_path / "fixed.pt2")
    more = torch.randint(0, 50, (5, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(more), net(more))  # a batch size of its own
    longer = torch.randint(0, 50, (2, 12))
    for m in (model, copy.deepcopy(model)):
        with pytest.raises(InputError, match=r"\(2, 12\).*\(N, 7\).*dimension 1 is 12, fixed at 7"):
            m(longer)
    with pytest.raises(InputError, match="check_lengths"):
        model(longer)
    with pytest.raises(InputError, match="1 dimensions where it has 2"):
        model(torch.randint(0, 50, (7,)))
    length = torch.export.Dim("length", min=2, max=16)
    program = torch.export.export(net, (ids,), dynamic_shapes=({1: length},))
    torch.export.save(program, tmp_path / "dynamic.pt2")
    model = load_model(tmp_path / "dynamic.pt2")
    with torch.no_grad():
        torch.testing.assert_close(model(longer), net(longer))
    with pytest.raises(InputError, match="dimension 1 is 20, outside its exported range 2 to 16"):
        model(torch.randint(0, 50, (2, 20)))
