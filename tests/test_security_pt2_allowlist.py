"""A ``.pt2`` graph may call only the ATen and prims operators on compressdrop's allowlist
(``compressdrop/programs/_ops.py``, written by ``benchmarks/probe_program_ops.py``). Every
security review had found more ATen calls outside the deny-list that crash or read out of bounds
on arguments the file gives (sparse constructors, ``_ctc_loss``, ``segment_reduce``,
``embedding_dense_backward``, ...) when the graph runs once at load; now an operator is run only
if programs of real models call it or it is of torch's core opset, and its CPU kernel checks
what a file can give it."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError
from compressdrop.export.program import export_program
from compressdrop.models import build_model
from compressdrop.programs import program_to_module
from compressdrop.programs._ops import ALLOWED
from compressdrop.programs.safety import _NO_OPS

from .test_security import _cli, _good_pt2
from .test_security_pt2_schema import _edited, _set

MESSAGE = (
    r"refused: a node calls '{op}', which is not among the operators compressdrop runs from a "
    r"file \(Node\.target\)\. If you trust the file, pass --trust-code \(trust_code=True in "
    r"Python\) to run any of torch's operators from it"
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("allowlist") / "good.pt2"
    _good_pt2(path)  # LeNet-300-100, a dynamic batch: flatten, linear, relu
    return path


def _relu_node(doc) -> str:
    nodes = doc["graph_module"]["graph"]["nodes"]
    return str(next(i for i, n in enumerate(nodes) if n["target"].endswith(".relu.default")))


def _calling(good: Path, dst: Path, op: str) -> Path:
    """``good`` with its first ReLU calling ``op`` on the same argument instead."""

    def edit(doc):
        _set(f"nodes.{_relu_node(doc)}.target", op)(doc)

    return _edited(good, dst, edit)


@pytest.mark.parametrize(
    "op",
    [
        "torch.ops.aten.sinc.default",  # an operator no program compressdrop saw calls
        # the batch-norm kernel of a decomposed program: statistics shorter than the channels
        # were read past their end (aten.batch_norm, which torch.export writes, checks them)
        "torch.ops.aten._native_batch_norm_legit_no_training.default",
        "torch.ops.aten.max_pool2d_with_indices_backward.default",  # an index past its input
        "torch.ops.aten.relu",  # an overload packet: not an overload on the list
    ],
)
def test_an_operator_off_the_list_is_refused_before_anything_runs_or_is_written(op, good, tmp_path):
    evil = _calling(good, tmp_path / "evil.pt2", op)
    with pytest.raises(CheckpointError, match=MESSAGE.format(op=re.escape(op))):
        load_model(evil)
    for args in (
        ["export", evil, "-o", tmp_path / "m.onnx"],
        ["prune", evil, "-o", tmp_path / "slim.pt2", "--data", "digits"],
    ):
        res = _cli(args)
        assert res.exit_code == 1 and "not among the operators" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2"]  # nothing half-written


def test_an_operator_on_the_list_in_the_same_place_loads(good, tmp_path):
    """The edit alone is not what is refused: ``aten.sigmoid`` in the ReLU's place loads."""
    model = load_model(_calling(good, tmp_path / "sigmoid.pt2", "torch.ops.aten.sigmoid.default"))
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


