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
