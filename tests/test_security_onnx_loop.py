"""An ONNX ``Loop`` with a huge constant trip count is refused before onnxruntime runs it: in its
C++ loop neither Ctrl-C nor SIGTERM stopped ``eval`` (2^62 turns of an empty body)."""

import numpy as np
import pytest
import torch

from compressdrop import runtime
from compressdrop.errors import InputError
from compressdrop.evaluation.onnx_eval import evaluate_onnx


def loop_graph(path, trips: int, as_node: bool = False):
    """A linear classifier of (N, 1, 8, 8) inputs whose features pass through a Loop of
    ``trips`` turns (the count an initializer, or a Constant node)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    info = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["s"], ["s_out"])],
        "body",
        [info("i", TensorProto.INT64, []), info("c", TensorProto.BOOL, []), info("s", TensorProto.FLOAT, None)],
        [info("c_out", TensorProto.BOOL, []), info("s_out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    m = numpy_helper.from_array(np.array(trips, np.int64), "M")
    init = [numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")]
    init.append(numpy_helper.from_array(np.array(True), "C"))
    nodes = [helper.make_node("Constant", [], ["M"], value=m)] if as_node else []
    init += [] if as_node else [m]
    nodes += [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Loop", ["M", "C", "f"], ["f2"], body=body),
        helper.make_node("MatMul", ["f2", "W"], ["y"]),
    ]
    x = info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = info("y", TensorProto.FLOAT, ["N", 10])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], init), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("as_node", [False, True], ids=["initializer", "constant-node"])
def test_a_loop_with_a_huge_constant_trip_count_is_refused_before_it_runs(
    tmp_path, monkeypatch, as_node
):
    monkeypatch.setattr(runtime, "_MAX_TRIPS", 10)  # 100 turns: over it, and quick on old code
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    path = loop_graph(tmp_path / "loop.onnx", 100, as_node)
    with pytest.raises(InputError, match=r"loop\.onnx: a Loop of the graph runs 100 times"):
        evaluate_onnx(path, x, y, device="cpu")
    ok = loop_graph(tmp_path / "ok.onnx", 10, as_node)
    assert evaluate_onnx(ok, x, y, device="cpu")["n"] == 4
