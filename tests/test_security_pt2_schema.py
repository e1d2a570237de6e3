"""A ``.pt2`` graph's JSON is checked field by field against torch's own schema
(``compressdrop/programs/_schema.py``). ``torch.export.load`` ignores keys it does not know and
passes values of any type on as they are; the earlier check walked the JSON by key name and
skipped every value that was not a string, so a name given as a number, a target given as a
list, a union of two kinds or a field torch's schema has not were all let through to torch."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compressdrop.errors import CheckpointError
from compressdrop.programs import check_pt2_archive, load_program_safely

from .test_security import _good_pt2


def _edited(good: Path, dst: Path, edit) -> Path:
    """``good`` with its program's JSON passed through ``edit`` (in place)."""
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(dst, "w") as zo:
        for item in zi.infolist():
            data = zi.read(item.filename)
            if item.filename.endswith("models/model.json"):
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            zo.writestr(item, data)
    return dst


def _nodes(doc):
    return doc["graph_module"]["graph"]["nodes"]


def _set(path: str, value):
    """An edit that sets the value at ``path`` (keys and list indices, dot-separated) of the
    program's JSON; ``nodes`` is short for the graph's node list."""

    def edit(doc):
        keys = path.split(".")
        at = _nodes(doc) if keys[0] == "nodes" else doc
        for k in keys[1 if keys[0] == "nodes" else 0 : -1]:
            at = at[int(k)] if isinstance(at, list) else at[k]
        if isinstance(at, list):
            at[int(keys[-1])] = value
        else:
            at[keys[-1]] = value

    return edit


def _drop(path: str):
    def edit(doc):
        *keys, last = path.split(".")
        at = _nodes(doc)
        for k in keys[1:]:
            at = at[int(k)] if isinstance(at, list) else at[k]
        del at[last]

    return edit


CRAFTED = {
    "a name given as a number": (_set("nodes.0.outputs.0.as_tensor.name", 7), "is not a string"),
    "a target given as a list": (_set("nodes.0.target", ["torch.load"]), "is not a string"),
    "a spec given as a table": (
        _set("graph_module.module_call_graph.0.signature.in_spec", {"type": "os.system"}),
        "is not a string",
    ),
    "a field torch does not have": (
        _set("nodes.0.code", "__import__('os')"),
        "a field torch's schema does not",
    ),
    "an argument of two kinds": (
        _set("nodes.0.inputs.0.arg", {"as_int": 1, "as_string": "x"}),
        "is not one of Argument's kinds",
    ),
    "an integer past 64 bits": (
        _set("nodes.0.inputs.0.arg", {"as_int": 1 << 80}),
        "is not a 64-bit integer",
    ),
    "a dtype torch does not have": (
        _set("graph_module.graph.tensor_values.linear.dtype", 999),
        "is not a ScalarType",
    ),
    "a device that is not a device type": (
        _set("nodes.0.inputs.0.arg", {"as_device": {"type": "cpu;rm -rf", "index": None}}),
        "a device is not a device type",
    ),
    "a verifier that is not a dialect": (
        _set("verifiers", ["TRAINING", "os.system"]),
        "a verifier is not a dialect",
    ),
    "a source function that is not a name": (
        _set("nodes.0.metadata.source_fn_stack", "linear,#evil:op"),
        "source function is not a name",
    ),
    "a node without its inputs": (_drop("nodes.0.inputs"), "lacks Node.inputs"),
    "a true or false given as a string": (
        _set("graph_module.graph.is_single_tensor_return", "yes"),
        "is not true or false",
    ),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.pt2"
    _good_pt2(path)
    return path


def test_the_edits_reach_what_they_name(good, tmp_path):
    """The fixture's program has the parts the crafted files edit (else an edit would fail, not
    the check)."""
    with zipfile.ZipFile(good) as z:
        doc = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("model.json")))
    first = _nodes(doc)[0]
    assert first["outputs"][0]["as_tensor"]["name"] and first["inputs"][0]["arg"]
    assert "linear" in doc["graph_module"]["graph"]["tensor_values"]
    assert doc["graph_module"]["module_call_graph"][0]["signature"]["in_spec"]
    check_pt2_archive(good)  # and torch's own file passes


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_value_the_schema_does_not_declare_is_refused(kind, good, tmp_path):
    edit, message = CRAFTED[kind]
    crafted = _edited(good, tmp_path / "crafted.pt2", edit)
    with pytest.raises(CheckpointError, match="refused: .*" + message):
        check_pt2_archive(crafted)
    with pytest.raises(CheckpointError, match="refused"):
        load_program_safely(crafted)


