"""A compressdrop checkpoint's records, checked before anything is built from them.

:func:`compressdrop.load_model` rebuilds a model from the plain data a file holds. A file is
anyone's, so each record it reads is checked for its type and its size before any model, gate or
tensor is made from it, and one that does not fit is a one-line
:class:`~compressdrop.errors.CheckpointError` naming the record (as
:class:`~compressdrop.arch.ArchRecord` is for the ``arch`` record).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import ArchRecord
from ..errors import CheckpointError, InputError, prefixed
from ..gates import GATES, check_gate_kwargs, gate_class
from ..gating import attach
from ..gating.costs import KL_COSTS, check_kl_scale
from ..gating.groups import GRANULARITIES
from ..hf_files import TOKENIZER_BYTES, TOKENIZER_FILES
from ..pruning.report import PruneReport
from ._common import _MAX_DIMS, _among, _what
from .noise import check_noise
from .sites import check_sites

__all__ = [
    "INPUT_DTYPES",
    "MAX_INPUT_VALUES",
    "Payload",
    "check_attach",
    "check_inputs",
    "check_noise",
    "check_sites",
    "check_tokenizer",
    "input_values_cap",
]

#: values per example, over all of a gated model's inputs, at most: 16.7 million (128 MB of
#: float32 in the batch of two that re-attaching the gates traces). Where the ``arch`` record
#: gives one example's shape, at most 64 times its values (an image traced at 8 times its side),
#: and at least 65,536 (a token model traced at a longer sequence than it records).
MAX_INPUT_VALUES = 1 << 24
_PER_ARCH_VALUE, _FLOOR = 64, 1 << 16
_MAX_INPUTS = 64
#: the dtypes an input may be drawn in (:func:`compressdrop.gating.random_inputs`)
INPUT_DTYPES = (
    *("float16", "bfloat16", "float32", "float64"),
    *("uint8", "int8", "int16", "int32", "int64", "bool"),
)
_SPEC_KEYS = {"shape", "dtype", "high"}


def input_values_cap(arch_shape: tuple[int, ...] | None) -> int:
    """The most values per example a gated file's inputs may hold (see :data:`MAX_INPUT_VALUES`)."""
    if arch_shape is None:
        return MAX_INPUT_VALUES
    return min(MAX_INPUT_VALUES, max(_PER_ARCH_VALUE * math.prod(arch_shape), _FLOOR))


