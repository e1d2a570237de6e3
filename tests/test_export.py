"""Invariant 2, faithful export: onnxruntime matches PyTorch at several batch sizes, standard ops
only, and no file appears unless every check passed."""

import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.export import ExportError, ExportMismatchError, export_onnx, load_onnx_metadata
from compressdrop.export.program import export_program
from compressdrop.models import build_model
from compressdrop.pruning import PruningWarning

from .test_surgery import gated, quantiles, random_gates_
from .zoo import ZOO, input_for

BATCHES = (1, 7, 64)


def _slim(name):
    model = gated(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        return cd.prune(model, quantiles(model, (0.5,))[0])


@pytest.mark.parametrize("variant", ["dense", "slim"])
@pytest.mark.parametrize("name", list(ZOO))
def test_onnxruntime_matches_pytorch_for_the_zoo(name, variant, tmp_path):
    model = ZOO[name]().eval() if variant == "dense" else _slim(name)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(
        model, input_for(model, 2), path, metadata={"variant": variant}, check_batch_sizes=BATCHES
    )
    assert set(report.max_rel_error) == set(BATCHES)
    assert max(report.max_rel_error.values()) <= 1e-4
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert report.bytes == os.path.getsize(path)


def test_metadata_and_dynamic_batch(tmp_path):
    import onnxruntime as ort

    model = _slim("lenet5")
    path = tmp_path / "m.onnx"
    export_onnx(model, input_for(model, 2), path, metadata={"threshold": "1.5"})
    meta = load_onnx_metadata(path)
    assert meta["compressdrop_version"] == cd.__version__ and meta["threshold"] == "1.5"
    rep = model.prune_report
    assert (meta["architecture_before"], meta["architecture_after"]) == (
        rep.architecture_before,
        rep.architecture_after,
    )
    assert rep.architecture() == f"{rep.architecture_before} → {rep.architecture_after}"
    assert meta["gate_family"] == "lognormal"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = input_for(model, 3)  # a batch size the export never checked
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert not [
        p for p in tmp_path.iterdir() if p.name != "m.onnx"
    ]  # no temp or external-data files


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


def test_export_failure_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError):
        export_onnx(Unexportable(), torch.ones(2, 4), path)
    assert not path.exists()
    path.write_bytes(b"previous")
    with pytest.raises(ExportError):
        export_onnx(Unexportable(), torch.ones(2, 4), path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_bfloat16_model_is_refused_before_anything_is_written(tmp_path):
    """onnxruntime's CPU provider has no bfloat16 Mul: the export ended in its raw
    NotImplemented error; now an ExportError that says to call .float() first."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).bfloat16()
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    with pytest.raises(ExportError, match=r"bfloat16.*CPU provider.*model\.float\(\)"):
        export_onnx(model, x, tmp_path / "m.onnx", providers="cpu")
    assert not list(tmp_path.iterdir())
    rep = export_onnx(model.float(), x.float(), tmp_path / "m.onnx", providers="cpu")
    assert max(rep.max_rel_error.values()) <= 1e-4


class _Normalized(nn.Module):
    """A float32 model with a bfloat16 constant that it casts before use (RecurrentGemma's
    embedding ``normalizer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("normalizer", torch.tensor(2.0, dtype=torch.bfloat16))

    def forward(self, x):
        return self.fc(x * self.normalizer.to(x.dtype))


def test_a_float32_model_with_a_bfloat16_constant_exports(tmp_path):
    """Its weights are float32 and its session runs on the CPU provider (the cast is a Cast):
    it was refused as "in bfloat16" for its one bfloat16 buffer."""
    rep = export_onnx(_Normalized(), torch.randn(2, 4), tmp_path / "m.onnx", providers="cpu")
    assert max(rep.max_rel_error.values()) <= 1e-4


def test_mismatch_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    model = ZOO["lenet300"]().eval()
    path = tmp_path / "m.onnx"
    import compressdrop.export._check as check
    from compressdrop.export.program import export_program

    monkeypatch.setattr(check, "_rel_error", lambda a, b: 0.5)
    with pytest.raises(ExportMismatchError, match=r"onnxruntime.*batch size 1"):
        export_onnx(model, input_for(model, 2), path)
    assert not path.exists()
    with pytest.raises(ExportMismatchError, match=r"reloaded \.pt2.*batch size 1"):
        export_program(model, input_for(model, 2), tmp_path / "m.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unwritable_directory_is_a_clear_error(tmp_path):
    model = ZOO["lenet300"]().eval()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, input_for(model, 2), tmp_path / "missing" / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(PermissionError, match="not writable"):
            export_onnx(model, input_for(model, 2), ro / "m.onnx")
    finally:
        ro.chmod(0o700)


def test_model_training_flag_and_device_are_restored(tmp_path):
    model = ZOO["lenet300"]().train()
    export_onnx(model, input_for(model, 2), tmp_path / "m.onnx")
    assert model.training


class _SegLike(nn.Module):
    """Returns a dict holding a tensor and a list, like torchvision's segmentation models."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 3, 1)
        self.aux = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return {"out": self.head(h), "aux": [self.aux(h)]}


def test_dict_and_list_outputs_prune_and_export(tmp_path):
    from compressdrop.export.program import export_program

    torch.manual_seed(0)
    model = _SegLike().eval()
    x = torch.randn(4, 1, 8, 8)
    cd.attach(model, example_inputs=x[:2])
    gate = next(iter(cd.named_gates(model)))[1]
    with torch.no_grad():
        gate.log_sigma.copy_(torch.linspace(-3, 1, 6))
    thr = float(gate.snr().detach().median())
    slim = cd.prune(model, thr, example_inputs=x)
    kept = int((gate.snr().detach() >= thr).sum())
    assert slim.a.out_channels == kept < 6 and slim.prune_report.max_rel_error <= 1e-5
    onnx_rep = export_onnx(slim, x[:2], tmp_path / "seg.onnx")
    assert max(onnx_rep.max_rel_error.values()) <= 1e-4
    outputs = [o.name for o in onnx.load(str(tmp_path / "seg.onnx")).graph.output]
    assert outputs == ["out", "aux_0"]  # the dict's keys, not the exporter's op names
    assert max(export_program(slim, x[:2], tmp_path / "seg.pt2").max_rel_error.values()) <= 1e-5
    loaded = torch.export.load(tmp_path / "seg.pt2").module()
    with torch.no_grad():
        out = loaded(x)
    assert set(out) == {"out", "aux"} and out["aux"][0].shape == (4, 2, 8, 8)


def test_onnx_outputs_are_named_after_the_model_s_outputs(tmp_path):
    """A tensor is ``output``, a tuple's are ``output_0``, ... (the exporter named them after
    the op that made them: ``linear_1``), never an input's name."""
    from compressdrop.export._check import output_names

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    export_onnx(mlp, torch.randn(4, 8), tmp_path / "mlp.onnx")
    graph = onnx.load(str(tmp_path / "mlp.onnx")).graph
    assert [o.name for o in graph.output] == ["output"]
    t = torch.zeros(1)
    assert output_names((t, [t, t])) == ["output_0", "output_1_0", "output_1_1"]
    assert output_names({"x": t, "logits": t, 3: t}, taken=["x"]) == ["x_1", "logits", "output_3"]


def test_a_program_stores_its_example_not_the_data_set_it_was_sliced_from(tmp_path):
    from compressdrop.export.program import export_program
    from compressdrop.programs import program_record

    model = ZOO["lenet300"]().eval()
    data = torch.rand(20_000, *input_for(model, 1).shape[1:])  # 5 MB of float32 (8×8 inputs)
    written = export_program(model, data[:2], tmp_path / "m.pt2")
    assert written.bytes < 1_000_000  # the net and two examples, not the 20,000
    assert program_record(model, data[:2])["program"].numel() < 1_000_000


def _noisy_gated(net: str, family: str) -> nn.Module:
    """A gated net with SNRs spread (log-normal: σ up to e³, as a trained run's noisiest units)
    and some units pruned (multiplied by 0 in eval)."""
    if net == "lstm":
        torch.manual_seed(0)
        model = build_model("lstm_rows", input_shape=(1, 8, 8), hidden=24, layers=2)
        cd.attach(model, gate=family, example_inputs=torch.randn(2, 1, 8, 8))
        model = random_gates_(model).eval()
    else:
        model = gated("lenet300", family)
    if family == "lognormal":
        with torch.no_grad():
            for _, g in cd.named_gates(model):
                g.log_sigma.copy_(torch.linspace(-1.0, 3.0, g.num_units))
    cd.mask_(model, quantiles(model, (0.3,))[0])
    assert any(bool(g.pruned.any()) for _, g in cd.named_gates(model))
    return model


# the LSTM for log-normal (its ONNX export was NaN) and for one of the families built on pyro's
# distributions (whose closed forms stopped torch.export where no unit was pruned: see below)
CASES = [(f, "mlp") for f in sorted(cd.GATES)] + [("lognormal", "lstm"), ("hardconcrete", "lstm")]


@pytest.mark.parametrize(("family", "net"), CASES)
def test_a_gated_model_exports_with_the_factors_pytorch_computes(family, net, tmp_path):
    """Eval mode multiplies by E[θ] (0 for a pruned unit). Traced, the closed forms were folded
    to NaN by the ONNX exporter (log-normal) or stopped torch.export (the families built on
    pyro's distributions), in ONNX and .pt2 alike; PyTorch now computes them beforehand."""
    model = _noisy_gated(net, family)
    x = input_for(model, 4) if net == "mlp" else torch.randn(4, 1, 8, 8)
    rep = export_onnx(model, x, tmp_path / "g.onnx")  # raises if onnxruntime disagrees
    assert max(rep.max_rel_error.values()) <= 1e-4
    prog = export_program(model, x, tmp_path / "g.pt2")  # raises if the program disagrees
    assert max(prog.max_rel_error.values()) <= 1e-4
    assert all("_fixed_factor" not in vars(g) for _, g in cd.named_gates(model))
    model.train()
    assert cd.is_gated(model) and model(x).isfinite().all()  # still a gated model


@pytest.mark.parametrize("family", sorted(cd.GATES))
def test_a_freshly_gated_model_exports_as_a_program(family, tmp_path):
    """Gates as attach leaves them (no unit pruned): torch.export stopped on a data-dependent
    guard in the closed forms of the families built on pyro's distributions."""
    torch.manual_seed(0)
    model = build_model("lenet300", (1, 8, 8))
    cd.attach(model, gate=family, example_inputs=torch.randn(2, 1, 8, 8))
    rep = export_program(model.eval(), torch.randn(4, 1, 8, 8), tmp_path / "g.pt2")
    assert max(rep.max_rel_error.values()) <= 1e-5


class _FixedLengthTokens(nn.Module):
    """Token ids whose length the model fixes (their embeddings flattened into one Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 4), nn.Linear(6 * 4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).flatten(1))


def test_token_ids_export_with_a_dynamic_length_or_say_why_not(tmp_path):
    from compressdrop.export._check import with_lengths

    ids = torch.randint(0, 20, (2, 6))
    with pytest.warns(UserWarning, match=r"\(the sequence length\) fixed at 6"):
        rep = with_lengths(export_onnx, _FixedLengthTokens().eval(), ids, tmp_path / "m.onnx")
    assert set(rep.max_rel_error) == {1, 7, 64}
    (inp,) = onnx.load(str(tmp_path / "m.onnx")).graph.input
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1] == 6
    token_net = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 3)).eval()  # any length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = with_lengths(export_program, token_net, ids, tmp_path / "t.pt2")
    assert "length 3" in rep.max_rel_error
    # a model whose output is a tensor is exported as it is: its parameters keep their names
    names = set(torch.export.load(tmp_path / "t.pt2").module().state_dict())
    assert names == set(token_net.state_dict())


def test_a_slim_model_pruned_at_the_default_threshold_records_it_in_words():
    """Exported files recorded `threshold: None` for a model pruned at its family's default."""
    model = build_model("lenet300", (1, 8, 8))
    cd.attach(model, example_inputs=torch.randn(2, 1, 8, 8))
    assert cd.prune(model).prune_report.metadata()["threshold"] == "the family's default (1)"
    assert cd.prune(model, 0.5).prune_report.metadata()["threshold"] == "0.5"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_no_file_can_be_made_in_is_named_before_any_work():
    """As root, os.access says /proc is writable; the export then failed naming a temporary
    file (``/proc/tmpsk0o2430``), not the path given (a new-user walk)."""
    from compressdrop.workflows import check_writable

    with pytest.raises(InputError, match=r"cannot write /proc/a\.onnx: directory /proc is not"):
        check_writable("/proc/a.onnx")
