"""A ``.pt2`` holds exactly the records ``torch.export.load`` reads as data (a security review):
the check had matched entries by pattern (``models/*.json``, ``data/weights/<name>.pt``) where
torch reads every ``models/`` entry and derives the program's name from it, so a graph named
``models/model.JSON`` went unchecked to ``sympy.sympify``, and a program named ``sub/model`` read
a pickled ``data/weights/sub/model.pt``. Both ran code, also from a ``.pt`` checkpoint that embeds
the program. Now every record is on an exact list, and both zip readers must see the same."""

import contextlib
import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from compressdrop.checkpoint import load_model
from compressdrop.errors import CheckpointError
from compressdrop.programs import check_pt2_archive

from .test_security import _cli, _good_pt2, _pickled_exploit_bytes


def _entries(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _write(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


def _graph_named_in_upper_case(tmp_path: Path, marker: Path) -> Path:
    """The shape-expression payload in a graph whose name ends in ``.JSON``."""
    touch = f"__import__('os').system('touch {marker}')"
    out = []
    for name, data in _entries(tmp_path / "good.pt2"):
        if name.endswith("models/model.json"):
            data = data.replace(b"Symbol('s", f"{touch} or Symbol('s".encode(), 1)
            name = name.replace("model.json", "model.JSON")
        out.append((name, data))
    return _write(tmp_path / "evil_case.pt2", out)


def _program_in_a_folder(tmp_path: Path, marker: Path) -> Path:
    """A program named ``sub/model`` with its weights as the legacy pickle torch reads for it."""
    out = []
    for name, data in _entries(tmp_path / "good.pt2"):
        root, inner = name.split("/", 1)
        if inner.startswith("data/weights/"):
            continue
        moved = {
            "models/model.json": "models/sub/model.json",
            "data/sample_inputs/model.pt": "data/sample_inputs/sub/model.pt",
            "data/constants/model_constants_config.json": (
                "data/constants/sub/model_constants_config.json"
            ),
        }
        name = f"{root}/{moved.get(inner, inner)}"
        out.append((name, data))
    out.append((f"{root}/data/weights/sub/model.pt", _pickled_exploit_bytes(marker)))
    return _write(tmp_path / "evil_folder.pt2", out)


ATTACKS = {"upper-case": _graph_named_in_upper_case, "folder": _program_in_a_folder}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    _good_pt2(tmp_path / "good.pt2")
    return tmp_path / "good.pt2"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", list(ATTACKS))
def test_plain_torch_export_load_runs_both(kind, good, tmp_path):
    """Why: PyTorch itself runs the code in these archives."""
    marker = tmp_path / "marker.npy"
    evil = ATTACKS[kind](tmp_path, marker)
    with contextlib.suppress(Exception):
        torch.export.load(evil)
    if not marker.exists():
        pytest.skip("this torch no longer runs it; the exact list stays anyway")


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_a_program_torch_would_find_elsewhere_is_refused(kind, good, tmp_path):
    marker = tmp_path / "marker.npy"
    evil = ATTACKS[kind](tmp_path, marker)
    with pytest.raises(CheckpointError, match=r"refused: an entry torch\.export\.load would read"):
        load_model(evil)
    res = _cli(["export", evil, "-o", tmp_path / "m.onnx"])
    assert res.exit_code == 1 and "refused" in res.output, res.output
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_a_checkpoint_that_embeds_such_a_program_is_refused(kind, good, tmp_path):
    """A ``.pt`` checkpoint (weights only, a user expects) whose architecture record is a
    program: the same check guards it."""
    marker = tmp_path / "marker.npy"
    evil = ATTACKS[kind](tmp_path, marker).read_bytes()
    record = {
        "format": "compressdrop-model",
        "format_version": 1,
        "kind": "dense",
        "recipe": None,
        "meta": {},
        "arch": {"program": torch.frombuffer(bytearray(evil), dtype=torch.uint8)},
        "state_dict": load_model(good).state_dict(),
    }
    torch.save(record, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "c.pt")
    res = _cli(["export", tmp_path / "c.pt", "-o", tmp_path / "c.onnx"])
    assert res.exit_code == 1 and "refused" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "c.onnx").exists()


def test_an_entry_outside_the_archive_or_twice_is_refused(good, tmp_path):
    """torch.export.load falls back to the format of PyTorch 2.7 (top-level entries, pickled
    state) when the archive does not load; and a name twice may read differently in two zip
    readers. Neither reaches torch."""
    entries = _entries(good)
    old_format = _write(tmp_path / "old.pt2", [*entries, ("serialized_state_dict.pt", b"x")])
    with pytest.raises(CheckpointError, match=r"refused: its entries are not one archive"):
        check_pt2_archive(old_format)
    graph = next(e for e in entries if e[0].endswith("models/model.json"))
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = _write(tmp_path / "twice.pt2", [*entries, graph])
    with pytest.raises(CheckpointError, match=r"refused: its entries are not one archive"):
        check_pt2_archive(twice)


@pytest.mark.parametrize(
    "extra",
    [
        "data/weights/model.pt",  # the legacy pickle, beside the tables
        "data/constants/custom_obj_0",
        "data/weights/weight_0.pt",
        "models/other.json.bak",
        "models/",
        "data/aotinductor/model/model.so",
        "notes.txt",
    ],
)
def test_any_entry_off_the_list_is_refused(extra, good, tmp_path):
    entries = _entries(good)
    root = entries[0][0].split("/", 1)[0]
    bad = _write(tmp_path / "bad.pt2", [*entries, (f"{root}/{extra}", b"\x80\x02N.")])
    with pytest.raises(CheckpointError, match=r"bad\.pt2: refused"):
        check_pt2_archive(bad)


def test_a_payload_table_naming_another_kind_of_file_is_refused(good, tmp_path):
    """A weights table whose entry points at anything but a raw ``weight_N`` payload."""
    out = []
    for name, data in _entries(good):
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            next(iter(doc["config"].values()))["path_name"] = "../constants/tensor_0"
            data = json.dumps(doc).encode()
        out.append((name, data))
    with pytest.raises(CheckpointError, match="is a Python object"):
        check_pt2_archive(_write(tmp_path / "bad.pt2", out))


def test_what_torch_export_save_writes_still_loads(tmp_path):
    """Two programs' worth of payloads, constants, buffers and extra files: all on the list."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.register_buffer("shift", torch.ones(3))
            self.scale = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale + self.shift

    program = torch.export.export(
        Net(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"note.txt": "hi"})
    check_pt2_archive(buf.getvalue(), "net.pt2")
    (tmp_path / "net.pt2").write_bytes(buf.getvalue())
    x = torch.randn(5, 4)
    torch.testing.assert_close(load_model(tmp_path / "net.pt2")(x), program.module()(x))


# --- a second review: what the graph's JSON itself may say --------------------------------------


def _with_graph(good: Path, dst: Path, edit) -> Path:
    """``good`` with its graph's JSON passed through ``edit`` (in place)."""
    out = []
    for name, data in _entries(good):
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            edit(doc["graph_module"]["graph"])
            data = json.dumps(doc).encode()
        out.append((name, data))
    return _write(dst, out)


def _input_named(payload: str):
    def edit(graph):
        first = graph["inputs"][0]["as_tensor"]["name"]
        graph["tensor_values"][payload] = graph["tensor_values"][first]
        graph["inputs"].append({"as_tensor": {"name": payload}})

    return edit


def _subgraph_named(payload: str):
    def edit(graph):
        sub = {k: [] if isinstance(v, list) else {} if isinstance(v, dict) else v
               for k, v in graph.items()}  # fmt: skip
        graph["nodes"].insert(0, {
            "target": "torch.ops.higher_order.wrap_with_set_grad_enabled",
            "inputs": [{"name": "", "arg": {"as_bool": False}, "kind": 1},
                       {"name": "", "arg": {"as_graph": {"name": payload, "graph": sub}}, "kind": 1}],
            "outputs": [{"as_none": True}], "metadata": {}, "name": "w",
        })  # fmt: skip

    return edit


def _writes_a_file(path: Path):
    def edit(graph):
        first = graph["inputs"][0]["as_tensor"]["name"]
        graph["tensor_values"]["ff"] = graph["tensor_values"][first]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [{"name": "filename", "arg": {"as_string": str(path)}, "kind": 1},
                       {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                       {"name": "size", "arg": {"as_int": 16}, "kind": 1}],
            "outputs": [{"as_tensor": {"name": "ff"}}], "metadata": {}, "name": "ff",
        })  # fmt: skip

    return edit


