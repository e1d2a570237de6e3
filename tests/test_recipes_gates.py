"""A recipe's gates section: ``gates.kwargs`` checked when the recipe is loaded (a new-user walk
found bad ones failing only after the pretrain stage, with a raw TypeError)."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from compressdrop.gates import GATES
from compressdrop.recipes import Recipe, load_recipe

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


def test_the_readme_documents_each_familys_gate_kwargs():
    from compressdrop.gates import gate_parameters

    text = README.read_text().replace("\n  ", " ")  # a list item's continuation lines
    for family, cls in GATES.items():
        line = next((s for s in text.splitlines() if s.startswith(f"- `{family}`:")), None)
        assert line is not None, f"README: no line on the {family} family's gates.kwargs"
        assert set(re.findall(r"`(\w+)`", line)[1:]) == set(gate_parameters(cls)), line