def test_a_payload_table_of_another_shape_is_refused(good, tmp_path):
    """The weights' table is checked against the schema too: ``use_pickle`` given as a string
    (truthy to torch) is not a boolean."""
    dst = tmp_path / "table.pt2"
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(dst, "w") as zo:
        for item in zi.infolist():
            data = zi.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                doc = json.loads(data)
                next(iter(doc["config"].values()))["use_pickle"] = "no"
                data = json.dumps(doc).encode()
            zo.writestr(item, data)
    with pytest.raises(CheckpointError, match="is not true or false"):
        check_pt2_archive(dst)


def _meta_edited(good: Path, dst: Path, **meta) -> Path:
    """``good`` with its first weight's ``tensor_meta`` fields set to ``meta``."""
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(dst, "w") as zo:
        for item in zi.infolist():
            data = zi.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                doc = json.loads(data)
                next(iter(doc["config"].values()))["tensor_meta"].update(meta)
                data = json.dumps(doc).encode()
            zo.writestr(item, data)
    return dst


def _ints(*values: int) -> list[dict]:
    return [{"as_int": v} for v in values]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (  # 1.6 GB of one value over the first weight's 4 bytes... (a 9 KB file: 6.7 GB at export)
            {"sizes": _ints(20000, 20000), "strides": _ints(0, 0)},
            "has 400,000,000 values over a record of",
        ),
        ({"storage_offset": {"as_int": 10**6}}, "reaches byte"),
        ({"storage_offset": {"as_int": -1}}, "negative"),
        ({"strides": _ints(1, 10**6)}, "reaches byte"),
        ({"strides": [{"as_expr": {"expr_str": "Symbol('s0')"}}, {"as_int": 1}]}, "symbolic"),
        # a weight on the meta device: a raw NotImplementedError when its layer was rebuilt
        ({"device": {"type": "meta", "index": None}}, "is on device 'meta'"),
    ],
)
def test_a_weight_that_is_no_view_of_its_record_s_bytes_is_refused(meta, message, good, tmp_path):
    """torch makes each weight with ``as_strided`` over its record from the table's sizes,
    strides and offset: one that views more values than the record holds, or bytes past it, is
    refused, as a ``.pt`` file's is."""
    crafted = _meta_edited(good, tmp_path / "view.pt2", **meta)
    with pytest.raises(CheckpointError, match="refused: .*" + message):
        check_pt2_archive(crafted)


class _Varied(nn.Module):
    """A program with what the schema check must let through: a buffer, a constant, an op
    with a string argument and one with a device, symbolic sizes, a subgraph (``torch.cond``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("scale", torch.ones(6))
        self.const = torch.arange(6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.gelu(self.fc(x), approximate="tanh") * self.scale + self.const
        y = y + torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None]
        return torch.cond(y.sum() > 0, lambda t: t.relu(), lambda t: t.abs(), (y,))


@pytest.mark.filterwarnings("ignore")
def test_programs_torch_writes_pass_and_run_the_same(tmp_path):
    model = _Varied().eval()
    x = torch.randn(3, 6)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    loaded = load_program_safely(buf.getvalue())
    for batch in (3, 5):
        xb = torch.randn(batch, 6)
        torch.testing.assert_close(loaded.module()(xb), model(xb))


# --- a fifth review: the higher-order operators a program may call ------------------------------


class _Prints(nn.Module):
    """A program that prints with ``torch.ops.higher_order.print``, whose format string (the
    file's) reads attributes of its arguments: ``{0.__class__...__globals__[...]}`` reached the
    process's environment."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.higher_order.print("LEAKED {0.__class__.__name__}", x.sum())
        return self.fc(x)


@pytest.mark.filterwarnings("ignore")
def test_a_program_that_prints_a_format_the_file_writes_is_refused(tmp_path, capfd):
    from compressdrop.checkpoint import load_model

    program = torch.export.export(_Prints(), (torch.randn(2, 4),))
    torch.export.save(program, tmp_path / "prints.pt2")
    with pytest.raises(
        CheckpointError, match=r"refused: a node calls 'torch\.ops\.higher_order\.print"
    ):
        load_model(tmp_path / "prints.pt2")
    assert "LEAKED" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.higher_order.inline_asm_elementwise",  # compiles the file's code on a GPU
        "torch.ops.higher_order.triton_kernel_wrapper_functional",
        "torch.ops.higher_order.executorch_call_delegate",
        "torch.ops.aten._print.default",
        "torch.ops.aten.save.default",
        "torch.ops.aten.warn.default",
        "torch.ops.aten._ctc_loss.default",  # a label past its classes crashed the process
        "torch.ops.aten.segment_reduce.default",  # offsets past its data: read out of bounds
        "torch.ops.aten._convert_indices_from_coo_to_csr.default",  # indices past the size
        "torch.ops.aten.embedding_dense_backward.default",
        "torch.ops.aten._transform_bias_rescale_qkv.default",  # read past its bias
        "torch.ops.aten.__setattr__",  # the namespace's Python attribute, not an operator
        "torch.ops.aten.__class__",
    ],
)
def test_calls_that_run_or_write_what_the_file_says_are_refused(target, good, tmp_path):
    crafted = _edited(good, tmp_path / "crafted.pt2", _set("nodes.0.target", target))
    with pytest.raises(CheckpointError, match="refused: a node calls"):
        check_pt2_archive(crafted)