def check_inputs(
    specs: Any, arch_shape: tuple[int, ...] | None = None, record: str = "inputs"
) -> list[dict[str, Any]]:
    """A gated file's input specs (what :func:`compressdrop.gating.input_specs` records), checked
    before :func:`~compressdrop.gating.random_inputs` draws them: a list of at most 64 mappings,
    each with a ``shape`` (a list of at most 16 non-negative sizes), a ``dtype`` of
    :data:`INPUT_DTYPES` (float32 if none) and a ``high`` (``None``, or for token ids an integer
    within the dtype), their values per example together at most :func:`input_values_cap` of
    ``arch_shape`` (the ``arch`` record's). ``record``: ``input_shape`` for an older file's shapes.

    Returns:
        The specs as plain dicts with all three keys.

    Raises:
        CheckpointError: anything else, in one line naming the record.
    """
    if not isinstance(specs, list | tuple) or not specs or len(specs) > _MAX_INPUTS:
        raise CheckpointError(
            f"{record} record: expected a list of 1 to {_MAX_INPUTS} input specs, got {_what(specs)}"
        )
    cap, total, out = input_values_cap(arch_shape), 0, []
    for i, spec in enumerate(specs):
        where = f"{record} record, input {i}"
        if record == "input_shape":  # an older file's shapes alone
            spec = {"shape": spec}
        if not isinstance(spec, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {_what(spec)}")
        unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
        if unknown:
            raise CheckpointError(
                f"{where}: unknown key(s) {unknown} (known: {sorted(_SPEC_KEYS)})"
            )
        shape = spec.get("shape")
        if not (
            isinstance(shape, list | tuple)
            and len(shape) <= _MAX_DIMS
            and all(type(d) is int and 0 <= d <= cap for d in shape)
        ):
            raise CheckpointError(
                f"{where}: shape must be a list of at most {_MAX_DIMS} sizes from 0 to {cap:,}, "
                f"got {_what(shape)}"
            )
        dtype = spec.get("dtype", "float32")
        if not _among(dtype, INPUT_DTYPES):
            raise CheckpointError(
                f"{where}: dtype must be one of {INPUT_DTYPES}, got {_what(dtype)}"
            )
        high = spec.get("high")
        kind = getattr(torch, dtype)
        top = torch.iinfo(kind).max + 1 if not (kind.is_floating_point or kind == torch.bool) else 0
        if high is not None and not (type(high) is int and (not top or high <= top)):
            raise CheckpointError(
                f"{where}: high (the bound of token ids) must be an integer"
                f"{f' of at most {top}' if top else ''} or None, got {_what(high)}"
            )
        total += math.prod(shape)
        out.append({"shape": list(shape), "dtype": dtype, "high": high})
    if total > cap:
        of = "" if arch_shape is None else f" for the arch record's input_shape {list(arch_shape)}"
        raise CheckpointError(
            f"{record} record: the inputs hold {total:,} values per example, more than the "
            f"{cap:,} allowed{of}"
        )
    return out


#: the arguments of :func:`~compressdrop.attach` a gated file records (its ``attach_config``)
ATTACH_ARGS = ("gate", "granularity", "include", "exclude", "gate_kwargs", "kl_cost", "kl_scale")
_CHOICES = {"gate": tuple(GATES), "granularity": GRANULARITIES, "kl_cost": KL_COSTS}


def check_attach(record: Any) -> dict[str, Any]:
    """A gated file's ``attach`` record, checked before the gates are attached with it: only
    :data:`ATTACH_ARGS` (those missing take attach's defaults), ``gate`` a family's name,
    ``granularity`` and ``kl_cost`` among attach's choices, ``include`` and ``exclude`` a name
    glob or a list of them, ``gate_kwargs`` and ``kl_scale`` mappings that attach's own checks
    pass (:func:`~compressdrop.gates.check_gate_kwargs`, the KL factors').

    Returns:
        Every argument of :data:`ATTACH_ARGS`, for ``attach(model, **args, example_inputs=...)``.

    Raises:
        CheckpointError: anything else, in one line naming the argument.
    """
    if not isinstance(record, Mapping):
        raise CheckpointError(f"attach record: expected a mapping, got {_what(record)}")
    unknown = sorted(str(k) for k in record if k not in ATTACH_ARGS)
    if unknown:
        raise CheckpointError(f"attach record: {unknown} not among attach's {list(ATTACH_ARGS)}")
    params = inspect.signature(attach).parameters
    args = {k: record.get(k, params[k].default) for k in ATTACH_ARGS}
    for key, allowed in _CHOICES.items():
        if not _among(args[key], allowed):
            raise CheckpointError(
                f"attach record: {key} must be one of {allowed}, got {_what(args[key])}"
            )
    for key in ("include", "exclude"):
        value = args[key]
        globs = [value] if isinstance(value, str) else value if isinstance(value, list) else [0]
        if value is not None and not all(isinstance(g, str) for g in globs):
            raise CheckpointError(
                f"attach record: {key} must be a name glob or a list of them, got {_what(value)}"
            )
    for key in ("gate_kwargs", "kl_scale"):
        if args[key] is not None and not isinstance(args[key], Mapping):
            raise CheckpointError(f"attach record: {key} must be a mapping, got {_what(args[key])}")
    try:  # attach's own checks, run before it is called
        args["gate_kwargs"] = check_gate_kwargs(gate_class(args["gate"]), args["gate_kwargs"])
        args["kl_scale"] = check_kl_scale(args["kl_scale"])
    except InputError as e:
        raise CheckpointError(f"attach record: {e}") from None
    return args


def check_state(state: Any) -> dict[str, torch.Tensor]:
    """A file's ``state_dict``: a mapping of names to tensors.

    Raises:
        CheckpointError: anything else, naming the first entry that is not.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"state_dict record: expected a mapping of names to tensors, got {_what(state)}"
        )
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise CheckpointError(
                f"state_dict record: {_what(key)} holds {_what(value)}, not a named tensor"
            )
    return dict(state)


def _plain_map(value: Any, record: str) -> dict[str, Any] | None:
    """``value`` as a dict if it is ``None`` or a mapping with string keys."""
    if value is None:
        return None
    if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        raise CheckpointError(f"{record}: expected a mapping with string keys, got {_what(value)}")
    return dict(value)


def check_tokenizer(value: Any) -> dict[str, bytes]:
    """A ``tokenizer`` record: the files of :data:`~compressdrop.hf_files.TOKENIZER_FILES` by
    name, each a one-dimensional uint8 tensor, all together at most
    :data:`~compressdrop.hf_files.TOKENIZER_BYTES` (the name is a file a slim folder gets)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"tokenizer record: expected a mapping, got {_what(value)}")
    files, total = {}, 0
    for name, data in value.items():
        if not _among(name, TOKENIZER_FILES):
            raise CheckpointError(f"tokenizer record: {_what(name)} is not a tokenizer file")
        if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1):
            raise CheckpointError(f"tokenizer record: {name} is not bytes ({_what(data)})")
        total += data.numel()
        if total > TOKENIZER_BYTES:
            raise CheckpointError(f"tokenizer record: over {TOKENIZER_BYTES >> 20} MiB")
        files[name] = data.numpy().tobytes()
    return files


