"""Model files: gated and slim checkpoints reload without pickled code and compute the same."""

import pytest
import torch

import compressdrop as cd
from compressdrop.checkpoint import CheckpointError, load_model, save_model

from .test_surgery import gated, quantiles
from .zoo import input_for


@pytest.mark.filterwarnings("ignore::compressdrop.pruning.PruningWarning")
@pytest.mark.parametrize("name", ["lenet5", "resnet", "concat", "functional"])
def test_gated_and_slim_checkpoints_round_trip(name, tmp_path):
    model = gated(name, "hardconcrete")
    x = input_for(model, 5)
    save_model(model, tmp_path / "gated.pt", meta={"note": "x"})
    back = load_model(tmp_path / "gated.pt")
    assert cd.is_gated(back)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    slim = cd.prune(model, quantiles(model, (0.5,))[0])
    save_model(slim, tmp_path / "slim.pt")
    raw = torch.load(tmp_path / "slim.pt", weights_only=True)  # plain data only
    assert raw["kind"] == "slim" and raw["arch"] == model.arch
    again = load_model(tmp_path / "slim.pt")
    assert again.prune_report.architecture() == slim.prune_report.architecture()
    with torch.no_grad():
        torch.testing.assert_close(again(x), slim(x), rtol=0, atol=0)


def test_model_without_arch_record_cannot_be_saved(tmp_path):
    with pytest.raises(CheckpointError, match="arch"):
        save_model(torch.nn.Linear(3, 2), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_foreign_format_version_and_weights_that_do_not_fit(tmp_path):
    model = gated("lenet300")
    save_model(model, tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(tmp_path / "future.pt")
    raw["format_version"] = 1
    raw["state_dict"] = {k: v[..., :1] if v.dim() else v for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "shrunk.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "shrunk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a compressdrop checkpoint"):
        load_model(tmp_path / "other.pt")


def test_a_gated_checkpoint_loads_quietly_and_its_plan_explains_a_misfit(tmp_path):
    """The warnings of the gates' plan were given at training: loading says them only where the
    saved weights do not fit the plan (filterwarnings=error fails this test on any warning)."""
    import warnings

    from compressdrop.models import build_model

    with pytest.warns(Warning, match="LayerNorm"):  # the residual stream is left ungated
        model = cd.attach(
            build_model("vit", input_shape=(1, 28, 28)), example_inputs=torch.randn(2, 1, 28, 28)
        )
    save_model(model, tmp_path / "g.pt")
    again = load_model(tmp_path / "g.pt")  # quiet
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    name = next(k for k in raw["state_dict"] if k.endswith("gate.mu"))
    raw["state_dict"][name] = raw["state_dict"][name][:1]
    torch.save(raw, tmp_path / "misfit.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"do not fit.*the gates' plan said: .*LayerNorm"):
            load_model(tmp_path / "misfit.pt")


_LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _damaged(kind: str, tmp_path, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    noise = bytes(torch.randint(0, 256, (512,), generator=gen, dtype=torch.uint8).tolist())
    if kind == "random":
        return noise
    if kind == "legacy-header-then-noise":  # reaches torch's pickle-stream parser
        return _LEGACY_HEAD + noise
    if kind == "zip-header-then-noise":
        return b"PK\x03\x04" + noise
    save_model(gated("lenet300"), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    return good[: len(good) // 2]  # truncated


@pytest.mark.parametrize(
    "kind", ["random", "legacy-header-then-noise", "zip-header-then-noise", "truncated"]
)
@pytest.mark.parametrize("seed", range(8))
def test_damaged_files_give_a_checkpoint_error_that_says_corrupt(kind, seed, tmp_path):
    # Torch's unpickler fails on damaged streams with IndexError, KeyError, UnicodeDecodeError or
    # UnpicklingError depending on the bytes: each must become one clear CheckpointError.
    (tmp_path / "bad.pt").write_bytes(_damaged(kind, tmp_path, seed))
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_model(tmp_path / "bad.pt", trust_code=trust)


def test_pickled_object_is_refused_not_called_corrupt(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="arbitrary code") as info:
        load_model(tmp_path / "module.pt")
    assert "corrupt" not in str(info.value)
    assert isinstance(load_model(tmp_path / "module.pt", trust_code=True), torch.nn.Linear)


def test_a_trusted_pickle_whose_class_is_gone_says_so(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "gone_mod.py").write_text("import torch\n\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gone = importlib.import_module("gone_mod")
    torch.save(gone.Net(2, 2), tmp_path / "m.pt")
    monkeypatch.delitem(sys.modules, "gone_mod")
    (tmp_path / "gone_mod.py").unlink()
    importlib.invalidate_caches()
    with pytest.raises(CheckpointError, match="cannot be imported here") as info:
        load_model(tmp_path / "m.pt", trust_code=True)
    assert "corrupt" not in str(info.value)


def _run_state(**changed):
    """A run's resume file as the runner writes it (``Run.save``), with ``changed`` fields (a
    field changed to ``...`` is left out)."""
    from compressdrop.checkpoint import RUN_FORMAT

    state = {
        "format": RUN_FORMAT,
        "stage": "sparsify",
        "epoch": 1,
        "recipe": {"name": "r"},
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {}, "param_groups": []},
        "rng": torch.get_rng_state(),
        "history": [],
        "dense_metrics": None,
        "prune_info": None,
    }
    state.update(changed)
    return {k: v for k, v in state.items() if v is not ...}


@pytest.mark.parametrize(
    "changed, field",
    [
        ({"stage": "warmup"}, "stage"),
        ({"stage": ...}, "stage"),
        ({"epoch": -1}, "epoch"),
        ({"epoch": "3"}, "epoch"),
        ({"rng": torch.zeros(3)}, "rng"),
        ({"model": {"w": 3}}, "model"),
        ({"history": ...}, "history"),
        ({"prune_info": ...}, "prune_info"),
        ({"sites": "1"}, "sites record: expected a list"),
        ({"sites": [{"layers": ["w"], "kind": "neuron", "units": 2}]}, "'w' has no gate"),
    ],
)
def test_a_damaged_run_checkpoint_is_refused_with_its_field_named(tmp_path, changed, field):
    """Review 12: a resume file without its history, or with a stage the runner does not know,
    failed inside the run with a raw KeyError or ValueError."""
    from compressdrop.checkpoint import load_run_state

    path = tmp_path / "checkpoint.pt"
    torch.save(_run_state(), path)
    assert load_run_state(path)["stage"] == "sparsify"  # as the runner writes it: read
    torch.save(_run_state(**changed), path)
    with pytest.raises(CheckpointError, match=f"damaged run checkpoint: .*{field}"):
        load_run_state(path)
