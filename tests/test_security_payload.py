"""A checkpoint's records are checked before anything is built from them: a gated file's input
specs (3 GB drawn for ``[1, 8, 8, 6000000]``), a slim file's noise record (5 GB of gates for
400,000,000 units) and every other record ``load_model`` reads, each refused in one line naming
the record instead of a raw ``KeyError`` or ``TypeError``."""

import copy

import numpy as np
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

    monkeypatch.setattr("compressdrop._reattach.random_inputs", drawn)


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


@pytest.fixture(scope="module")
def slim_mc(tmp_path_factory):
    """A slim LeNet-300-100 whose kept units keep their noise (a ``noise`` record)."""
    path = tmp_path_factory.mktemp("payload") / "slim_mc.pt"
    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    compressdrop.attach(net, gate="lognormal")
    save_model(compressdrop.keep_noise(net, compressdrop.prune(net)), path)
    return torch.load(path, weights_only=True)


def never_noisy(monkeypatch):
    """Make building a slim model's noisy sites fail the test."""

    def built(*args, **kwargs):
        raise AssertionError("gates were built from a record that should have been refused")

    monkeypatch.setattr("compressdrop.checkpoint.put_noise", built)


def entry(i, **change):
    return lambda p: p["noise"][i].update(change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # 400 million units: 5 GB of gates before the weights were compared
        (
            entry(0, units=400_000_000),
            r"entry 0: 400,000,000 units do not fit the file's weights "
            r"\(1\.gate\.mu is \[300\], \[400000000\] for 400,000,000 units\)",
        ),
        (entry(0, units=-1), r"entry 0: units must be a positive integer, got -1"),
        (entry(0, units="300"), r"entry 0: units must be a positive integer, got '300'"),
        (entry(0, kwargs={"low": "x"}), r"entry 0: gate_kwargs\['low'\]: expected a number"),
        (entry(0, kwargs={"bogus": 1}), r"entry 0: gate_kwargs\['bogus'\]: unknown argument"),
        (entry(0, kwargs=[1]), r"entry 0: kwargs must be a mapping, got \[1\]"),
        (entry(0, family="nope"), r"entry 0: unknown gate family 'nope'"),
        (entry(0, family=5), r"entry 0: family must be a gate family's name, got 5"),
        (entry(0, unit_dim=10**30), r"entry 0: unit_dim must be an integer from -16 to 15"),
        (entry(0, head_dim="x"), r"entry 0: head_dim must be an integer from 1 to"),
        (entry(0, site=""), r"entry 0: site must be a layer's name, got ''"),
        (entry(0, attention=[1]), r"entry 0: attention must be a layer's name or None"),
        (entry(0, bogus=1), r"entry 0: unknown key\(s\) \['bogus'\]"),
        (entry(1, shares="zz"), r"entry 1: shares must name an earlier site that holds a gate"),
        # review 10: a list in a set lookup (a raw TypeError), a huge head size, a chain of one
        # site sharing itself (each entry wrapped it again: a raw RecursionError at 5,000)
        (entry(1, shares=["1"]), r"entry 1: shares must name an earlier site that holds a gate"),
        (entry(0, head_dim=10**30), r"entry 0: head_dim must be an integer from 1 to 1,048,576"),
        (
            lambda p: p["noise"].extend([{"site": "1", "unit_dim": -1, "shares": "1"}] * 3),
            r"entry 2: site '1' is noisy twice",
        ),
        (
            lambda p: p.__setitem__("noise", [{"site": "1"}] * 100_001),
            r": 100,001 sites, more than 100,000",
        ),
        (lambda p: p.__setitem__("noise", 5), r": expected a list of noisy sites, got 5"),
        (lambda p: p.__setitem__("noise", ["x"]), r"entry 0: expected a mapping, got 'x'"),
        (lambda p: p["state_dict"].pop("3.gate.mu"), r"entry 1: .*\(3\.gate\.mu is missing"),
    ],
)
def test_a_slim_files_noise_record_is_checked_before_any_gate_is_built(
    slim_mc, tmp_path, monkeypatch, change, message
):
    never_noisy(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"bad\.pt: noise record.*{message}"):
        compressdrop.load_model(mutated(slim_mc, tmp_path, change))


