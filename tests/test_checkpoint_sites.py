"""A gated checkpoint records where its gates sit (its ``sites`` record), and loading puts back
those gates, not whatever the gates' plan finds now: a compressdrop that gates one more layer type
than the one that wrote the file still loads it, and a recorded layer that cannot be gated any
more is an error naming it, not a state_dict that does not fit.

A change of plan is simulated honestly: the planner of "another version" refuses a layer type
(its layer spec's ``why_not``, the way a layer is left ungated with a GatingWarning), or does not
find attention heads."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.checkpoint import CheckpointError, load_model, save_model
from compressdrop.gating import gate_sites, registry, sites
from compressdrop.models import build_model

from .test_surgery import random_gates_

NOT_YET = "not gateable in this version"


def _refused(own: Callable, which: Callable) -> Callable:
    return lambda m: NOT_YET if which(m) else own(m)


@contextlib.contextmanager
def refusing(*types: type, which: Callable[[nn.Module], bool] = lambda m: True):
    """The planner of a compressdrop that cannot gate the layers of ``types`` that ``which``
    picks (each is left ungated with a GatingWarning that says so)."""
    saved = {t: registry._SPECS[t] for t in types}
    for t, spec in saved.items():
        registry._SPECS[t] = dataclasses.replace(spec, why_not=_refused(spec.why_not, which))
    try:
        yield
    finally:
        registry._SPECS.update(saved)


def _lenet5() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5", (1, 28, 28), 10)


def _gated_lenet5(*refused: type) -> nn.Module:
    """A gated LeNet-5 (gates spread apart: units differ), attached by a planner that refuses
    ``refused``."""
    model = _lenet5()
    with refusing(*refused), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cd.attach(model)
    assert all(NOT_YET in str(w.message) for w in said), [str(w.message) for w in said]
    return random_gates_(model).eval()


def _layers(model: nn.Module) -> list[str]:
    return [name for name, _ in sites(model)]


def test_a_plan_that_gates_more_now_puts_back_the_files_gates(tmp_path):
    """Written where Linear layers were left ungated, loaded where they are gated: the old
    loader planned a gate on ``classifier.1`` the file does not hold (weights that do not fit)."""
    model = _gated_lenet5(nn.Linear)
    assert _layers(model) == ["features.0", "features.3"]
    assert "classifier.1" in _layers(cd.attach(_lenet5()))  # the plan now gates more
    save_model(model, tmp_path / "g.pt")
    back = load_model(tmp_path / "g.pt")  # quiet: filterwarnings=error
    assert _layers(back) == _layers(model)
    assert gate_sites(back) == gate_sites(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x), rtol=0, atol=0)
    save_model(back, tmp_path / "again.pt")  # saved again: the same record
    assert torch.load(tmp_path / "again.pt", weights_only=True)["sites"] == gate_sites(model)


@pytest.mark.parametrize(
    "refused, gone",
    [
        ((nn.Linear,), "'classifier.1'"),
        ((nn.Conv2d, nn.Linear), "'classifier.1', 'features.3', 'features.0'"),  # nothing left
    ],
)
def test_a_recorded_gate_that_cannot_be_put_back_is_named(tmp_path, refused, gone):
    model = _gated_lenet5()
    save_model(model, tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    raw["compressdrop_version"] = "0.0.1"
    torch.save(raw, tmp_path / "old.pt")
    for path, cause in [
        (tmp_path / "g.pt", "the plan of the gates changed since the file was written"),
        (tmp_path / "old.pt", "written by compressdrop 0.0.1, whose plan of the gates differs"),
    ]:
        with refusing(*refused), pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert message.startswith(f"{path}: the file's gates cannot be put back as they were: ")
        assert f"recorded but not gated now: {gone};" in message
        assert cause in message and f"left ungated: {NOT_YET}" in message  # the plan's reason
        assert "do not fit" not in message and "\n" not in message


def test_gates_planned_otherwise_now_are_named(tmp_path):
    """A recorded gate whose units the plan now counts otherwise: said, with both counts."""
    model = _gated_lenet5()
    save_model(model, tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    gate = next(g for g in raw["sites"] if g["layers"] == ["features.0"])
    gate["units"] = 12
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot be put back") as info:
        load_model(tmp_path / "other.pt")
    assert (
        "gated otherwise now: 'features.0' (recorded: 12 channel units on 'features.0'; now: 20 "
        "channel units on 'features.0')"
    ) in str(info.value)


GATE = {"layers": ["features.0"], "kind": "channel", "units": 20}


@pytest.mark.parametrize(
    "record, message",
    [
        ("features.0", r"sites record: expected a list of 1 to \d+ gates .* got 'features.0'"),
        ([], r"sites record: expected a list of 1 to \d+ gates"),
        (["features.0"], r"sites record, gate 0: expected a mapping, got 'features.0'"),
        ([{**GATE, "layers": "features.0"}], r"gate 0: layers must be a list of layer names"),
        ([{**GATE, "layers": []}], r"gate 0: layers must be a list of layer names"),
        ([{**GATE, "layers": [3]}], r"gate 0: layers must be a list of layer names, got \[3\]"),
        ([{**GATE, "layers": ["features.9"]}], r"layer 'features.9' has no gate in the state_dict"),
        ([{**GATE, "layers": ["classifier.3"]}], r"'classifier.3' has no gate in the state_dict"),
        ([GATE, GATE], r"gate 1: layer 'features.0' is in an earlier gate too"),
        ([{**GATE, "kind": "row"}], r"gate 0: kind must be one of .* got 'row'"),
        ([{**GATE, "units": "20"}], r"gate 0: units must be an integer ≥ 1, got '20'"),
        ([{**GATE, "units": True}], r"gate 0: units must be an integer ≥ 1, got True"),
        ([{**GATE, "units": 0}], r"gate 0: units must be an integer ≥ 1, got 0"),
        ([{**GATE, "head_dim": 4}], r"gate 0: expected the keys .* unknown: \['head_dim'\]"),
        ([{"layers": ["features.0"], "kind": "channel"}], r"gate 0: .* missing: \['units'\]"),
    ],
)
def test_a_malformed_sites_record_is_refused_before_any_model_is_built(
    tmp_path, monkeypatch, record, message
):
    save_model(_gated_lenet5(), tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    raw["sites"] = record
    torch.save(raw, tmp_path / "bad.pt")

    def built(*args, **kwargs):
        raise AssertionError("a model was built from a file whose records were refused")

    monkeypatch.setattr("compressdrop.checkpoint.build_arch", built)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(tmp_path / "bad.pt")
    assert str(info.value).startswith(f"{tmp_path / 'bad.pt'}: sites record")


def test_a_file_without_a_sites_record_is_planned_from_its_attach_record(tmp_path):
    """A file written before the sites were recorded loads as it always did (the record is
    optional, the format version the same): its gates are planned afresh, so a plan that gates
    more now does not fit its weights, as before."""
    model = _gated_lenet5()
    save_model(model, tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    assert raw["format_version"] == 1 and raw["sites"] == gate_sites(model)
    del raw["sites"]
    torch.save(raw, tmp_path / "old.pt")
    back = load_model(tmp_path / "old.pt")
    assert gate_sites(back) == gate_sites(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x), rtol=0, atol=0)
    fewer = _gated_lenet5(nn.Linear)
    save_model(fewer, tmp_path / "fewer.pt")
    raw = torch.load(tmp_path / "fewer.pt", weights_only=True)
    del raw["sites"]
    torch.save(raw, tmp_path / "fewer_old.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "fewer_old.pt")


class GlobNamed(nn.Module):
    """A net whose layers' names hold glob metacharacters (a ModuleDict's keys)."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.layers = nn.ModuleDict(
            {
                "conv[0]": nn.Conv2d(input_shape[0], 6, 3, padding=1),
                "conv*": nn.Conv2d(6, 8, 3, padding=1),
                "fc[0]": nn.Linear(8, 16),
                "out": nn.Linear(16, num_classes),
            }
        )
        self.arch = {
            "factory": f"tests.test_checkpoint_sites:{type(self).__name__}",
            "input_shape": list(input_shape),
            "num_classes": num_classes,
            "kwargs": {},
        }

    def forward(self, x):
        x = torch.relu(self.layers["conv*"](torch.relu(self.layers["conv[0]"](x))))
        return self.layers["out"](torch.relu(self.layers["fc[0]"](x.mean(dim=(2, 3)))))


