"""An ``arch`` record's sizes are checked against the file's weights before any memory is taken
for them: the model is built on the meta device first."""

import pytest
import torch

from compressdrop.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_model, save_model
from compressdrop.models import build_model

# LeNet-300-100 of 10^10 inputs: a first layer of 12 TB, which the old loader tried to allocate
HUGE = {"name": "lenet300", "input_shape": [1, 100000, 100000], "num_classes": 10, "kwargs": {}}
# a prune_report record with every field, pruning nothing
EMPTY_REPORT = {"family": "lognormal", "threshold": None, "layers": [], "history": [],
                "max_rel_error": None}  # fmt: skip


def checkpoint(path, arch, kind="dense", state=None, **more):
    torch.save(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "kind": kind,
         "recipe": None, "meta": {}, "state_dict": state or {}, **more},
        path,
    )  # fmt: skip
    return path


def test_a_dense_records_sizes_that_its_weights_do_not_fill_are_refused_before_building(tmp_path):
    """A 1.5 KB file took 12 GB (input_shape [1, 5000, 2000]) before "Missing key(s)"."""
    with pytest.raises(CheckpointError, match=r"do not fit the architecture: missing key\(s\) 1\."):
        load_model(checkpoint(tmp_path / "huge.pt", HUGE))
    small = build_model("lenet300", input_shape=(1, 8, 8))
    state = {k: v for k, v in small.state_dict().items()}
    big = {**HUGE, "input_shape": [1, 100000, 100000]}
    with pytest.raises(
        CheckpointError, match=r"1\.weight is \[300, 64\] in the file, \[300, 10+\]"
    ):
        load_model(checkpoint(tmp_path / "shapes.pt", big, state=state))
    save_model(small, tmp_path / "ok.pt")  # the file's own record still loads
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(load_model(tmp_path / "ok.pt")(x), small.eval()(x))


def test_a_gated_or_slim_records_sizes_are_bounded_by_the_weights_it_holds(tmp_path):
    state = build_model("lenet300", input_shape=(1, 8, 8)).state_dict()
    with pytest.raises(CheckpointError, match=r"file holds 50,610 weights, the architecture has"):
        load_model(
            checkpoint(
                tmp_path / "g.pt",
                HUGE,
                kind="gated",
                state=state,
                attach={},  # attach's defaults
                inputs=[{"shape": [1, 8, 8]}],
            )
        )
    with pytest.raises(CheckpointError, match="more than 64 times the 50,610"):
        load_model(
            checkpoint(
                tmp_path / "s.pt",
                HUGE,
                kind="slim",
                state=state,
                prune_report=EMPTY_REPORT,
            )
        )


def test_a_bare_state_dict_meets_the_architecture_the_user_names_before_it_is_built(tmp_path):
    torch.save(build_model("lenet300", input_shape=(1, 8, 8)).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"do not fit .*1\.weight is \[300, 64\] in the file"):
        load_model(tmp_path / "w.pt", arch="lenet300", input_shape=(1, 100000, 100000))


def test_a_reference_net_of_more_layers_than_the_weights_number_is_refused_before_a_build(
    tmp_path,
):
    """A net builds its layers one by one, on the ``meta`` device too: a checkpoint naming
    ``resnet`` with ``blocks: [10**12, 1, 1]`` never loaded."""
    from .test_security_races import EACH_ERROR, run_apart

    model = build_model("resnet", (1, 8, 8), num_classes=2)
    save_model(model, tmp_path / "deep.pt")
    payload = torch.load(tmp_path / "deep.pt", weights_only=True)
    payload["arch"]["kwargs"]["blocks"] = [10**12, 1, 1]
    torch.save(payload, tmp_path / "deep.pt")
    code = "import sys\nfrom compressdrop.checkpoint import load_model\nreaders = (load_model,)\n"
    done = run_apart(code + EACH_ERROR, tmp_path / "deep.pt", timeout=120)
    assert "arch record's blocks asks for 1,000,000,000,002 layers" in done.stdout, done
    payload["arch"]["kwargs"]["blocks"] = [2, 1, 1]  # within four times the weights: built
    torch.save(payload, tmp_path / "deeper.pt")
    with pytest.raises(CheckpointError, match="weights do not fit the architecture"):
        load_model(tmp_path / "deeper.pt")
