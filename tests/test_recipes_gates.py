"""A recipe's gates section: ``gates.kwargs`` checked when the recipe is loaded, and a gate plan
that selects nothing refused before any training (a new-user walk found both failing only after
the pretrain stage, with a raw TypeError or a message that did not name the cause)."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gates import GATES
from compressdrop.recipes import Recipe, load_recipe
from compressdrop.training.runner import run_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        ("lognormal", {"init_log_sigma": -4, "low": -10.0, "noise": "batch"}),
        ("variational", {"init_log_sigma2": -6.0}),
        ("concrete", {"init_drop": 0.2, "inverted": True, "temperature": 0.2}),
        ("hardconcrete", {"init_drop": 0.3, "penalty": 5}),
    ],
)
def test_valid_gate_kwargs_load_round_trip_and_leave_the_random_state(tmp_path, family, kwargs):
    p = tmp_path / "kw.yaml"
    p.write_text(yaml.safe_dump({"gates": {"family": family, "kwargs": kwargs}}))
    state = torch.get_rng_state()
    r = load_recipe(p)  # building the check's gate draws no number from the global generator
    assert torch.equal(torch.get_rng_state(), state)
    assert r.gates.kwargs == kwargs
    assert Recipe.from_dict(r.to_dict()) == r


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e1` (no dot) as a string, and `gates.kwargs` refused `penalty: 1e1` with
    "expected a number, got '1e1'"; the typed fields had a workaround, the free-form ones not."""
    p = tmp_path / "e.yaml"
    p.write_text(
        "gates: {family: hardconcrete, kwargs: {penalty: 1e1, init_drop: 25E-2},"
        " kl_scale: {neuron: 2e0}}\nkl: {beta: 3.2e+1}\nstages: {pretrain: {lr: 1e-3}}\n"
        "name: '1e3'\n"
    )
    r = load_recipe(p)
    assert r.gates.kwargs == {"penalty": 10.0, "init_drop": 0.25}
    assert r.gates.kl_scale == {"neuron": 2.0} and r.kl.beta == 32.0
    assert r.stages.pretrain.lr == 0.001 and r.name == "1e3"  # quoted: still a string


def test_the_readme_documents_each_familys_gate_kwargs():
    from compressdrop.gates import gate_parameters

    text = README.read_text().replace("\n  ", " ")  # a list item's continuation lines
    for family, cls in GATES.items():
        line = next((s for s in text.splitlines() if s.startswith(f"- `{family}`:")), None)
        assert line is not None, f"README: no line on the {family} family's gates.kwargs"
        assert set(re.findall(r"`(\w+)`", line)[1:]) == set(gate_parameters(cls)), line


def _recipe(gates: dict) -> Recipe:
    return Recipe.from_dict(
        {
            "name": "walk",
            "gates": gates,
            "stages": {s: {"epochs": 1} for s in ("pretrain", "sparsify", "finetune")},
            "export": {"onnx": False},
        }
    )


@pytest.fixture(scope="module")
def digits():
    from compressdrop.data import load_dataset

    return load_dataset("digits").subset(200, 40)


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        ({"include": ["fc*"]}, r"include pattern 'fc\*' matches none of .* \('1' \(Linear\), '3'"),
        ({"granularity": "head"}, r"granularity 'head' asks for head units.* neuron units only"),
        ({"exclude": ["*"]}, r"exclude '\*' takes every gateable layer"),
    ],
)
def test_a_recipe_that_gates_nothing_fails_before_any_training(tmp_path, digits, gates, message):
    events: list[dict] = []
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"recipe 'walk', gates: nothing to gate: {message}"):
        run_recipe(_recipe(gates), digits, out, device="cpu", progress=events.append)
    assert events == []  # not one epoch trained
    assert not (out / "checkpoint.pt").exists() and not out.exists()


def test_a_kl_scale_key_that_names_nothing_fails_before_any_training(tmp_path, digits):
    events: list[dict] = []
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"'heads' is not a unit kind .* matches no gated layer"):
        run_recipe(_recipe({"kl_scale": {"heads": 4}}), digits, out, device="cpu",
                   progress=events.append)  # fmt: skip
    assert events == [] and not out.exists()


def test_a_kl_scale_kind_the_model_lacks_is_warned_about_once_before_training(tmp_path, digits):
    events: list[tuple[dict, int]] = []
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run_recipe(
            _recipe({"kl_scale": {"head": 4}}),
            digits,
            tmp_path / "out",
            device="cpu",
            progress=lambda e: events.append((e, len(said))),
        )
    ours = [w for w in said if "kl_scale['head'] matches no gated unit" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is cd.GatingWarning
    first_stage, warned_by_then = events[0]
    assert first_stage["stage"] == "pretrain" and warned_by_then >= 1