class _Dashed(nn.Module):
    """Module paths with "-" in them, as torchvision's RegNet names its blocks ("block1-0")."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential()
        self.trunk.add_module("block1-0", nn.Linear(4, 4))
        self.trunk.get_submodule("block1-0").register_buffer("scale-1", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.trunk.get_submodule("block1-0")
        return block(x) * block.get_buffer("scale-1")


@pytest.mark.filterwarnings("ignore")
def test_module_paths_with_dashes_load_and_quotes_do_not(tmp_path):
    """A RegNet `.pt2`, the slim one compressdrop wrote too, was refused ("a name is not an
    identifier: 'trunk_output.block1.block1-0.proj.0.weight'"): FX writes such a path quoted."""
    model = _Dashed().eval()
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,))
    torch.export.save(program, tmp_path / "dashed.pt2")
    torch.testing.assert_close(load_program_safely(tmp_path / "dashed.pt2").module()(x), model(x))

    def quoted(doc):
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if "parameter" in spec:
                spec["parameter"]["parameter_name"] = 'trunk.block1-0"),os.system("x'

    crafted = _edited(tmp_path / "dashed.pt2", tmp_path / "quoted.pt2", quoted)
    with pytest.raises(CheckpointError, match="a module path is not dotted names"):
        check_pt2_archive(crafted)


# --- a sixth review: a string input's value in the guard code torch generates ------------------


class _TakesAString(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mode: str = "a") -> torch.Tensor:
        return self.fc(x)


def _string_input(value: str):
    """An edit that sets the program's string input (and its constant) to ``value``."""

    def edit(doc):
        graph = doc["graph_module"]["graph"]
        graph["inputs"] = [{"as_string": value} if "as_string" in i else i for i in graph["inputs"]]
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if "constant_input" in spec:
                spec["constant_input"]["value"] = {"as_string": value}

    return edit


@pytest.mark.filterwarnings("ignore")
def test_a_string_input_cannot_break_out_of_the_guard_code(tmp_path):
    """``ExportedProgram.module()`` writes a string input's value into guard code between
    single quotes, unescaped, and runs it: a backslash-newline and a quote ran the file's code
    at load. Strings with quotes, backslashes or line breaks are refused, and the module is
    built without the guard code."""
    from compressdrop.programs import convert

    program = torch.export.export(_TakesAString(), (torch.randn(2, 4), "abc"))
    torch.export.save(program, tmp_path / "good.pt2")
    marker = tmp_path / "marker"
    code = list(f"open({str(marker)!r}, 'w').write('x')".encode())  # no quote of its own
    payload = "\\\n',1)\nexec(bytes(" + str(code) + "))\ndef f():\n  return 1#"
    crafted = _edited(tmp_path / "good.pt2", tmp_path / "evil.pt2", _string_input(payload))
    with pytest.raises(CheckpointError, match="a string holds quotes, backslashes or line breaks"):
        check_pt2_archive(crafted)
    # and were it let through, the module is built without torch's guard code
    loaded = torch.export.load(crafted)
    convert.program_to_module(loaded)
    assert not marker.exists()
    loaded.module()  # (torch's own: the guard code runs the payload)
    assert marker.exists()
