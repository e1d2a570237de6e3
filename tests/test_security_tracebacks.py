"""What a crafted file held gave raw tracebacks: an ONNX graph's ``mc_samples`` metadata, a graph
onnxruntime fails to run, a slim checkpoint's prune history walked with ``getattr``."""

import copy

import numpy as np
import pytest
import torch

from compressdrop import attach
from compressdrop.checkpoint import CheckpointError, load_model, save_model
from compressdrop.errors import InputError
from compressdrop.evaluation.onnx_eval import evaluate_onnx
from compressdrop.models import build_model, example_input
from compressdrop.pruning import PruneReport, prune
from compressdrop.pruning.surgery import PruningWarning
from compressdrop.uncertainty import mc_evaluate_onnx, onnx_mc_samples


def graph(path, meta=None, huge=False):
    """A linear classifier of (N, 1, 8, 8) inputs; ``huge``: plus a 10^7 x 10^7 constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    init = [numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["m"]),
    ]
    if huge:
        init.append(numpy_helper.from_array(np.array([10**7, 10**7], np.int64), "S"))
        nodes += [
            helper.make_node("ConstantOfShape", ["S"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["r"], keepdims=0),
            helper.make_node("Add", ["m", "r"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["y"]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], init), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("value", ["0", "abc", "-3", "99999999999999999999"])
def test_an_onnx_files_mc_samples_must_be_a_positive_count(tmp_path, value):
    """ "0" divided by zero in the sampler; "abc" was int()'s raw ValueError."""
    path = graph(tmp_path / "m.onnx", {"mc_samples": value})
    with pytest.raises(InputError, match=r"mc_samples is .*not a number of samples from 1 to"):
        onnx_mc_samples(path)
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InputError, match="mc_samples"):
        mc_evaluate_onnx(path, x, y, 5)


def test_a_graph_onnxruntime_fails_to_run_is_an_input_error(tmp_path):
    """A ConstantOfShape of 10^14 floats: onnxruntime's Fail came out raw."""
    path = graph(tmp_path / "huge.onnx", huge=True)
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InputError, match=r"huge\.onnx: onnxruntime failed running it: .*allocate"):
        evaluate_onnx(path, x, y, device="cpu")


def slim_file(tmp_path):
    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    x = example_input(model)
    attach(model, example_inputs=x)
    with pytest.warns(PruningWarning, match="prunes every unit"):
        save_model(prune(model, 1e9, example_inputs=x), tmp_path / "slim.pt")
    return torch.load(tmp_path / "slim.pt", weights_only=True)


@pytest.mark.parametrize(
    "step",
    [
        ["__class__.__init__.__globals__", True, [1]],  # reached the module's globals
        ["1", True, [10**12]],  # past the layer's 300 units
        ["1", True, [-5]],
        ["1", "run", [1]],
        ["1", True, "12"],
    ],
)
def test_a_prune_history_names_modules_and_indices_in_their_range(tmp_path, step):
    payload = slim_file(tmp_path)
    bad = copy.deepcopy(payload)
    bad["prune_report"]["history"][0] = step
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: prune history step 0 is not"):
        load_model(tmp_path / "bad.pt")
    if step[0] == "1" and step[2] != [10**12]:  # without a model: the form, not the names
        with pytest.raises(CheckpointError, match="prune history step 0"):
            PruneReport.from_dict(bad["prune_report"])
    load_model(tmp_path / "slim.pt")  # the file as saved


def test_names_from_a_file_reach_the_terminal_without_its_control_characters(tmp_path):
    """A state_dict key holding ``ESC ] 52`` (the terminal's clipboard) and ``ESC ] 0`` (its
    title) was echoed as it is by the error that names unexpected keys; errors and warnings now
    show such characters as escapes."""
    import warnings

    from click.testing import CliRunner

    from compressdrop.cli import main
    from compressdrop.reporting import one_line_warnings, printable

    model = build_model("lenet300", (1, 8, 8))
    save_model(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    evil = "\x1b]0;TITLE\x07\x1b]52;c;ZWNobyBoaQ==\x07\x9b2K\rlooks fine\u202e"
    payload["state_dict"][evil] = torch.zeros(1)
    torch.save(payload, tmp_path / "m.pt")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.pt"), "--data", "digits"])
    assert result.exit_code == 1 and "unexpected key" in result.output
    assert "\\x1b]52;c;" in result.output and "\\x9b2K\\rlooks fine\\u202e" in result.output
    assert not {"\x1b", "\x07", "\x9b", "\r", "\u202e"} & set(result.output)
    with warnings.catch_warnings(), one_line_warnings():
        shown = warnings.formatwarning(evil, UserWarning, "f.py", 1)
    assert shown.startswith("warning (UserWarning): \\x1b]0;TITLE\\x07\\x1b]52;c;")
    assert not {"\x1b", "\x07", "\x9b", "\r", "\u202e"} & set(shown)
    assert printable("two\nlines\tand a tab") == "two\nlines\tand a tab"


def test_the_data_a_file_records_reaches_the_terminal_without_its_control_characters(tmp_path):
    """``eval`` without ``--data`` says which data the checkpoint records, and its result line
    names that data: both echoed the file's string as it was (``ESC ] 0`` set the title)."""
    from click.testing import CliRunner

    from compressdrop.cli import main
    from compressdrop.recipes import load_recipe

    name = "d\x1b]0;TITLE\x07\u202e"
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 1, 8, 8)).astype(np.float32), np.arange(20) % 2
    np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    recipe = load_recipe("lenet300-lognormal").to_dict()
    recipe["data"]["name"] = str(tmp_path / f"{name}.npz")
    save_model(build_model("lenet300", (1, 8, 8), num_classes=2), tmp_path / "m.pt", recipe=recipe)
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert "d\\x1b]0;TITLE\\x07\\u202e.npz (what" in result.output  # the announcement
    assert "data: d\\x1b]0;TITLE\\x07\\u202e  n:" in result.output  # the result line
    assert not {"\x1b", "\x07", "\u202e"} & set(result.output)


def test_a_sweeps_title_takes_the_datas_name_as_text(capsys):
    """The sweep's table is titled with the data's name (a file's or folder's, one a model
    file records): rich read ``[/x]`` in it as markup, a raw ``MarkupError`` after the sweep had
    written its files, and passed ``ESC ] 0`` on to the terminal."""
    from compressdrop.reporting import sweep_text

    row = {"threshold": 1.0, "architecture": "3-2", "accuracy": 0.5, "nll": 0.7, "params": 10}
    row |= {"flops": 20, "onnx_bytes": 30, "latency_ms": 0.1, "pareto": True}
    row |= {"device": "cpu", "provider": "CPUExecutionProvider"}
    title = "m.pt on d[/x]\x1b]0;TITLE\x07"
    sweep_text({"rows": [row], "dense": None, "files": {}, "title": title}, 8, None)
    shown = capsys.readouterr().out
    assert "m.ptond[/x]\\x1b]0;TITLE\\x07" in "".join(shown.split())  # (wrapped)
    assert "\x1b]" not in shown and "\x07" not in shown