def test_the_noise_records_own_file_still_loads_and_samples(slim_mc, tmp_path):
    path = mutated(slim_mc, tmp_path, lambda p: None, "ok.pt")
    model = compressdrop.load_model(path)
    with compressdrop.uncertainty.mc_mode(model):
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_put_noise_checks_the_gate_arguments_as_attach_does():
    from compressdrop.errors import InputError
    from compressdrop.gating.noisy import put_noise

    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    record = [{"site": "1", "unit_dim": -1, "family": "lognormal", "units": 300,
               "kwargs": {"bogus": 1}}]  # fmt: skip
    with pytest.raises(InputError, match=r"gate_kwargs\['bogus'\]: unknown argument"):
        put_noise(net, record)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    """A slim LeNet-300-100 (a ``prune_report`` record), as ``torch.load`` reads its file."""
    path = tmp_path_factory.mktemp("payload") / "slim.pt"
    net = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    compressdrop.attach(net, gate="lognormal")
    save_model(compressdrop.prune(net), path)
    return torch.load(path, weights_only=True)


def never_built(monkeypatch):
    """Make building any model fail the test: the records are checked first."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built from a file that should have been refused")

    monkeypatch.setattr("compressdrop.checkpoint.build_arch", built)
    monkeypatch.setattr("compressdrop.checkpoint.check_state_fits", built)


def put(key, value):
    return lambda p: p.__setitem__(key, value)


def pop(key):
    return lambda p: p.pop(key)


def attach_arg(key, value):
    return lambda p: p["attach"].__setitem__(key, value)


def report(key, value):
    return lambda p: p["prune_report"].__setitem__(key, value)


# the fuzzer's mutations that gave a raw KeyError, TypeError, AttributeError or ValueError
CASES = {
    "gated": [
        (pop("attach"), r"a gated checkpoint without its attach record"),
        (put("attach", [1]), r"attach record: expected a mapping, got \[1\]"),
        (attach_arg("bogus", 1), r"attach record: \['bogus'\] not among attach's \['gate', "),
        (attach_arg("example_inputs", [1]), r"attach record: \['example_inputs'\] not among"),
        (attach_arg("gate", 5), r"attach record: gate must be one of \('lognormal', .* got 5"),
        # review 10: numpy arrays (the loader's stand-ins make them) in a lookup: a raw
        # ValueError (no truth value), or one of one passed and failed later
        (attach_arg("gate", np.array(["lognormal"] * 2)), r"attach record: gate must be one of"),
        (attach_arg("gate", np.array(["lognormal"])), r"attach record: gate must be one of"),
        (
            lambda p: p["inputs"][0].__setitem__("dtype", np.array(["float32"])),
            r"input 0: dtype must be one of",
        ),
        (attach_arg("granularity", "x"), r"attach record: granularity must be one of \('auto'"),
        (attach_arg("kl_cost", None), r"attach record: kl_cost must be one of .* got None"),
        (attach_arg("include", [5]), r"attach record: include must be a name glob or a list"),
        (attach_arg("exclude", {"a": 1}), r"attach record: exclude must be a name glob"),
        (attach_arg("kl_scale", "x"), r"attach record: kl_scale must be a mapping, got 'x'"),
        (attach_arg("kl_scale", {"head": "x"}), r"attach record: kl_scale\['head'\] must be a"),
        (attach_arg("gate_kwargs", [1]), r"attach record: gate_kwargs must be a mapping"),
        (attach_arg("gate_kwargs", {"bogus": 1}), r"attach record: gate_kwargs\['bogus'\]: unkn"),
        (lambda p: (p.pop("inputs"), p.pop("input_shape")), r"without its inputs record"),
    ],
    "slim": [
        (pop("prune_report"), r"a slim checkpoint without its prune_report record"),
        (put("prune_report", []), r"prune_report record: expected a mapping, got list"),
        (put("prune_report", {"history": []}), r"prune_report record: missing \['family', "),
        (report("family", 5), r"prune_report record: family must be a gate family's name"),
        (report("threshold", "x"), r"prune_report record: threshold must be a number or None"),
        (report("uniform", "yes"), r"prune_report record: uniform must be true or false"),
        (report("layers", {}), r"prune_report record: layers must be a list, got \{\}"),
        (report("layers", [{"name": "1"}]), r"prune_report record: layers\[0\] is not a name"),
        (report("history", {}), r"prune history: expected a list, got dict"),
        (put("slim_program", "yes"), r"slim_program must be true or false, got 'yes'"),
    ],
    "dense": [
        (pop("arch"), r"arch record \(the model's structure\): expected a mapping, got None"),
        (put("arch", "lenet300"), r"arch record .*: expected a mapping, got 'lenet300'"),
        (put("state_dict", [1]), r"state_dict record: expected a mapping of names to tensors"),
        (pop("state_dict"), r"state_dict record: expected a mapping .* got None"),
        (lambda p: p["state_dict"].__setitem__("x", 1), r"state_dict record: 'x' holds 1, not"),
        (put("meta", [1]), r"meta record: expected a mapping with string keys, got \[1\]"),
        (put("recipe", [1]), r"recipe record: expected a mapping with string keys, got \[1\]"),
        (put("recipe", {"data": "x"}), r"recipe record's data: expected a mapping with string"),
        (put("recipe", {"prune": [1]}), r"recipe record's prune: expected a mapping"),
        (put("kind", [1]), r"unknown checkpoint kind \[1\]"),
        (put("kind", np.array(["dense"] * 2)), r"unknown checkpoint kind a ndarray"),
        (put("kind", np.array(["dense"])), r"unknown checkpoint kind a ndarray"),
        (put("format_version", np.array([1, 1])), r"checkpoint format version a ndarray is not"),
        (put("classes", [1, 2]), r"classes record: expected a list of names, got \[1, 2\]"),
        (put("classes", "cat"), r"classes record: expected a list of names, got 'cat'"),
        # the names become files of a slim folder: only the tokenizer files' own names
        (put("tokenizer", {"../x": torch.zeros(1, dtype=torch.uint8)}), r"'\.\./x' is not a"),
        (put("tokenizer", {"tokenizer.json": b"{}"}), r"tokenizer\.json is not bytes"),
        (put("tokenizer", {"vocab.txt": torch.zeros(3)}), r"vocab\.txt is not bytes"),
        (put("tokenizer", [1]), r"tokenizer record: expected a mapping, got \[1\]"),
    ],
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("payload") / "dense.pt"
    save_model(build_model("lenet300", input_shape=(1, 8, 8), num_classes=10), path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [(kind, change, message) for kind, cases in CASES.items() for change, message in cases],
)
def test_every_record_load_model_reads_is_checked_before_anything_is_built(
    request, tmp_path, monkeypatch, kind, change, message
):
    never_built(monkeypatch)
    path = mutated(request.getfixturevalue(kind), tmp_path, change)
    with pytest.raises(CheckpointError, match=rf"^\S*bad\.pt: .*{message}") as info:
        compressdrop.load_model(path)
    assert "\n" not in str(info.value)


def test_the_attach_record_takes_attachs_own_arguments():
    """ATTACH_ARGS are attach's parameters but the model, its example inputs and the layers
    of its gates (only_sites: the file's sites record, checked by check_sites): a new parameter
    of attach must be checked too before a file may give it."""
    import inspect

    from compressdrop.payload import ATTACH_ARGS

    params = set(inspect.signature(compressdrop.attach).parameters)
    assert set(ATTACH_ARGS) == params - {"model", "example_inputs", "only_sites"}


def test_the_files_compressdrop_writes_load_as_before(gated, slim, slim_mc, dense, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    for name, payload in {"gated": gated, "slim": slim, "mc": slim_mc, "dense": dense}.items():
        model = compressdrop.load_model(mutated(payload, tmp_path, lambda p: None, f"{name}.pt"))
        assert model(x).shape == (2, 10)
    with_classes = mutated(dense, tmp_path, put("classes", [str(i) for i in range(10)]), "c.pt")
    assert compressdrop.load_model(with_classes).class_names == tuple(map(str, range(10)))


def test_the_cli_says_a_bad_record_in_one_line(slim, tmp_path):
    path = mutated(slim, tmp_path, report("layers", [{"name": "1"}]))
    res = CliRunner().invoke(main, ["eval", str(path), "--data", "digits"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and "prune_report record: layers[0]" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_a_dense_record_without_its_numbers_is_no_reference_for_the_sweep(gated, tmp_path):
    """``meta: {dense: {dataset: digits}}`` crashed ``sweep`` with a raw KeyError after it had
    written sweep.csv and sweep.json: such a record is now no reference, and the sweep runs."""
    path = mutated(
        gated, tmp_path, lambda p: p.__setitem__("meta", {"dense": {"dataset": "digits"}})
    )
    out = tmp_path / "sweep"
    args = ["sweep", str(path), "--data", "digits", "-t", "1", "-o", str(out), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert '"dense": null' in result.output


def test_a_tokenizer_record_is_bounded_as_a_whole(dense, tmp_path, monkeypatch):
    """Each file is under the bound, together they are over it (the bound made small here)."""
    monkeypatch.setattr("compressdrop.payload.TOKENIZER_BYTES", 10 << 20)
    files = {n: torch.zeros(6 << 20, dtype=torch.uint8) for n in ("vocab.txt", "merges.txt")}
    path = mutated(dense, tmp_path, put("tokenizer", files))
    with pytest.raises(CheckpointError, match=r"bad\.pt: tokenizer record: over 10 MiB"):
        compressdrop.load_model(path)