class _Sinc(nn.Module):
    """A user's MLP that calls an operator no program compressdrop saw calls (sinc)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.sinc(x))))


def test_what_the_refusal_advises_a_user_who_trusts_the_file_works(tmp_path):
    """``--trust-code`` runs the file's operators off the list: loaded, gated, pruned, saved
    (a slim program is loaded again while it is saved) and loaded again, trusted again."""
    torch.manual_seed(0)
    net, x = _Sinc().eval(), torch.randn(8, 16)
    path = tmp_path / "sinc.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), path)
    op = re.escape("torch.ops.aten.sinc.default")
    with pytest.raises(CheckpointError, match=MESSAGE.format(op=op)):
        load_model(path)
    model = load_model(path, trust_code=True)  # as the message says
    torch.testing.assert_close(model(x), net(x))
    cd.attach(model)
    assert [name for name, _ in cd.named_gates(model)] == ["fc1"]
    slim = cd.prune(model, 1.0)
    for kind, m in (("gated", model), ("slim", slim)):
        saved = tmp_path / f"{kind}.pt"
        cd.save_model(m, saved)
        with pytest.raises(CheckpointError, match=op):
            load_model(saved)
        torch.testing.assert_close(load_model(saved, trust_code=True)(x), m.eval()(x))
    res = _cli(["export", path, "-o", tmp_path / "m.onnx", "--trust-code"])
    assert res.exit_code == 0 and (tmp_path / "m.onnx").is_file(), res.output
    assert program_to_module(torch.export.load(path))(x).shape == (8, 4)  # the module route


def test_every_operator_on_the_list_is_one_of_torchs_and_none_is_refused_otherwise():
    assert len(ALLOWED) > 300
    for name in ALLOWED:
        namespace, packet, overload = name.split(".")
        op = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
        assert isinstance(op, torch._ops.OpOverload) and str(op) == name, name
        assert not _NO_OPS.match(f"torch.ops.{name}"), name
        assert not packet.endswith("_backward") and packet != "resize_", name


def test_the_list_reads_sorted_one_name_once():
    from compressdrop.programs import _ops

    for text in (_ops._ATEN, _ops._PRIMS):
        names = text.split()
        assert names == sorted(set(names))


def test_core_aten_and_the_batch_norm_torch_export_writes_are_on_the_list():
    core = [
        "aten.convolution.default",
        "aten.addmm.default",
        "aten.view.default",
        "aten.native_layer_norm.default",
        "aten._softmax.default",
        "aten.index.Tensor",
    ]
    written = [f"aten.conv{d}d.default" for d in (1, 2, 3)] + ["aten.batch_norm.default"]
    layers = ["aten.linear.default", "aten.lstm.input", "aten.gru.input", "aten.group_norm.default"]
    assert set(core + written + layers) <= ALLOWED
    assert "aten.sinc.default" not in ALLOWED  # what the tests above take as off the list


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", sorted(cd.GATES))
def test_compressdrops_own_programs_of_each_gate_family_still_load(family, tmp_path):
    """The dense, gated and slim programs and the slim one with its noise kept (MC dropout)."""
    torch.manual_seed(0)
    model, x = build_model("lenet5", (1, 12, 12)), torch.randn(4, 1, 12, 12)
    cd.attach(model, gate=family)
    slim = cd.prune(model, 1.0)
    for name, m in {"gated": model, "slim": slim, "mc": cd.keep_noise(model, slim, 1.0)}.items():
        export_program(m, x, tmp_path / f"{name}.pt2", check_batch_sizes=(2,))
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / f"{name}.pt2")(x), m.eval()(x))


@pytest.mark.filterwarnings("ignore")
def test_an_lstm_program_and_a_decomposed_one_load(tmp_path):
    torch.manual_seed(0)
    model, x = build_model("lstm_rows", (1, 8, 8)).eval(), torch.randn(3, 1, 8, 8)
    export_program(model, x, tmp_path / "lstm.pt2", check_batch_sizes=(2,))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "lstm.pt2")(x), model(x))
    lenet = build_model("lenet300", (1, 8, 8)).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(lenet, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program.run_decompositions(), tmp_path / "core.pt2")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "core.pt2")(x), lenet(x))


class _SincDigits(nn.Module):
    """The same of digits' (1, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.sinc(x.flatten(1)))))


def test_a_trusted_pickled_model_off_the_list_prunes_with_keep_gated(tmp_path):
    """Review 11: ``--trust-code --keep-gated`` checked that the gated file would load back by
    loading its program without the trust, and refused, telling the user to pass --trust-code."""
    torch.save(_SincDigits(), tmp_path / "pickled.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages: {pretrain: {epochs: 0}, sparsify: {epochs: 1}, finetune: {epochs: 1}}"
    )
    args = ["prune", tmp_path / "pickled.pt", "-o", tmp_path / "slim.pt", "--data", "digits"]
    res = _cli([*args, "--trust-code", "--recipe", recipe, "--keep-gated"])
    assert res.exit_code == 0, res.output
    gated = load_model(tmp_path / "slim-gated.pt", trust_code=True)
    assert [name for name, _ in cd.named_gates(gated)] == ["fc1"]