def test_names_the_graph_would_paste_into_python_source_are_identifiers(good, tmp_path):
    """FX writes a graph's input and subgraph names into the source of the module it builds and
    runs: a name that is Python ran, the first while torch.export.load built the module, the
    second on its first call (which loading a program makes)."""
    marker = tmp_path / "marker.npy"
    touch = f"__import__('os').system('touch {marker}')"
    crafted = {
        "input": _input_named(f"zz={touch}"),
        "subgraph": _subgraph_named(f'g",{touch})#'),
    }
    for kind, edit in crafted.items():
        evil = _with_graph(good, tmp_path / f"{kind}.pt2", edit)
        with pytest.raises(CheckpointError, match="refused: a name is not an identifier"):
            load_model(evil)
        res = _cli(["export", evil, "-o", tmp_path / "m.onnx"])
        assert res.exit_code == 1 and "refused" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_an_aten_call_that_maps_a_file_is_refused(good, tmp_path):
    """``aten.from_file`` with ``shared=True`` creates and writes any path."""
    target = tmp_path / "written"
    evil = _with_graph(good, tmp_path / "file.pt2", _writes_a_file(target))
    with pytest.raises(
        CheckpointError, match=r"refused: a node calls 'torch\.ops\.aten\.from_file"
    ):
        load_model(evil)
    assert not target.exists()