@dataclass(frozen=True)
class Payload:
    """The records of a compressdrop checkpoint that :func:`compressdrop.load_model` reads,
    checked (:meth:`from_dict`).

    Attributes:
        kind: ``"dense"``, ``"gated"`` or ``"slim"``.
        arch: the structure (:class:`~compressdrop.arch.ArchRecord`).
        state_dict: the weights, names to tensors.
        attach: for a gated model, attach's arguments (:func:`check_attach`).
        sites: for a gated model, where its gates sit (:func:`check_sites`); ``None`` for a file
            written before they were recorded (optional: such files load as before).
        inputs: for a gated model, its input specs (:func:`check_inputs`): its ``inputs``
            record, else the shapes alone of an older file's ``input_shape``.
        report: for a slim model, its :class:`~compressdrop.pruning.PruneReport`.
        noise: for a slim model with its noise, the noisy sites (:func:`check_noise`).
        slim_program: a slim model saved as its own program (no history to replay).
        classes: the outputs' class names, if recorded.
        tokenizer: the tokenizer files of the Hugging Face folder the model came from, by name
            (:func:`check_tokenizer`).
        recipe: the recipe that made the model (its ``data`` and ``prune`` mappings), if any.
        meta: free-form notes, a mapping.
    """

    kind: str
    arch: ArchRecord
    state_dict: dict[str, torch.Tensor]
    attach: dict[str, Any] = field(default_factory=dict)
    sites: list[dict[str, Any]] | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    report: PruneReport | None = None
    noise: list[dict[str, Any]] = field(default_factory=list)
    slim_program: bool = False
    classes: tuple[str, ...] | None = None
    tokenizer: dict[str, bytes] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Payload:
        """Check the records a checkpoint's dict holds; nothing is built or drawn.

        Raises:
            CheckpointError: a record missing, of another type or too large, in one line that
                starts with ``where`` and names the record.
        """
        if not isinstance(data.get("arch"), Mapping):
            raise CheckpointError(
                f"{where}: arch record (the model's structure): expected a mapping, got "
                f"{_what(data.get('arch'))}"
            )
        arch = ArchRecord.from_dict(data["arch"], where)
        with prefixed(where):
            return cls._checked(data, arch)

    @classmethod
    def _checked(cls, data: Mapping[str, Any], arch: ArchRecord) -> Payload:
        kind = data.get("kind")
        if not _among(kind, ("dense", "gated", "slim")):
            raise CheckpointError(f"unknown checkpoint kind {_what(kind)}")
        state = check_state(data.get("state_dict"))
        slim_program, classes = data.get("slim_program") or False, data.get("classes")
        if not isinstance(slim_program, bool):
            raise CheckpointError(f"slim_program must be true or false, got {_what(slim_program)}")
        if classes is not None and not (
            isinstance(classes, list | tuple) and all(isinstance(c, str) for c in classes)
        ):
            raise CheckpointError(f"classes record: expected a list of names, got {_what(classes)}")
        recipe = _plain_map(data.get("recipe"), "recipe record")
        for key in ("data", "prune"):  # what compressdrop reads back from it
            _plain_map((recipe or {}).get(key), f"recipe record's {key}")
        gated, slim = kind == "gated", kind == "slim"
        if slim and data.get("prune_report") is None:
            raise CheckpointError("a slim checkpoint without its prune_report record")
        if gated and data.get("attach") is None:
            raise CheckpointError("a gated checkpoint without its attach record")
        inputs = "inputs" if data.get("inputs") is not None else "input_shape"
        if gated and data.get(inputs) is None:
            raise CheckpointError("a gated checkpoint without its inputs record (nor input_shape)")
        return cls(
            kind=str(kind),
            arch=arch,
            state_dict=state,
            attach=check_attach(data["attach"]) if gated else {},
            sites=check_sites(data.get("sites"), state) if gated else None,
            inputs=check_inputs(data[inputs], arch.input_shape, inputs) if gated else [],
            report=PruneReport.from_dict(data["prune_report"], "prune_report record")
            if slim
            else None,
            noise=check_noise(data["noise"], state) if slim and data.get("noise") else [],
            slim_program=slim_program,
            classes=None if classes is None else tuple(classes),
            tokenizer=check_tokenizer(data.get("tokenizer")),
            recipe=recipe,
            meta=_plain_map(data.get("meta"), "meta record") or {},
        )
