"""What a model file says about its structure, and who decides that code runs to build it.

A compressdrop model file records its structure as an :class:`ArchRecord`: plain data naming a
built-in reference net (``name``) or a factory function (``factory = "package.module:function"``)
and the factory's keyword arguments. Building a record calls code, so a factory that a *file*
names is called only when

* it is one of compressdrop's reference nets (:data:`compressdrop.models.MODELS`), or
* the user named it: passed the callable or its ``"package.module:function"`` (Python: ``arch=``;
  CLI: ``--arch``), or registered it with :func:`add_safe_factories` (as
  ``torch.serialization.add_safe_globals`` registers classes for the weights-only unpickler), or
* the user trusted the whole file (``trust_code=True``; CLI: ``--trust-code``).

Anything else is refused with a :class:`CheckpointError` that names what the file asked to run,
before its module is imported (importing a module runs its code).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._torchvision import retry_with_torchvision
from .errors import CheckpointError, prefixed
from .programs import load_program

__all__ = [
    "ArchRecord",
    "CheckpointError",
    "add_safe_factories",
    "build_arch",
    "check_spec",
    "check_state_fits",
    "factory_spec",
    "safe_factories",
]

Factory = Callable[..., nn.Module]

_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = {"name", "factory", "program", "input_shape", "num_classes", "kwargs"}
_SAFE: dict[str, Factory | None] = {}  # registered: spec -> callable (None: import on use)


def factory_spec(fn: Callable[..., Any]) -> str:
    """``"package.module:function"`` of a module-level callable."""
    return f"{fn.__module__}:{fn.__qualname__}"


def add_safe_factories(factories: Iterable[Factory | str]) -> None:
    """Allow model files to name these factories (callables, or ``"package.module:function"``).

    Registration is consent given in code: afterwards a checkpoint whose ``arch`` record names one
    of them loads without ``arch=`` or ``trust_code``. A string is imported only when a file asks
    for it.
    """
    for f in factories:
        if callable(f):
            _SAFE[factory_spec(f)] = f
        else:
            _SAFE[check_spec(str(f), "add_safe_factories")] = None


def safe_factories() -> list[str]:
    """The factories a file may name without further consent: compressdrop's reference nets and
    those registered with :func:`add_safe_factories`."""
    return sorted({*_reference_specs(), *_SAFE})


def _reference_specs() -> dict[str, Factory]:
    from .models import MODELS

    return {factory_spec(fn): fn for fn in MODELS.values()}


def check_spec(spec: str, where: str) -> str:
    """``spec`` if it names a factory as ``package.module:function``.

    Raises:
        CheckpointError: anything else, named after ``where``.
    """
    if not _SPEC.match(spec):
        raise CheckpointError(f"{where}: factory {spec!r} must look like 'package.module:function'")
    return spec


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data (None, bool, numbers, strings, lists and str-keyed dicts)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"{where}: {type(value).__name__} is not plain data")


@dataclass(frozen=True)
class ArchRecord:
    """A model's structure as plain data: a reference net by ``name``, a ``factory``, or a
    ``torch.export`` ``program``.

    Attributes:
        name: a key of :data:`compressdrop.models.MODELS` (``lenet5``, ``resnet``, ...).
        factory: ``"package.module:function"`` returning the ``nn.Module``.
        program: the bytes (a uint8 tensor) of a ``.pt2`` of the dense model, for models with no
            factory (a ``.pt2`` or a pickled module brought by the user); rebuilt by
            :func:`compressdrop.programs.load_program`, which runs no code from it.
        input_shape: one example's shape without the batch, e.g. ``(1, 28, 28)``; also passed to a
            factory that takes an ``input_shape`` parameter.
        num_classes: passed to a reference net, or to a factory with a ``num_classes`` parameter.
        kwargs: further keyword arguments of the factory, plain data only.
    """

    name: str | None = None
    factory: str | None = None
    program: torch.Tensor | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.name, self.factory, self.program)) != 1:
            raise CheckpointError(
                "an arch record names exactly one of a reference net, a factory or a program"
            )
        if self.program is not None and not (
            isinstance(self.program, torch.Tensor)
            and self.program.dtype == torch.uint8
            and self.program.dim() == 1
        ):
            raise CheckpointError("arch record: program must be the bytes of a .pt2 (uint8)")
        if self.factory is not None:
            check_spec(self.factory, "arch record")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
                raise CheckpointError(f"arch record: bad input_shape {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        if self.num_classes is not None and not (
            isinstance(self.num_classes, int) and self.num_classes > 0
        ):
            raise CheckpointError(f"arch record: bad num_classes {self.num_classes!r}")
        object.__setattr__(self, "kwargs", _plain(dict(self.kwargs), "arch record kwargs"))

    @classmethod
    def from_dict(cls, data: Any, where: str = "arch record") -> ArchRecord:
        """Validate a record read from a file (unknown keys and non-plain values are errors)."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {unknown}")
        with prefixed(where):
            return cls(**{k: data[k] for k in _KEYS if k in data and data[k] is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (``from_dict`` of it gives the same record)."""
        out: dict[str, Any] = (
            {"name": self.name}
            if self.name
            else {"factory": self.factory}
            if self.factory
            else {"program": self.program}
        )
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        out["kwargs"] = dict(self.kwargs)
        return out

    @property
    def label(self) -> str:
        """The reference net's name or the factory's spec."""
        return self.name or self.factory or "program"


def build_arch(
    record: ArchRecord | Mapping[str, Any],
    *,
    factory: Factory | str | None = None,
    trust_code: bool = False,
    where: str = "model file",
) -> nn.Module:
    """Build a fresh (dense, untrained) model from ``record``, calling only allowed code.

    Args:
        record: the structure, as an :class:`ArchRecord` or its dict.
        factory: the user's own choice of factory (a callable, or ``"package.module:function"``):
            it is called instead of the one the record names. This is consent.
        trust_code: call whatever factory the record names, and take any operator its program
            calls, not only the allowlist's (the user trusts the file).
        where: the file's name, for error messages.

    Returns:
        The model, with ``model.arch`` set to the record's dict.

    Raises:
        CheckpointError: the record names a factory nobody allowed, or it cannot be imported or
            called with the record's arguments.
    """
    from .models import MODELS, build_model

    rec = record if isinstance(record, ArchRecord) else ArchRecord.from_dict(record, where)
    if isinstance(factory, str) and factory in MODELS:  # --arch NAME: a reference net, no code
        rec, factory = replace(rec, name=factory, factory=None, program=None), None
    if factory is None and rec.program is not None:
        return load_program(rec.program.numpy().tobytes(), where, any_operator=trust_code)
    if factory is None and rec.name is not None:
        try:
            model = build_model(
                rec.name,
                input_shape=rec.input_shape or (1, 28, 28),
                num_classes=rec.num_classes or 10,
                **rec.kwargs,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where}: cannot build reference net {rec.name!r}: {e}"
            ) from None
        return model
    if callable(factory):
        fn, spec = factory, factory_spec(factory)
    else:
        spec = check_spec(str(factory or rec.factory or rec.name), where)
        fn = _resolve(
            spec, user_named=factory is not None, trust_code=trust_code, where=where, rec=rec
        )
    model = _call(fn, spec, rec, where)
    # keep what the factory recorded itself (a reference net's input shape, classes) unless the
    # record says otherwise; the factory actually called is the one recorded
    own = getattr(model, "arch", None)
    own = (
        {k: v for k, v in own.items() if k in _KEYS - {"name"}} if isinstance(own, Mapping) else {}
    )
    mine = rec.to_dict()
    mine.pop("name", None)
    # nn.Module.__setattr__ is typed for tensors and modules only; any value may be set
    model.arch = {**own, **mine, "factory": spec, "kwargs": dict(rec.kwargs)}  # type: ignore[assignment]
    return model


#: a slim file's weights against its dense architecture's: pruning keeps at least 1/64 of a
#: network's weights in practice (a net pruned further is small: the fixed part, 256 MB of
#: float32), so a record whose dense net is larger asks for memory its file does not justify
_SLIM_PER_WEIGHT, _SLIM_FIXED = 64, 1 << 26


def check_state_fits(
    record: ArchRecord | Mapping[str, Any],
    state: Any,
    *,
    kind: Any = "dense",
    factory: Factory | str | None = None,
    trust_code: bool = False,
    where: str = "model file",
    hint: str = "",
) -> None:
    """Refuse a record whose structure the file's weights cannot fill, before it is built.

    The record's sizes (``input_shape``, ``num_classes``, ``kwargs``) are the file's: a 1.5 KB
    checkpoint asked for a LeNet-300-100 of 10 million inputs and took 12 GB before its weights
    were found not to fit. The model is built on the ``meta`` device (no memory) and its
    ``state_dict`` compared with the file's: names and shapes exactly for a dense model; for a
    gated one, as many weights at least (the gated file holds the dense weights under other
    names, and its gates); for a slim one, at most 64 times as many plus 64 million
    (:data:`_SLIM_PER_WEIGHT`, :data:`_SLIM_FIXED`). A program record is bounded where it is
    loaded; a factory that cannot build on the ``meta`` device is built as before.

    Args:
        record: the structure, as for :func:`build_arch`.
        state: the file's ``state_dict``.
        kind: the checkpoint's kind: ``"dense"``, ``"gated"`` or ``"slim"``.
        factory: as for :func:`build_arch`.
        trust_code: as for :func:`build_arch`.
        where: the file's name, for error messages.
        hint: said after "the architecture" in the error (what was built).

    Raises:
        CheckpointError: the weights do not fit, or :func:`build_arch` refuses the record.
    """
    from .models import too_deep

    rec = record if isinstance(record, ArchRecord) else ArchRecord.from_dict(record, where)
    if (rec.program is not None and factory is None) or not isinstance(state, Mapping):
        return
    if rec.name is not None and factory is None and (deep := too_deep(rec.kwargs, state)):
        raise CheckpointError(f"{where}: {deep}: the net would build them one by one; refused")
    try:
        with torch.device("meta"):
            shell = build_arch(rec, factory=factory, trust_code=trust_code, where=where)
    except CheckpointError:
        raise
    except Exception:  # a factory that needs real tensors to build: built as before
        return
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    why = _misfit(want, got, kind)
    if why:
        raise CheckpointError(f"{where}: weights do not fit the architecture{hint}: {why}")


def _misfit(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], kind: Any) -> str:
    """What keeps the file's weights (``got``) from the architecture's (``want``), or ""."""
    count = lambda shapes: sum(math.prod(s) for s in shapes.values())  # noqa: E731
    n_want, n_got = count(want), count(got)
    if kind == "gated" and n_got < n_want:
        return f"the file holds {n_got:,} weights, the architecture has {n_want:,}"
    if kind == "slim" and n_want > _SLIM_PER_WEIGHT * n_got + _SLIM_FIXED:
        return (
            f"the architecture has {n_want:,} weights, more than {_SLIM_PER_WEIGHT} times the "
            f"{n_got:,} the pruned file holds (plus {_SLIM_FIXED:,})"
        )
    if kind != "dense":
        return ""
    ddp = {k.removeprefix("module."): s for k, s in got.items() if k.startswith("module.")}
    if len(ddp) == len(got) and ddp.keys() == want.keys():  # DDP's keys, as _load_state reads
        got = ddp
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k} is {list(got[k])} in the file, {list(s)} in the architecture"
              for k, s in want.items() if k in got and got[k] != s]  # fmt: skip
    parts = [f"missing key(s) {_few(missing)}"] if missing else []
    parts += [f"unexpected key(s) {_few(unexpected)}"] if unexpected else []
    return "; ".join(parts + ([_few(shapes, "; ")] if shapes else []))


def _few(items: list[str], sep: str = ", ") -> str:
    return sep.join(items[:3]) + (" ..." if len(items) > 3 else "")


def _resolve(
    spec: str, *, user_named: bool, trust_code: bool, where: str, rec: ArchRecord
) -> Factory:
    refs = _reference_specs()
    if spec in refs:
        return refs[spec]
    registered = _SAFE.get(spec)
    if registered is not None:
        return registered
    if not (user_named or trust_code or spec in _SAFE):
        args = ", ".join(f"{k}={v!r}" for k, v in rec.kwargs.items())
        raise CheckpointError(
            f"{where} asks to build its model by calling {spec}({args}); a model file or recipe "
            "may not choose code to run, so it was refused and nothing was imported. If you trust "
            f"that function, name it yourself: --arch {spec} (Python: arch={spec!r}, or "
            "compressdrop.add_safe_factories), or trust it with --trust-code."
        )
    module_name, _, fn_name = spec.partition(":")
    try:
        obj: Any = retry_with_torchvision(lambda: importlib.import_module(module_name))
        for part in fn_name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        top = module_name.split(".")[0]
        hint = (
            f" (is {top!r} on Python's path? The compressdrop command does not look in the "
            "current folder: PYTHONPATH=. compressdrop ...)"
            if isinstance(e, ModuleNotFoundError) and e.name == top
            else ""
        )
        raise CheckpointError(f"{where}: cannot import factory {spec!r}: {e}{hint}") from None
    if not callable(obj):
        raise CheckpointError(f"{where}: {spec!r} is not callable")
    return obj


def _call(fn: Factory, spec: str, rec: ArchRecord, where: str) -> nn.Module:
    kwargs = dict(rec.kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    # only factories that name these parameters get them (torchvision's take num_classes via
    # **kwargs and no input_shape at all: pass them with kwargs / --arch-arg)
    if rec.input_shape is not None and "input_shape" in params:
        kwargs.setdefault("input_shape", rec.input_shape)
    if rec.num_classes is not None and "num_classes" in params:
        kwargs.setdefault("num_classes", rec.num_classes)
    try:
        model = retry_with_torchvision(lambda: fn(**kwargs))
    except TypeError as e:
        raise CheckpointError(f"{where}: calling {spec}(**{kwargs!r}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{where}: {spec} returned {type(model).__name__}, not an nn.Module")
    return model
