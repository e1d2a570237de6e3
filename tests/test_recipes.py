"""Recipes: every shipped recipe validates and round-trips; bad input names the key path."""

import warnings
from pathlib import Path

import pytest
import yaml

import compressdrop as cd
import compressdrop.recipes
from compressdrop.recipes import (
    Recipe,
    RecipeError,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_path,
)


def test_recipes_ship_for_every_family_and_net():
    names = set(list_recipes())
    for net in ("lenet300", "lenet5"):
        for family in ("lognormal", "variational", "concrete", "hardconcrete"):
            assert f"{net}-{family}" in names
    assert {"vgg-lognormal", "resnet-lognormal"} <= names


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipe_round_trips(name, tmp_path):
    r = load_recipe(name)
    assert r.name == name
    assert Recipe.from_dict(yaml.safe_load(dump_recipe(r))) == r
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"stages": {"sparsify": {"lr": "fast"}}}, "stages.sparsify.lr: expected a number"),
        ({"stages": {"sparsify": {"epochs": 0}}}, "stages.sparsify.epochs"),
        ({"stages": {"finetune": {"lr": -1}}}, "stages.finetune.lr: must be > 0"),
        ({"gates": {"family": "gaussianish"}}, "gates.family: unknown family"),
        ({"gates": {"granularity": "weight"}}, "gates.granularity"),
        ({"gates": {"include": "conv*"}}, "gates.include: expected a list"),
        ({"kl": {"beta": -1}}, "kl.beta: must be a number"),
        ({"kl": {"warmpu": 3}}, "kl.warmpu: unknown key"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"data": {"batch_size": 0}}, "data.batch_size: must be ≥ 1"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
        ({"prune": {"threshold": -0.5}}, "prune.threshold"),
        ({"export": {"onnx": "yes"}}, "export.onnx: expected true/false"),
        ({"seed": 1.5}, "seed: expected an integer"),
        ({"stages": {"pretrain": {"optimizer": "lbfgs"}}}, "stages.pretrain.optimizer"),
        ({"gates": {"kl_scale": {3: 2}}}, "gates.kl_scale: a key is a unit kind"),
        ({"gates": {"kl_scale": {"head": 0}}}, "gates.kl_scale: kl_scale['head'] must be positive"),
        ({"gates": {"kl_scale": {"head": "x"}}}, "gates.kl_scale: kl_scale['head'] must be a num"),
        # gates.kwargs: the names against the family's constructor, the values by building a gate
        (
            {"gates": {"family": "hardconcrete", "kwargs": {"lam": 3}}},
            "gates.kwargs.lam: unknown argument (hardconcrete gates accept init_drop=0.5, "
            "penalty=10.0, noise='example')",
        ),
        (
            {"gates": {"family": "hardconcrete", "kwargs": {"penalty": "ten"}}},
            "gates.kwargs.penalty: expected a number, got 'ten'",
        ),
        (
            {"gates": {"family": "hardconcrete", "kwargs": {"init_drop": 1.5}}},
            "gates.kwargs.init_drop: init_drop must be in (0, 1), got 1.5",
        ),
        ({"gates": {"kwargs": {"init_drop": 0.5}}}, "gates.kwargs.init_drop: unknown argument"),
        ({"gates": {"kwargs": {"low": -5, "high": -10}}}, "gates.kwargs.low: low must be < high"),
        (
            {"gates": {"family": "concrete", "kwargs": {"inverted": "no"}}},
            "gates.kwargs.inverted: expected true/false",
        ),
        (
            {"stages": {"finetune": {"lr_schedule": "linear"}}},
            "stages.finetune.lr_schedule: must be one of constant, cosine, got 'linear'",
        ),
    ],
)
def test_bad_values_name_the_file_and_key_path(tmp_path, patch, message):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(patch))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert str(p) in str(err.value)
    assert message in str(err.value)


def test_malformed_yaml_reports_its_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nstages:\n  sparsify: {epochs: 3\n  finetune: 2\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: invalid YAML at line \d+, column \d+"):
        load_recipe(p)


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="lenet300-lognormal"):
        load_recipe("no-such-recipe")


