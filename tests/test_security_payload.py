"""A checkpoint's records are checked before anything is built from them: a gated file's input
specs (3 GB drawn for ``[1, 8, 8, 6000000]``), a slim file's noise record (5 GB of gates for
400,000,000 units) and every other record ``load_model`` reads, each refused in one line naming
the record instead of a raw ``KeyError`` or ``TypeError``."""

import copy

import pytest
import torch
from click.testing import CliRunner

import compressdrop
from compressdrop.checkpoint import CheckpointError, save_model
from compressdrop.cli import main
from compressdrop.models import build_model


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A gated LeNet-300-100 of 8x8 inputs, as ``torch.load`` reads its file."""
    path = tmp_path_factory.mktemp("payload") / "gated.pt"
    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    compressdrop.attach(net, gate="lognormal")
    save_model(net, path)
    return torch.load(path, weights_only=True)


def mutated(payload, tmp_path, change, name="bad.pt"):
    """``payload`` changed by ``change`` (a function of the copy), saved under ``tmp_path``."""
    p = copy.deepcopy(payload)
    change(p)
    torch.save(p, tmp_path / name)
    return tmp_path / name


def never_drawn(monkeypatch):
    """Make drawing a gated model's example inputs fail the test."""

    def drawn(*args, **kwargs):
        raise AssertionError("inputs were drawn from a record that should have been refused")

    monkeypatch.setattr("compressdrop.checkpoint.random_inputs", drawn)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        # 2**40 values: the allocator would fail with a RuntimeError, not with this
        ([{"shape": [1, 8, 8, 1 << 40], "dtype": "float32"}], r"input 0: shape must be a list"),
        ([{"shape": [-5], "dtype": "float32"}], r"input 0: shape must be a list .* got \[-5\]"),
        ([{"shape": [1, 8, 8], "dtype": "int64", "high": "abc"}], r"high .* got 'abc'"),
        ([{"shape": [1, 8, 8], "dtype": "int8", "high": 1000}], r"high .* at most 128"),
        ([{"dtype": "float32"}], r"input 0: shape .* got None"),
        ([{"shape": "abc"}], r"input 0: shape .* got 'abc'"),
        ([{"shape": [1, 8, 8], "dtype": "complex64"}], r"dtype must be one of .* 'complex64'"),
        ([{"shape": [1, 8, 8], "dtype": "float32", "grad": True}], r"unknown key\(s\) \['grad'\]"),
        (5, r": expected a list of 1 to 64 input specs, got 5"),
        ([], r": expected a list of 1 to 64 input specs, got \[\]"),
        (["x"], r"input 0: expected a mapping, got 'x'"),
        ([{"shape": [1] * 17}], r"at most 16 sizes"),
        # each size allowed, their product not: 3.8 million values for an 8x8 net (64 x 64 allowed)
        ([{"shape": [1, 8, 8, 60000]}], r"the inputs hold 3,840,000 values per example, more than"),
        ([{"shape": [4096]}] * 20, r"the inputs hold 81,920 values .* input_shape \[1, 8, 8\]"),
    ],
)
def test_a_gated_files_inputs_are_checked_before_any_is_drawn(
    gated, tmp_path, monkeypatch, inputs, message
):
    never_drawn(monkeypatch)
    path = mutated(gated, tmp_path, lambda p: p.__setitem__("inputs", inputs))
    with pytest.raises(CheckpointError, match=rf"bad\.pt: inputs record.*{message}"):
        compressdrop.load_model(path)


def test_an_older_files_input_shape_is_checked_too(gated, tmp_path, monkeypatch):
    never_drawn(monkeypatch)

    def shapes(shape):
        return lambda p: (p.pop("inputs"), p.__setitem__("input_shape", shape))

    with pytest.raises(CheckpointError, match=r"input_shape record, input 0: shape .*\[1, -8, 8\]"):
        compressdrop.load_model(mutated(gated, tmp_path, shapes([[1, -8, 8]])))
    with pytest.raises(CheckpointError, match=r"a gated checkpoint without its inputs record"):
        compressdrop.load_model(mutated(gated, tmp_path, shapes(None)))
    monkeypatch.undo()
    ok = compressdrop.load_model(mutated(gated, tmp_path, shapes([[1, 8, 8]])))
    assert ok(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_file_without_an_arch_input_shape_gets_the_fixed_bound(gated, tmp_path, monkeypatch):
    never_drawn(monkeypatch)

    def change(p):
        p["arch"].pop("input_shape")
        p["inputs"] = [{"shape": [1, 8, 8, (1 << 18) + 1]}]  # 2**24 + 64 values

    with pytest.raises(CheckpointError, match=r"16,777,280 values per example, more than the 16,"):
        compressdrop.load_model(mutated(gated, tmp_path, change))


def test_the_cli_says_a_bad_inputs_record_in_one_line(gated, tmp_path):
    path = mutated(gated, tmp_path, lambda p: p.__setitem__("inputs", [{"shape": [1, 8, 8, 1e9]}]))
    res = CliRunner().invoke(main, ["eval", str(path), "--data", "digits"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and "inputs record, input 0: shape" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