cd.add_safe_factories([GlobNamed])


def test_layers_named_like_globs_are_put_back_by_their_names(tmp_path):
    """Recorded layer names are matched as names: ``fc[0]`` as a glob matches ``fc0``, not
    itself, and ``conv*`` would match ``conv[0]`` too."""
    torch.manual_seed(0)
    model = GlobNamed()
    with refusing(nn.Conv2d), pytest.warns(cd.GatingWarning, match=NOT_YET):
        cd.attach(model)
    random_gates_(model).eval()
    assert _layers(model) == ["layers.fc[0]"]
    assert _layers(cd.attach(GlobNamed())) == ["layers.conv[0]", "layers.conv*", "layers.fc[0]"]
    save_model(model, tmp_path / "g.pt")
    back = load_model(tmp_path / "g.pt")
    assert gate_sites(back) == gate_sites(model)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x), rtol=0, atol=0)


def test_a_decoder_written_before_its_heads_were_gated_loads_its_own_gates(tmp_path, monkeypatch):
    """A LLaMA gated where its attention heads were not found (its MLP neurons gated alone),
    loaded where they are: the heads' gates are not planned on it."""
    transformers = pytest.importorskip("transformers")
    import compressdrop.gating.groups as groups

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "folder")
    model = load_model(tmp_path / "folder")  # (its arch record rebuilds it)
    ids = torch.randint(3, 64, (2, 12))
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream (RMSNorm)
        cd.attach(fresh, example_inputs=ids)
        with monkeypatch.context() as m:  # a version that found no heads
            m.setattr(groups, "find_heads", lambda *a, **k: ([], []))
            cd.attach(model, example_inputs=ids)
    kinds = {g["kind"] for g in gate_sites(model)}
    assert kinds == {"neuron"} and "head" in {g["kind"] for g in gate_sites(fresh)}
    random_gates_(model)
    save_model(model, tmp_path / "gated.pt")
    back = load_model(tmp_path / "gated.pt")
    assert gate_sites(back) == gate_sites(model)
    with torch.no_grad():
        want, got = model.eval()(ids).logits, back.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_resumed_run_puts_back_the_gates_its_file_records(tmp_path):
    """``train --resume`` re-attaches the recipe's gates to the template: restricted to those its
    run file records, as a gated checkpoint's are (the old runner planned them afresh, and the
    file's weights did not fit: a raw RuntimeError)."""
    from compressdrop.checkpoint import load_run_state
    from compressdrop.data import load_digits
    from compressdrop.recipes import load_recipe
    from compressdrop.training.runner import run_recipe

    from .test_cli import tiny_recipe

    path = tiny_recipe(tmp_path / "r.yaml", pretrain=0, sparsify=2, finetune=0, onnx=False)
    recipe, data, out = load_recipe(str(path)), load_digits(), tmp_path / "run"

    def stop(event):
        if event.get("event") == "epoch":
            raise KeyboardInterrupt

    # LeNet-300-100 of 8x8 digits: layers "1" (300 units) and "3" (100), "5" the output
    with refusing(nn.Linear, which=lambda m: m.out_features == 100), warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        with pytest.raises(KeyboardInterrupt):  # stopped after its first gated epoch
            run_recipe(recipe, data, out, progress=stop)
    state = load_run_state(out / "checkpoint.pt")
    assert state["stage"] == "sparsify"
    assert state["sites"] == [{"layers": ["1"], "kind": "neuron", "units": 300}]
    ckpt = out / "checkpoint.pt"
    with refusing(nn.Linear, which=lambda m: m.out_features == 300), warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        with pytest.raises(CheckpointError) as info:
            run_recipe(recipe, data, out, resume=True)
    message = str(info.value)
    assert message.startswith(f"{ckpt}: a run checkpoint: the file's gates cannot be put back")
    assert "recorded but not gated now: '1'; " in message
    result = run_recipe(recipe, data, out, resume=True)  # the planner gates "3" too now
    assert gate_sites(load_model(result.gated_path)) == state["sites"]