def test_shipped_recipes_are_package_data_and_a_users_own_file_is_taken_as_is(tmp_path):
    shipped = recipe_path("lenet300-lognormal")
    assert shipped.is_file()
    assert shipped.parent == Path(compressdrop.recipes.__file__).parent / "shipped"
    own = tmp_path / "mine.yaml"
    own.write_text(dump_recipe(load_recipe("lenet300-lognormal").replace(name="mine")))
    assert recipe_path(own) == own and recipe_path(str(own)) == own
    assert load_recipe(own).name == "mine"
    with pytest.raises(RecipeError, match="not a shipped recipe"):  # names only, not paths
        recipe_path("../shipped/lenet300-lognormal")


def test_scientific_notation_without_dot_is_a_number():
    r = Recipe.from_dict({"stages": {"sparsify": {"lr": "1e-3"}}})
    assert r.stages.sparsify.lr == pytest.approx(1e-3)


def test_a_cosine_stage_lowers_its_rates_step_by_step_towards_zero(tmp_path):
    """`lr_schedule: cosine` (new): both rates follow ½·(1 + cos(π·done)) within the stage; a
    constant stage keeps its rate. The history records each epoch's last rate."""
    from compressdrop.data import load_digits
    from compressdrop.recipes.schedule import lr_factor
    from compressdrop.training.runner import run_recipe

    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("constant", 0.7) == 1.0
    r = Recipe.from_dict(
        {
            "model": {"arch": "lenet300"},
            "data": {"name": "digits", "batch_size": 256},
            "stages": {
                "pretrain": {"epochs": 2, "lr": 0.002},
                "sparsify": {"epochs": 2, "lr": 0.001, "gate_lr": 0.01, "lr_schedule": "cosine"},
                "finetune": {"epochs": 1, "lr": 0.0003},
            },
            "export": {"onnx": False},
        }
    )
    digits = load_digits()
    report = run_recipe(r, digits, tmp_path / "out", device="cpu").report
    lrs = {(h["stage"], h["epoch"]): h["lr"] for h in report["history"]}
    train, _ = digits.split_validation(r.data.val_fraction, seed=r.seed)  # as the runner splits
    steps = -(-len(train.x_train) // 256)
    assert lrs["pretrain", 1] == lrs["pretrain", 2] == 0.002
    for epoch in (1, 2):  # the rate of the epoch's last step: done = (epoch − 1/steps) / 2
        done = (epoch - 1 / steps) / 2
        assert lrs["sparsify", epoch] == pytest.approx(0.001 * lr_factor("cosine", done))
    assert 0 < lrs["sparsify", 2] < lrs["sparsify", 1] < 0.001 and lrs["finetune", 1] == 0.0003


# --- every shipped recipe runs -----------------------------------------------------------------------


def _slice_of(name: str, tmp_path):
    """A small slice of the recipe's data: the real files when installed, else IDX files of the same
    format and shape written here (CI machines need not have Debian's dataset-fashion-mnist)."""
    import os

    from compressdrop.data import FASHION_MNIST_DIR, load_dataset

    if name.startswith("fashion-mnist") and not os.path.isdir(FASHION_MNIST_DIR):
        from .test_data_models import _fake_fmnist

        _fake_fmnist(tmp_path, n_train=200, n_test=40)
        name = f"fashion-mnist:{tmp_path}"
    if name.startswith("text:") and not Path(name[5:].split(",")[0]).exists():
        from .test_text_lm import _corpus  # the Python standard library of another version

        name = f"text:{_corpus(tmp_path / 'corpus')},context=32"
    if name.startswith("text:"):  # windows of 128 bytes: 64 are 8,192 tokens
        return load_dataset(name).subset(64, 16)
    return load_dataset(name).subset(200, 40)


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipe_runs_one_short_epoch_per_stage(name, tmp_path):
    from compressdrop.checkpoint import load_model
    from compressdrop.recipes import StageConfig
    from compressdrop.training.runner import run_recipe

    r = load_recipe(name)
    one = {
        s: StageConfig(**{**vars(getattr(r.stages, s)), "epochs": 1})
        for s in ("pretrain", "sparsify", "finetune")
    }
    r = r.replace(
        stages=type(r.stages)(**one), export=type(r.export)(onnx=name == "lenet300-lognormal")
    )
    with warnings.catch_warnings():
        if r.model.arch in ("hf-causal-lm", "vit"):  # a transformer's residual stream stays
            warnings.filterwarnings("ignore", ".*LayerNorm", cd.GatingWarning)  # ungated, and
            # GPT2Config cannot describe pruned heads (the slim model is kept as .pt/.pt2/ONNX)
            warnings.filterwarnings("ignore", ".*cannot describe heads", cd.PruningWarning)
        result = run_recipe(r, _slice_of(r.data.name, tmp_path), tmp_path / "out", device="cpu")
    assert result.slim_path.exists() and result.gated_path.exists()
    assert (result.onnx_path is not None) == (name == "lenet300-lognormal")
    slim = load_model(result.slim_path)
    assert slim.prune_report.family == r.gates.family
    assert result.report["history"][-1]["stage"] == "finetune"


def test_override_replaces_by_key_path_and_keeps_every_other_field():
    from compressdrop.recipes import RecipeError

    r = load_recipe("lenet300-lognormal")
    o = r.override({"data.name": "fashion-mnist", "stages.sparsify.epochs": 3, "seed": 7})
    assert (o.data.name, o.stages.sparsify.epochs, o.seed) == ("fashion-mnist", 3, 7)
    assert o.data.batch_size == r.data.batch_size  # not reset to the default
    assert o.stages.sparsify.gate_lr == r.stages.sparsify.gate_lr
    assert r.data.name == "digits"  # the original is unchanged
    with pytest.raises(RecipeError, match=r"data\.colour: unknown key"):
        r.override({"data.colour": "blue"})
    with pytest.raises(RecipeError, match="batch_size"):
        r.override({"data.batch_size": 0})  # the nested config validates again


def test_an_empty_recipe_file_is_an_error_not_the_default_recipe(tmp_path):
    from compressdrop.recipes import RecipeError

    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")


def test_the_default_recipe_warns_where_the_gates_get_too_few_steps():
    """38 images at the default batch of 64 were one optimiser step an epoch, capped at 60
    epochs: ResNet-18 ran 282 s and removed nothing, without a word. Now a DataWarning gives the
    numbers and what to change; the full digits (23 steps an epoch, 1,380 steps) gets none."""
    from dataclasses import replace

    from compressdrop.data import DataWarning, load_dataset
    from compressdrop.workflows import default_recipe_for

    digits = load_dataset("digits")
    tiny = replace(digits, x_train=digits.x_train[:38], y_train=digits.y_train[:38])
    with pytest.warns(DataWarning) as said:
        r = default_recipe_for(tiny)
    text = str(said[0].message)
    assert r.stages.sparsify.epochs == 60  # the recipe itself is unchanged
    assert "38 training examples at batch size 64 are 1 step(s) per epoch" in text
    assert "60 steps, about 57 at the full KL weight" in text
    assert "about 650 such steps at gate_lr 0.01" in text
    assert "`data: {batch_size: 3}`" in text and "`stages: {sparsify: {epochs: 653}}`" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default_recipe_for(digits)


def test_the_steps_the_warning_asks_for_are_what_a_gate_needs_to_reach_snr_1():
    """The number behind that warning: a log-normal gate from its init, pulled by the KL alone
    (no data holding it) with Adam at the default gate_lr, crosses SNR 1 near 650 steps, not
    in the 60 a tiny data set gave."""
    import math

    import torch

    from compressdrop.gates import LogNormalGate
    from compressdrop.workflows.sparsify import _GATE_TRAVEL

    lr = load_recipe("lenet300-lognormal").stages.sparsify.gate_lr
    need = math.ceil(_GATE_TRAVEL / lr)
    gate = LogNormalGate(1)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    snr = {}
    for step in range(1, need + 1):
        opt.zero_grad()
        gate.kl().backward()
        opt.step()
        gate.clear_cache()
        snr[step] = gate.snr().item()
    assert snr[60] > 50 and snr[int(0.9 * need)] > 1 > snr[need]