S = "Symbol('s0', positive=True, integer=True)"  # how torch writes a size


@pytest.mark.parametrize(
    "expr, ok",
    [
        ("Integer(9)**Integer(9)**Integer(9)", False),  # sympy computes the tower: never ends
        ("9**(9**9)", False),
        (f"{S}**99", False),
        ("1" * 30 + f"*{S}", False),
        ("Pow(9, 99999999)", False),
        ("Pow(9, Pow(9, 9))", False),
        (f"Pow({S}, Integer(2))", True),  # how torch writes n*n
        (f"{S}**2", True),
        (f"2*{S} + 1", True),
        (f"FloorDiv({S}, 2)", True),
    ],
)
def test_shape_expressions_are_small_arithmetic(expr, ok):
    from compressdrop.programs.safety import _safe_expr

    assert _safe_expr(expr) is ok


def test_a_sequential_programs_names_pass(tmp_path):
    """Module paths of an ``nn.Sequential`` start with digits (``1.weight``): still names."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    program = torch.export.export(
        net, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "seq.pt2")
    x = torch.randn(5, 4)
    torch.testing.assert_close(load_model(tmp_path / "seq.pt2")(x), net(x))


def test_a_payload_without_bytes_is_refused_not_filled_with_zeros(good, tmp_path):
    """torch fills an empty payload with zeros of the size its table says: a truncated archive
    loaded with zero weights, and a crafted table could ask for any size (memory)."""
    out = [(n, b"" if n.endswith("data/weights/weight_0") else d) for n, d in _entries(good)]
    with pytest.raises(CheckpointError, match=r"values but no bytes"):
        load_model(_write(tmp_path / "empty.pt2", out))


# --- a third review: the program's signature and its arithmetic ----------------------------------


def _with_signature(good: Path, dst: Path, edit) -> Path:
    """``good`` with its module-call signature passed through ``edit`` (in place)."""
    out = []
    for name, data in _entries(good):
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            edit(doc["graph_module"]["module_call_graph"][0]["signature"])
            data = json.dumps(doc).encode()
        out.append((name, data))
    return _write(dst, out)


def test_the_signature_may_not_name_code_or_modules(good, tmp_path):
    """FX writes the forward's argument names and keyword keys into the source it runs (a name
    with a default value ran code at load), and torch rebuilds a ``defaultdict`` or an enum in a
    tree spec by importing the module the spec names (``unittest.__main__`` ran the test files of
    the working folder and exited the process)."""
    marker = tmp_path / "marker.npy"
    code = f"__import__('os').system('touch {marker}')"
    leaf = {"type": None, "context": None, "children_spec": []}

    def arg_name(sig):
        sig["forward_arg_names"] = [f"input={code} or 1"]

    def keyword(sig):
        spec = json.loads(sig["in_spec"])
        spec[1]["children_spec"][1] = {
            "type": "builtins.dict", "context": json.dumps([f"x={code}"]), "children_spec": [leaf]
        }  # fmt: skip
        sig["in_spec"] = json.dumps(spec)

    def imports(sig):
        context = {"default_factory_module": "this", "default_factory_name": "s"}
        sig["out_spec"] = json.dumps([1, {
            "type": "collections.defaultdict",
            "context": {**context, "dict_context": ["out"]}, "children_spec": [leaf],
        }])  # fmt: skip

    def enum(sig):
        key = {"__enum__": 1, "fqn": "this:s", "name": "x"}
        sig["out_spec"] = json.dumps(
            [1, {"type": "builtins.dict", "context": json.dumps([key]), "children_spec": [leaf]}]
        )

    for edit, said in ((arg_name, "a name is not an identifier"), (keyword, "in_spec"),
                       (imports, "out_spec"), (enum, "out_spec")):  # fmt: skip
        evil = _with_signature(good, tmp_path / f"{edit.__name__}.pt2", edit)
        with pytest.raises(CheckpointError, match=f"refused: .*{said}"):
            load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("op", ["_operator.pow", "_operator.lshift", "math.factorial"])
def test_arithmetic_whose_result_has_any_number_of_digits_is_refused(op, good, tmp_path):
    """``3 ** 2000000000`` in a graph's symbolic arithmetic: loading never ended."""

    def edit(graph):
        graph["sym_int_values"]["big"] = {"as_int": 1}
        graph["nodes"].insert(0, {
            "target": op, "metadata": {}, "name": "big",
            "inputs": [{"name": "a", "arg": {"as_int": 3}, "kind": 1},
                       {"name": "b", "arg": {"as_int": 2_000_000_000}, "kind": 1}],
            "outputs": [{"as_sym_int": {"as_name": "big"}}],
        })  # fmt: skip

    evil = _with_graph(good, tmp_path / "big.pt2", edit)
    with pytest.raises(CheckpointError, match=f"refused: a node calls '{op}'"):
        load_model(evil)


