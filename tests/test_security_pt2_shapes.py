"""Two operators on the ``.pt2`` allowlist have CPU kernels that trust their arguments' shapes:
``aten.lstm.input`` (and ``gru.input``, ``rnn_tanh.input``) read each layer's weights at the size
the hidden state gives, and ``scaled_dot_product_attention`` reads the values at the keys'
length. A file that edits one size crashed the process at load (segfault) or read past a tensor
into the output; the fake tensors that measure a graph first take such shapes without complaint.
``program_to_module`` calls them through shape checks (``programs/_checked.py``)."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError
from compressdrop.programs import load_program

from .test_security import _cli
from .test_security_pt2_schema import _edited, _nodes, _set

DISAGREE = r"calls aten\.{op} with shapes that disagree \({what}\)"


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module], **kw) -> None:
        super().__init__()
        self.rnn = kind(4, 4, **kw)
        width = (kw.get("proj_size") or 4) * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        k, v = k[:, :, :48], v[:, :, :48]  # the slices a crafted file changes
        return nn.functional.scaled_dot_product_attention(q, k, v).mean((1, 2))


def _save(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM's flat weights "assigned during export"
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=dims)
    torch.export.save(program, path)
    return path


def _node(doc, target: str, nth: int = 0) -> int:
    hits = [i for i, n in enumerate(_nodes(doc)) if n["target"] == f"torch.ops.aten.{target}"]
    return hits[nth]


def _lstm_hidden_4096(doc) -> None:
    """The LSTM's zero hidden and cell states of size 4,096 (its weights are for 4)."""
    for nth in (0, 1):
        node = _node(doc, "zeros.default", nth)
        arg = _nodes(doc)[node]["inputs"][0]["arg"]
        if "as_ints" in arg:  # a fixed batch
            _set(f"nodes.{node}.inputs.0.arg.as_ints", [*arg["as_ints"][:-1], 4096])(doc)
        else:  # a dynamic one
            size = [*arg["as_sym_ints"][:-1], {"as_int": 4096}]
            _set(f"nodes.{node}.inputs.0.arg.as_sym_ints", size)(doc)


def _values_shorter(doc) -> None:
    """The values sliced to 2 positions, the keys left at 48: the kernel read 48 rows of 2."""
    ends = [i for i, n in enumerate(_nodes(doc)) if n["inputs"][-1:] == [_END_48]]
    _set(f"nodes.{ends[1]}.inputs.3.arg.as_int", 2)(doc)


_END_48 = {"name": "end", "arg": {"as_int": 48}, "kind": 1}


