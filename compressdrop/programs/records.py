"""Programs as model structure: a ``.pt2`` loaded as a module that records itself as its ``arch``,
and the ``arch`` record of a model that has no factory.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from typing import Any

import torch
from torch import fx, nn

from .._attrs import set_record
from ..errors import CheckpointError, prefixed
from ..runtime import max_length, no_cache
from ._measure import _leaves, _made_bytes, too_big_to_run
from ._source import Source, read_source
from .convert import program_to_module
from .load import load_program_safely
from .safety import _MALFORMED

__all__ = ["META_FILE", "ProgramWarning", "load_program", "program_record"]


def load_program(
    src: Source | bytes, where: str | None = None, *, any_operator: bool = False
) -> nn.Module:
    """A ``.pt2`` as a gateable, prunable module that records itself as its ``arch``.

    The module's ``arch`` is ``{"program": <the archive's bytes>, "input_shape": [...]}``, so a
    compressdrop checkpoint of it (dense, gated or slim) rebuilds the structure from the program,
    without any model code.

    Args:
        src: a path, an open binary file or the archive's bytes.
        where: the name for messages (default: the path).
        any_operator: take operators off the allowlist (the user trusts the file).

    Returns:
        The module (:func:`~compressdrop.programs.program_to_module`), in eval mode, with ``arch``
        set; ``input_shape`` is there when the program's only input has a static shape.

    Raises:
        CheckpointError: the archive cannot be read, or
            :func:`~compressdrop.programs.load_program_safely` refuses or cannot load it.
    """
    data, where = read_source(src, where)
    with torch.random.fork_rng(devices=[]):  # its layers are built, then given the weights
        model = program_to_module(load_program_safely(data, where, any_operator=any_operator))
    arch: dict[str, Any] = {"program": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    # nn.Module.__setattr__ is typed for tensors and modules only; any value may be set
    model.arch = arch  # type: ignore[assignment]
    shape = _input_shape(model)
    if shape is not None:
        arch["input_shape"] = list(shape)
    _check_batch_free(model, where)
    classes = _recorded_classes(data)
    if classes is not None:
        set_record(model, "class_names", classes)
    return model


#: the archive's extra file (``extra/compressdrop.json``) that says what made a program
#: :func:`compressdrop.export.export_program` wrote: the version, how it was pruned and its
#: outputs' class names (``classes``), as in ONNX metadata
META_FILE = "compressdrop.json"
# the most that file may hold: a record, not a payload
_META_BYTES, _MAX_CLASSES, _MAX_NAME = 1 << 20, 100_000, 1_000


def _recorded_classes(data: bytes) -> tuple[str, ...] | None:
    """The outputs' class names that :func:`compressdrop.export.export_program` records in the
    archive (``extra/compressdrop.json``), if it holds them as a list of strings; ``None`` for
    anything else (the archive is untrusted: a record too big to be one, damaged, not JSON,
    nested past the recursion limit)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = next(
                (i for i in z.infolist() if i.filename.endswith(f"/extra/{META_FILE}")), None
            )
            if info is None or info.file_size > _META_BYTES:
                return None
            with z.open(info) as f:  # at most the size it declares, plus one byte to tell
                raw = f.read(_META_BYTES + 1)
        names = json.loads(raw).get("classes") if len(raw) <= _META_BYTES else None
    except _MALFORMED:  # damaged, not JSON, not an object, too deep
        return None
    if not isinstance(names, list) or len(names) > _MAX_CLASSES:
        return None
    ok = all(isinstance(c, str) and len(c) <= _MAX_NAME for c in names)
    return tuple(names) if ok else None


@torch.no_grad()
def _check_batch_free(gm: nn.Module, where: str) -> None:
    """A program exported with a fixed batch size (``torch.export.export`` without
    ``dynamic_shapes``) must give, at another batch size, the same output per example as at its
    own; one whose graph bakes the size in (a reshape to it) does not, and is refused (see
    :func:`_fits`). Programs that do not repeat themselves (dropout left in training mode) are
    not judged; the random state is left as it was."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]  # type: ignore[union-attr]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if val is None or not val.shape or not isinstance(val.shape[0], int):
        return  # several inputs, or a dynamic batch
    batch = int(val.shape[0])
    shape = tuple(int(d) for d in val.shape[1:])
    try:
        why = too_big_to_run(gm, [((batch + 1, *shape), val.dtype)])
    except CheckpointError:  # a checked operator refuses another batch size (._checked)
        _refuse_disagreeing(gm, (batch, *shape), val.dtype, where)  # its own too?
        raise _fixed_batch(where, batch) from None  # nothing run: the graph depends on its size
    if why and _fails_off_its_size(gm, batch, shape, val.dtype):
        raise _fixed_batch(where, batch)  # a reshape to [batch, d, n] fails at another size
    if why:  # the check's run would take more memory than a model of its weights should
        warnings.warn(
            f"compressdrop: {where}: its batch-size check was not run ({why}); if it was "
            "exported with a fixed batch size that its graph depends on, it gives wrong outputs "
            "at other sizes",
            ProgramWarning,
            stacklevel=4,  # load_program's caller (no_grad adds a frame)
        )
        return
    with torch.random.fork_rng(devices=[]):
        x = (
            torch.rand(batch + 1, *shape, dtype=val.dtype) + 0.5  # positive: log and sqrt too
            if val.dtype.is_floating_point
            else torch.zeros(batch + 1, *shape, dtype=val.dtype)
        )
        with prefixed(where):  # a checked operator's shapes disagree (._checked)
            try:
                want, again = _leaves(gm(x[:batch])), _leaves(gm(x[:batch]))
            except CheckpointError:
                raise
            except Exception:  # fails at its own size: left to the caller to find
                return
        if len(want) != len(again) or not all(_same(a, b) for a, b in zip(want, again)):
            return  # random (dropout in training mode): nothing to compare
        try:
            got = _leaves(gm(x))
            ok = len(got) == len(want) and all(_fits(w, g, batch) for w, g in zip(want, got))
        except Exception:  # an op that fails at another size: the same verdict
            ok = False
    if not ok:
        raise _fixed_batch(where, batch)


def _fails_off_its_size(gm: nn.Module, batch: int, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether the fake run (:func:`~._measure._made_bytes`: shapes only, nothing allocated)
    fails at batch ``batch + 1`` and not at ``batch``: the graph depends on its batch size (a
    torchvision ViT's ``reshape(n, hidden_dim, n_h * n_w)``, fixed at the exported ``n``), which
    a real run would show the same way."""
    try:
        off = _made_bytes(gm, [((batch + 1, *shape), dtype)])
        return isinstance(off, str) and not isinstance(
            _made_bytes(gm, [((batch, *shape), dtype)]), str
        )
    except CheckpointError:  # a checked operator's shapes disagree: not this verdict
        return False


