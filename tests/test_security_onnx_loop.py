"""An ONNX ``Loop`` with a huge constant trip count is refused before onnxruntime runs it: in its
C++ loop neither Ctrl-C nor SIGTERM stopped ``eval`` (2^62 turns of an empty body)."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from compressdrop import runtime
from compressdrop.errors import InputError
from compressdrop.evaluation.onnx_eval import evaluate_onnx

# a run of the graph in its own process, told when it starts (Ctrl-C is the default's)
_RUN = """
import signal, sys, numpy as np
from compressdrop.runtime import ort_run, ort_session
signal.signal(signal.SIGINT, signal.default_int_handler)
session, _ = ort_session(sys.argv[1], "cpu", 1)
print("running", flush=True)
try:
    ort_run(session, {"x": np.zeros((2, 1, 8, 8), np.float32)}, sys.argv[1])
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def loop_graph(path, trips: int, as_node: bool = False, computed: bool = False):
    """A linear classifier of (N, 1, 8, 8) inputs whose features pass through a Loop of
    ``trips`` turns (the count an initializer, or a Constant node; ``computed``: the sum of
    two halves, which no check before the run reads)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    info = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["s"], ["s_out"])],
        "body",
        [info("i", TensorProto.INT64, []), info("c", TensorProto.BOOL, []), info("s", TensorProto.FLOAT, None)],
        [info("c_out", TensorProto.BOOL, []), info("s_out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    m = numpy_helper.from_array(np.array(trips // 2 if computed else trips, np.int64), "M")
    init = [numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")]
    init.append(numpy_helper.from_array(np.array(True), "C"))
    nodes = [helper.make_node("Constant", [], ["M"], value=m)] if as_node else []
    init += [] if as_node else [m]
    nodes += [helper.make_node("Add", ["M", "M"], ["trips"])] if computed else []
    nodes += [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Loop", ["trips" if computed else "M", "C", "f"], ["f2"], body=body),
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


def test_a_loop_whose_trip_count_is_stored_outside_the_file_is_refused_by_name(tmp_path):
    """A trip count kept as external data was read by the check relative to the working folder
    (onnx's ``to_array`` without a base folder), onnxruntime's relative to the model's: the
    check failed with onnx's "should be stored in trips.bin, but it is not regular file", or
    read another file than the one that runs."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(loop_graph(tmp_path / "loop.onnx", 1 << 62)))
    (count,) = [t for t in model.graph.initializer if t.name == "M"]
    (tmp_path / "trips.bin").write_bytes(np.array(1 << 62, np.int64).tobytes())
    set_external_data(count, location="trips.bin")
    count.ClearField("raw_data")
    count.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(tmp_path / "external.onnx"))
    with pytest.raises(
        InputError, match=r"external\.onnx: a Loop's trip count 'M' is stored outside"
    ):
        runtime.ort_session(tmp_path / "external.onnx", "cpu")


def test_a_loop_whose_trip_count_the_graph_computes_stops_at_ctrl_c(tmp_path):
    """2^62 turns computed by the graph (no check before the run can read them): onnxruntime
    ran them in C++, where Ctrl-C never reached Python; now the run's terminate flag stops it."""
    path = loop_graph(tmp_path / "loop.onnx", 1 << 62, computed=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "running\n"
        time.sleep(1.0)  # inside the loop by now
        assert proc.poll() is None  # still turning
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out == "interrupted\n", (out, err)
    assert "terminate flag" not in err  # onnxruntime's own log line is kept off the terminal


def folding_graph(path, nodes: int):
    """(N, 1, 8, 8) inputs plus the sum of a chain of ``nodes`` MatMuls of a 2000 x 2000
    ``ConstantOfShape``: constant nodes, about 0.3 s each on a CPU core."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    chain = [helper.make_node("ConstantOfShape", ["shape"], ["a0"], value=ones)]
    chain += [helper.make_node("MatMul", [f"a{i}", f"a{i}"], [f"a{i + 1}"]) for i in range(nodes)]
    chain += [
        helper.make_node("ReduceSum", [f"a{nodes}"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    shape = numpy_helper.from_array(np.array([2000, 2000], np.int64), "shape")
    model = helper.make_model(
        helper.make_graph(chain, "g", [x], [y], [shape]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_graphs_constant_nodes_run_where_ctrl_c_stops_them(tmp_path):
    """onnxruntime folded a graph's constant nodes while it made the session, in C++ outside the
    run: a 5 KB file of 200 such MatMuls held ``eval`` a minute, and neither Ctrl-C nor SIGTERM
    stopped it. Now they run in the run, which Ctrl-C stops."""
    import select

    path = folding_graph(tmp_path / "fold.onnx", 2000)  # folded: ten minutes
    with subprocess.Popen(
        [sys.executable, "-c", _RUN, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline() == "running\n"  # the session is made at once
            time.sleep(1.0)  # inside the chain by now
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 130 and out == "interrupted\n", (out, err)