@pytest.mark.parametrize(
    "op",
    [
        "torch.ops.aten._sparse_coo_tensor_unsafe.default",  # made dense: wrote past a buffer
        "torch.ops.aten._unsafe_index.Tensor",
        "torch.ops.higher_order.while_loop",  # a condition the file sets: a loop without end
    ],
)
def test_unchecked_calls_and_loops_are_refused(op, good, tmp_path):
    """A fourth review: a graph's single run at load (``_check_batch_free``) wrote past a heap
    buffer (``_sparse_coo_tensor_unsafe`` with an index out of its size, then ``_to_dense``:
    a crash) and looped without end (``while_loop``)."""

    def edit(graph):
        graph["nodes"].insert(0, {
            "target": op, "metadata": {}, "name": "n", "outputs": [{"as_none": True}],
            "inputs": [{"name": "a", "arg": {"as_int": 3}, "kind": 1}],
        })  # fmt: skip

    with pytest.raises(CheckpointError, match=f"refused: a node calls '{re.escape(op)}'"):
        load_model(_with_graph(good, tmp_path / "op.pt2", edit))


def test_shape_arithmetic_that_grows_without_bound_is_refused(good, tmp_path):
    """A fourth review: 40 chained squarings of a symbolic size in a static program hung the
    graph's single run at load in Python's big integers. A few products (a view's n*n) pass."""

    def chain(length):
        def edit(graph):
            graph["sym_int_values"]["sq_0"] = {"as_int": 3}
            for i in range(1, length + 1):
                prev = {"as_sym_int": {"as_name": f"sq_{i - 1}"}}
                graph["sym_int_values"][f"sq_{i}"] = {"as_int": 1}
                graph["nodes"].insert(i - 1, {
                    "target": "_operator.mul", "metadata": {}, "name": f"sq_{i}",
                    "inputs": [{"name": "a", "arg": prev, "kind": 1},
                               {"name": "b", "arg": prev, "kind": 1}],
                    "outputs": [{"as_sym_int": {"as_name": f"sq_{i}"}}],
                })  # fmt: skip

        return edit

    from compressdrop.programs.safety import _bounded_arithmetic

    for length, ok in ((3, True), (40, False)):
        path = _with_graph(good, tmp_path / f"chain{length}.pt2", chain(length))
        with zipfile.ZipFile(path) as z:
            graph = next(n for n in z.namelist() if n.endswith("models/model.json"))
            assert _bounded_arithmetic(json.loads(z.read(graph))) is ok
    with pytest.raises(CheckpointError, match="refused: its shape arithmetic grows without bound"):
        check_pt2_archive(tmp_path / "chain40.pt2")
