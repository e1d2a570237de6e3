"""What ``benchmarks/fuzz_allowed_ops.py`` found on the ``.pt2`` allowlist's CPU kernels, each
reached from a crafted file: a dtype or memory format given as a plain number (``as_int``) is
turned into the enum unchecked (-1 segfaulted in ``aten.to.dtype``, -100 in ``contiguous``, in
the fake run at load too); the FFT kernels crashed on a negative dim (now off the allowlist);
``col2im`` (``nn.Fold``) crashed on a padding of 2**32, ``max_pool1d`` on a kernel of 2**63 - 1;
an embedding bag of no bags crashed in max mode. Each file was loaded (or run) into a crash
before; now it is a clear CheckpointError.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError

from .test_security_pt2_schema import _edited, _nodes

OFF_THE_LIST = r"calls 'torch\.ops\.aten\.{op}', which is not among the operators"


def _save(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, decompose=False) -> Path:
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=dims)
        if decompose:
            program = program.run_decompositions()
    torch.export.save(program, path)
    return path


def _node(doc, target: str) -> dict:
    return next(n for n in _nodes(doc) if n["target"] == f"torch.ops.aten.{target}")


class _Casts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2).contiguous(memory_format=torch.contiguous_format) * 2
        return y.to(torch.float64).sum(1)


def _dtype_minus_1(doc) -> None:
    _node(doc, "to.dtype")["inputs"][1]["arg"] = {"as_int": -1}


def _memory_format_minus_100(doc) -> None:
    arg = {"name": "memory_format", "arg": {"as_int": -100}, "kind": 2}
    _node(doc, "contiguous.default")["inputs"].append(arg)


@pytest.mark.parametrize(
    "edit, what",
    [
        (_dtype_minus_1, "passes -1 as the dtype of aten.to.dtype, where a ScalarType belongs"),
        (
            _memory_format_minus_100,
            "passes -100 as the memory_format of aten.contiguous.default, where a MemoryFormat",
        ),
    ],
    ids=["dtype", "memory-format"],
)
@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_a_dtype_or_memory_format_given_as_a_number_is_refused_at_load(
    edit, what, dynamic, tmp_path
):
    """Before: the dtype's file loaded (its fake run failed: not measured) and crashed when run;
    the memory format's crashed the fake run at load."""
    good = _save(_Casts(), torch.randn(2, 3, 4), tmp_path / "good.pt2", dynamic)
    evil = _edited(good, tmp_path / "evil.pt2", edit)
    with pytest.raises(CheckpointError, match=re.escape(what)) as caught:
        load_model(evil)
    assert str(caught.value).startswith(f"{evil}: ")
    want = torch.full((2, 3), 8.0, dtype=torch.float64)
    torch.testing.assert_close(load_model(good)(torch.ones(2, 3, 4)), want)


class _Spectrum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, dim=1).abs()


def _negative_fft_dim(doc) -> None:
    _node(doc, "_fft_r2c.default")["inputs"][1]["arg"] = {"as_ints": [-2]}


def test_an_fft_with_a_negative_dim_is_refused_before_it_runs(tmp_path):
    """``aten._fft_r2c`` with dim -2 of a (2, 8) input segfaulted (the fake kernel took it);
    no model's program calls the FFT kernels, which are now off the allowlist."""
    good = _save(_Spectrum(), torch.randn(2, 8), tmp_path / "good.pt2", False, decompose=True)
    evil = _edited(good, tmp_path / "evil.pt2", _negative_fft_dim)
    with pytest.raises(CheckpointError, match=OFF_THE_LIST.format(op=r"_fft_r2c\.default")):
        load_model(evil)


class _Fold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fold = nn.Fold((8, 8), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fold(x).flatten(1)


def _padding_2_32(doc) -> None:
    _node(doc, "col2im.default")["inputs"][4]["arg"] = {"as_ints": [2**32, 0]}


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 8, mode="max", padding_idx=4)
        self.register_buffer("offsets", torch.tensor([0, 2, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs() * 3).long().clamp(0, 9).flatten()
        return self.bag(ids, self.offsets[:2]).sum(0, keepdim=True).expand(x.shape[0], -1)


def _no_bags(doc) -> None:
    """The offsets sliced to none: the bag of no bags."""
    node = _node(doc, "slice.Tensor")
    end = next(i for i in node["inputs"] if i["name"] == "end")
    end["arg"] = {"as_int": 0}


class _Pool1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)


def _kernel_2_63(doc) -> None:
    node = _node(doc, "max_pool1d.default")
    kernel = next(i for i in node["inputs"] if i["name"] == "kernel_size")
    kernel["arg"] = {"as_ints": [2**63 - 1]}
    stride = next(i for i in node["inputs"] if i["name"] == "stride")
    stride["arg"] = {"as_ints": []}  # the kernel's (with one of 2: a loop without end)


CASES = {
    "col2im": (
        _Fold(),
        (2, 27, 36),
        _padding_2_32,
        "col2im.default",
        r"argument 4 is \[4294967296, 0\], not from 0 to 2\*\*31 - 1",
    ),
    "max-pool1d": (
        _Pool1d(),
        (2, 3, 16),
        _kernel_2_63,
        "max_pool1d.default",
        r"its kernel_size is \[9223372036854775807\], not from 0 to 2\*\*31 - 1",
    ),
    "embedding-bag": (
        _Bag(),
        (2, 4),
        _no_bags,
        "embedding_bag.padding_idx",
        "offsets of 0 make no bag",
    ),
}


OUT_OF_RANGE = r"calls aten\.{op} with sizes its kernel does not check \({what}\)"


@pytest.mark.parametrize("case", list(CASES))
def test_a_kernel_argument_a_file_sets_past_its_bounds_is_refused_whenever_it_runs(case, tmp_path):
    """A dynamic batch: nothing runs at load; the module's run is checked (before: a crash)."""
    model, shape, edit, op, what = CASES[case]
    good = _save(model, torch.rand(shape), tmp_path / "good.pt2", True)
    evil = load_model(_edited(good, tmp_path / "evil.pt2", edit))
    with pytest.raises(CheckpointError, match=OUT_OF_RANGE.format(op=re.escape(op), what=what)):
        evil(torch.rand(shape))


@pytest.mark.parametrize("case", list(CASES))
def test_a_kernel_argument_a_file_sets_past_its_bounds_is_refused_at_load(case, tmp_path):
    """A fixed batch: the batch-size check runs the graph at load, so it is refused there."""
    model, shape, edit, op, what = CASES[case]
    good = _save(model, torch.rand(shape), tmp_path / "good.pt2", False)
    evil = _edited(good, tmp_path / "evil.pt2", edit)
    with pytest.raises(CheckpointError, match=OUT_OF_RANGE.format(op=re.escape(op), what=what)):
        load_model(evil)


@pytest.mark.parametrize("case", list(CASES))
def test_the_checked_kernels_give_the_models_own_outputs(case, tmp_path):
    model, shape, _, _, _ = CASES[case]
    torch.manual_seed(0)
    x = torch.rand(shape)
    loaded = load_model(_save(model, x, tmp_path / "m.pt2", True))
    wrapped = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert any(getattr(t, "__module__", "") == "compressdrop.programs._checked" for t in wrapped)
    for batch in (1, 3):
        x = torch.rand(batch, *shape[1:])
        torch.testing.assert_close(loaded(x), model(x))