def _fixed_batch(where: str, batch: int) -> CheckpointError:
    return CheckpointError(
        f"{where} was exported with a fixed batch size of {batch} that its graph depends on "
        "(it gives no output per example at another size); export it again with a dynamic "
        "batch: torch.export.export(model, (x,), dynamic_shapes=({0: "
        "torch.export.Dim('batch')},))"
    )


class ProgramWarning(UserWarning):
    """A ``.pt2`` program loaded without a check compressdrop would have made."""


def _refuse_disagreeing(
    gm: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, where: str
) -> None:
    """Refuse a graph whose checked operators' shapes disagree at its own input size (only
    measured: nothing is allocated)."""
    with prefixed(where):
        too_big_to_run(gm, [(shape, dtype)])


def _fits(want: torch.Tensor, got: torch.Tensor, batch: int) -> bool:
    """An output at ``batch`` + 1 against the same at ``batch``: one that grows with the batch
    holds the same values where the two overlap (a ``(B, B)`` similarity too); one that does not
    (a per-class prior) is the same; a scalar (a batch mean) is not judged."""
    if want.dim() == 0 and got.dim() == 0:
        return True
    if got.dim() == want.dim() and got.shape[:1] == (batch + 1,) and want.shape[:1] == (batch,):
        if any(g < w for g, w in zip(got.shape, want.shape)):
            return False
        return _same(got[tuple(slice(0, n) for n in want.shape)], want)
    return _same(got, want)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))


def program_record(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """An ``arch`` record for a model with no factory (a pickled module, say): its dense structure
    exported as a program, so that its checkpoints rebuild without pickled code.

    Args:
        model: the model; exported in eval mode, then put back in the mode it was in. Its
            buffers become persistent (in its ``state_dict``), as the program's are.
        example_input: a batch of inputs; the batch dimension is exported as dynamic.

    Returns:
        ``{"program": <the .pt2 archive's bytes as a uint8 tensor>, "input_shape": [...]}``, the
        shape being one example's (``example_input.shape[1:]``).

    Raises:
        CheckpointError: ``torch.export`` cannot capture the model.
    """
    # the program stores its sample input: a copy, not a view that holds a whole data set
    example_input = example_input.detach().clone()
    was = model.training
    model.eval()
    try:
        program = _export_dense(model, example_input)
    except Exception as e:
        raise CheckpointError(
            f"torch.export cannot capture {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}), so its structure cannot be saved "
            "without pickled code"
        ) from None
    finally:
        model.train(was)
    # the module the record rebuilds (an fx.GraphModule) holds every buffer as persistent: so
    # must this one's checkpoints, or they do not load back (a pickled BERT's position_ids)
    for sub in model.modules():
        sub._non_persistent_buffers_set.clear()
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return {
        "program": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
        "input_shape": list(example_input.shape[1:]),
    }


def _export_dense(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` exported with a dynamic batch and, for token ids ``(B, T)``, a dynamic length up
    to :func:`~compressdrop.runtime.max_length` where the model allows one (else the length
    fixed); a Hugging Face model without its key/value cache (an output torch cannot flatten).
    A pickled BERT or LLaMA had been recorded at its example's length: its slim model exported
    at that length alone, and a slim decoder could not generate."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with no_cache(model):
        if x.dtype in (torch.int64, torch.int32) and x.dim() == 2 and x.shape[1] >= 4:
            length = torch.export.Dim("length", min=2, max=max_length(model))
            with contextlib.suppress(Exception):  # a model of one length: the batch alone
                return torch.export.export(model, (x,), dynamic_shapes=({0: batch, 1: length},))
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


def _input_shape(gm: fx.GraphModule) -> tuple[int, ...] | None:
    """One example's shape from the program's only input, if it has one (a dynamic length: the
    example's)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if val is None:
        return None
    # a dynamic length (token ids): the example's, which the program keeps as the size's hint
    sizes = [s if isinstance(s, int) else getattr(s.node, "hint", None) for s in val.shape[1:]]
    ints = [s for s in sizes if isinstance(s, int)]
    return tuple(ints) if len(ints) == len(sizes) else None