CASES = {
    "lstm": (
        _Recurrent(nn.LSTM, batch_first=True),
        (2, 5, 4),
        _lstm_hidden_4096,
        "lstm.input",
        r"the hidden state is \(1, 2, 4096\), not \(1, 2, 4\)",
    ),
    "attention": (
        _Attention(),
        (2, 64, 8),
        _values_shorter,
        "scaled_dot_product_attention",
        r"the values is \(2, 2, 2, 4\), not \(2, 2, 48, any\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_whose_shapes_disagree_is_refused_at_load_where_it_runs_there(case, tmp_path):
    """A fixed batch: the graph runs at load (the batch-size check), so it is refused there."""
    model, shape, edit, op, what = CASES[case]
    good = _save(model, torch.randn(shape), tmp_path / "good.pt2", dynamic=False)
    evil = _edited(good, tmp_path / "evil.pt2", edit)
    with pytest.raises(CheckpointError, match=DISAGREE.format(op=op, what=what)) as caught:
        load_model(evil)
    assert str(caught.value).startswith(f"{evil}: ")
    res = _cli(["export", evil, "-o", tmp_path / "m.onnx"])
    assert res.exit_code == 1 and "shapes that disagree" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "good.pt2"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_whose_shapes_disagree_is_refused_whenever_it_runs(case, tmp_path):
    """A dynamic batch: nothing runs at load; every run of the module is checked."""
    model, shape, edit, op, what = CASES[case]
    good = _save(model, torch.randn(shape), tmp_path / "good.pt2")
    evil = load_model(_edited(good, tmp_path / "evil.pt2", edit))
    with pytest.raises(CheckpointError, match=DISAGREE.format(op=op, what=what)):
        evil(torch.randn(shape))
    res = _cli(["export", tmp_path / "evil.pt2", "-o", tmp_path / "m.onnx"])
    assert res.exit_code == 1 and "shapes that disagree" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "good.pt2"]


@pytest.mark.parametrize(
    "model",
    [
        _Recurrent(nn.LSTM, batch_first=True),
        _Recurrent(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True),
        _Recurrent(nn.LSTM, proj_size=2, batch_first=True),
        _Recurrent(nn.GRU, num_layers=2, batch_first=True),
        _Recurrent(nn.RNN, bias=False, batch_first=True),
        _Attention(),
    ],
    ids=["lstm", "lstm-2-bidirectional", "lstm-projected", "gru-2", "rnn-no-bias", "attention"],
)
def test_the_checked_operators_give_the_models_own_outputs_at_any_batch(model, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 64, 8) if isinstance(model, _Attention) else torch.randn(3, 5, 4)
    loaded = load_program(_save(model, x, tmp_path / "m.pt2"))
    wrapped = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert any(getattr(t, "__module__", "") == "compressdrop.programs._checked" for t in wrapped)
    for batch in (1, 3, 7):
        x = torch.randn(batch, *x.shape[1:])
        torch.testing.assert_close(loaded(x), model(x))


class _InABranch(nn.Module):
    """Attention inside ``torch.cond``'s branch (a subgraph of the program), values of 2
    positions for keys of 48: ``torch.export`` writes it as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def attend(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(x, x[:, :, :48], x[:, :, :2])

        return torch.cond(x.sum() > 0, attend, lambda x: x * 2, (x,))


def test_an_operator_inside_a_subgraph_is_checked_too(tmp_path):
    evil = _save(_InABranch(), torch.ones(2, 2, 64, 4), tmp_path / "evil.pt2", dynamic=False)
    what = r"the values is \(2, 2, 2, 4\), not \(2, 2, 48, any\)"
    op = "scaled_dot_product_attention"
    with pytest.raises(CheckpointError, match=DISAGREE.format(op=op, what=what)):
        load_model(evil)


class _NoGradAttention(_Attention):
    """Attention run under ``torch.no_grad()`` inside forward: a grad-mode wrapper's body."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().forward(x)


class _CondAttention(_Attention):
    """Attention (of shapes that agree) in one of ``torch.cond``'s branches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def attend(x: torch.Tensor) -> torch.Tensor:
            return super(_CondAttention, self).forward(x)

        return torch.cond(x.sum() > 0, attend, lambda x: x[:, 0, :4] * 0, (x,))


def test_no_graph_of_a_loaded_program_calls_a_checked_operator_unchecked(tmp_path):
    """Review 11: the checks reached the top graph only; a grad-mode wrapper's body and a
    ``cond`` branch kept the raw kernels."""
    from compressdrop.programs._checked import CHECKED

    for i, (model, x) in enumerate(
        [(_NoGradAttention(), torch.randn(2, 64, 8)), (_CondAttention(), torch.randn(2, 64, 8))]
    ):
        loaded = load_program(_save(model, x, tmp_path / f"{i}.pt2", dynamic=False))
        graphs = [m for m in loaded.modules() if isinstance(m, torch.fx.GraphModule)]
        assert len(graphs) > 1  # the subgraphs are there
        raw = [n for g in graphs for n in g.graph.nodes if n.target in CHECKED]
        assert raw == [], raw


def test_an_lstm_projection_to_its_own_size_is_refused():
    """Review 11: three weights per direction (no biases) with a 'projection' of (size, size)
    passed the count the check read a projection from; the kernel decides by the states' sizes
    (equal: none) and read the weights two by two, past them (a segfault). nn.LSTM's projection
    is smaller than its hidden size."""
    from compressdrop.programs._checked import _check_rnn

    s, width = 2, 16
    states = [torch.zeros(2, 2, s), torch.zeros(2, 2, s)]
    params = [torch.randn(4 * s, width), torch.randn(4 * s, s), torch.randn(s, s)] * 2
    flags = (False, 1, 0.0, False, True, True)  # no biases, 1 layer, bidirectional, batch first
    with pytest.raises(CheckpointError, match=r"6 weights for 1 layers"):
        _check_rnn("aten.lstm.input", 4, torch.randn(2, 3, width), states, params, flags)


class _FixedBatchBig(_Recurrent):
    """A fixed-batch LSTM (its zero states made at batch 1) and a tensor over the run budget."""

    def __init__(self) -> None:
        super().__init__(nn.LSTM, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.ones(1024, 1024).sum() * 0


def test_the_run_budget_holds_where_a_checked_operator_refuses_the_other_batch(
    tmp_path, monkeypatch
):
    """Review 11: the fake run at batch + 1 stopped at the LSTM's check, and the graph then ran
    for real at load however much it made (a 19 KB file: 919 MB). Now it is refused as a
    fixed-batch program at once, nothing run."""
    import compressdrop.programs._measure as measure
    from compressdrop.programs import load_program_safely, program_to_module
    from compressdrop.programs.records import _check_batch_free

    path = _save(_FixedBatchBig(), torch.randn(1, 5, 4), tmp_path / "m.pt2", dynamic=False)
    monkeypatch.setattr(measure, "_RUN_FIXED_BYTES", 1 << 20)  # 4 MiB of ones: over it
    model, ran, ones = program_to_module(load_program_safely(path)), [], torch.ops.aten.ones.default

    def counted(*args, **kwargs):  # the big tensor, noted where it is made for real
        out = ones(*args, **kwargs)
        ran.extend([] if isinstance(out, torch._subclasses.FakeTensor) else [args])
        return out

    for node in model.graph.nodes:
        if node.target is ones:
            node.target = counted
    model.recompile()
    with pytest.raises(CheckpointError, match=r"exported with a fixed batch size of 1"):
        _check_batch_free(model, "m.pt2")
    assert ran == []
