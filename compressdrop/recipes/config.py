"""Recipes: typed, validated configuration of a compression run.

A recipe is a YAML file validated into frozen dataclasses. Unknown keys, wrong types and
out-of-range values raise :class:`RecipeError`, which names the file and the key path
(``stages.sparsify.lr``). ``Recipe.from_dict`` / ``to_dict`` round-trip; YAML is only a way to write
those dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import CompressDropError, InputError
from .schedule import LR_SCHEDULES, KLSchedule

__all__ = [
    "DataConfig",
    "ExportConfig",
    "GateConfig",
    "ModelConfig",
    "PruneConfig",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "Stages",
]


class RecipeError(CompressDropError, ValueError):
    """A recipe that does not validate; the message names the file and the key path."""


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{path}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a built-in reference net (``lenet300``, ``lenet5``, ``vgg``, ``resnet``) or a
    user factory ``package.module:function`` that takes ``input_shape`` and ``num_classes``."""

    arch: str = "lenet300"
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """Data set (``digits``, ``fashion-mnist[:dir]``, a ``.npz`` path,
    ``images:DIR[,size=N|HxW][,channels=1|3][,test_fraction=F][,seed=S]`` or ``text:PATH``; see
    :func:`compressdrop.data.load_dataset`), batch size, and the share of the training set held out for validation (model selection never looks
    at the test set)."""

    name: str = "digits"
    batch_size: int = 64
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", f"must be ≥ 1, got {self.batch_size}")
        _check(
            0 <= self.val_fraction < 1,
            "data.val_fraction",
            f"must be in [0, 1), got {self.val_fraction}",
        )


@dataclass(frozen=True)
class GateConfig:
    """Which gates, where: the arguments of :func:`compressdrop.attach`. ``kwargs`` are the gate
    family's constructor arguments (:func:`compressdrop.gates.gate_parameters`), checked here."""

    family: str = "lognormal"
    granularity: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kwargs: dict = field(default_factory=dict)
    kl_cost: str = "uniform"
    kl_scale: dict = field(default_factory=dict)

    def attach_kwargs(self) -> dict[str, Any]:
        """These settings as the keyword arguments of :func:`compressdrop.attach`: the same keys
        that :func:`compressdrop.gating.attach_config` reads back from a gated model, so a gated
        checkpoint re-attaches with ``attach(model, **config)`` too."""
        return {
            "gate": self.family,
            "granularity": self.granularity,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "gate_kwargs": dict(self.kwargs),
            "kl_cost": self.kl_cost,
            "kl_scale": dict(self.kl_scale),
        }

    def __post_init__(self) -> None:
        from ..gates import GATES, gate_kwargs_problem
        from ..gating.costs import KL_COSTS, check_kl_scale
        from ..gating.groups import GRANULARITIES

        _check(
            self.family in GATES,
            "gates.family",
            f"unknown family {self.family!r}; one of {sorted(GATES)}",
        )
        # the names against the family's constructor, the values by building one gate with them:
        # a bad argument fails here, not after the pretrain stage
        problem = gate_kwargs_problem(GATES[self.family], self.kwargs)
        if problem is not None:
            name, message = problem
            _check(False, f"gates.kwargs{f'.{name}' if name else ''}", message)
        _check(
            self.granularity in GRANULARITIES,
            "gates.granularity",
            f"must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}",
        )
        _check(
            self.kl_cost in KL_COSTS,
            "gates.kl_cost",
            f"must be one of {KL_COSTS}, got {self.kl_cost!r}",
        )
        try:
            check_kl_scale(self.kl_scale)
        except InputError as e:
            _check(False, "gates.kl_scale", str(e).removeprefix("kl_scale: "))


@dataclass(frozen=True)
class StageConfig:
    """One training stage: epochs, optimizer and learning rates (``gate_lr`` for gate parameters).

    ``lr_schedule``: ``constant``, or ``cosine``: both learning rates fall along a half cosine
    from their value at the stage's first step to 0 after its last, step by step.
    """

    epochs: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 0.0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs", f"must be ≥ 0, got {self.epochs}")
        _check(
            self.optimizer in ("adam", "sgd"),
            "optimizer",
            f"must be adam or sgd, got {self.optimizer!r}",
        )
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.gate_lr > 0, "gate_lr", f"must be > 0, got {self.gate_lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        _check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )


@dataclass(frozen=True)
class Stages:
    """pretrain (dense) → sparsify (gates, ELBO) → prune → finetune (slim model)."""

    pretrain: StageConfig = field(default_factory=lambda: StageConfig(epochs=10))
    sparsify: StageConfig = field(default_factory=lambda: StageConfig(epochs=20))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=1e-4))

    def __post_init__(self) -> None:
        _check(
            self.sparsify.epochs >= 1,
            "stages.sparsify.epochs",
            "must be ≥ 1 (the gates need training)",
        )


@dataclass(frozen=True)
class PruneConfig:
    """Pruning threshold on the gates' SNR (``None``: the family's default); ``uniform``: every
    layer of a stack keeps as many units (a standard config; see :func:`compressdrop.prune`)."""

    threshold: float | None = None
    uniform: bool = False

    def __post_init__(self) -> None:
        _check(
            self.threshold is None or (math.isfinite(self.threshold) and self.threshold >= 0),
            "prune.threshold",
            f"must be a finite number ≥ 0, got {self.threshold}",
        )


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export of the slim model (``opset`` ``None``: the exporter's default)."""

    onnx: bool = True
    opset: int | None = None


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """A whole compression run. See ``compressdrop recipes list`` for examples (package data
    ``compressdrop/recipes/shipped/*.yaml``)."""

    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    kl: KLSchedule = field(default_factory=lambda: KLSchedule(beta=1.0, warmup=5.0))
    stages: Stages = field(default_factory=Stages)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    #: "fp32", or "bf16": the forward pass and loss under torch.autocast(bfloat16) (GPUs with
    #: bf16, or the CPU); the gates' KL, SNR and E[θ] stay float32 (closed forms run in float64).
    precision: str = "fp32"
    #: None (eager), or a ``torch.compile`` backend ("inductor", its default; "aot_eager" traces
    #: without generating code): each training stage compiles the forward pass. The gates trace
    #: without graph breaks; the loss's KL term, evaluation and pruning stay eager.
    compile: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.precision in PRECISIONS,
            "precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        if self.compile is not None:
            import torch

            known = torch.compiler.list_backends(exclude_tags=())
            _check(
                self.compile in known,
                "compile",
                f"must be null or a torch.compile backend ({', '.join(sorted(known))}), "
                f"got {self.compile!r}",
            )

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        """Validate a plain dict (from YAML) into a Recipe; errors name ``source`` and the key path."""
        try:
            return _build(cls, data, "")
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what YAML files and checkpoints hold)."""
        return _to_plain(self)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def override(self, changes: dict[str, Any]) -> Recipe:
        """A copy with fields replaced by key path, every other field kept.

        Example:
            >>> r.override({"data.name": "digits", "stages.pretrain.epochs": 0, "seed": 1})

        Each level is rebuilt with ``dataclasses.replace``, so the nested configs validate again
        and fields not named keep their values.

        Raises:
            RecipeError: a key path that names no field.
        """
        out: Any = self
        for path, value in changes.items():
            out = _replace_path(out, path.split("."), value, path)
        return out


def _replace_path(obj: Any, keys: list[str], value: Any, path: str) -> Any:
    field_names = {f.name for f in dataclasses.fields(obj)}
    _check(keys[0] in field_names, path, f"unknown key (known: {', '.join(sorted(field_names))})")
    if len(keys) > 1:
        value = _replace_path(getattr(obj, keys[0]), keys[1:], value, path)
    return dataclasses.replace(obj, **{keys[0]: value})


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, base: Any = None) -> Any:
    """Validate ``data`` into ``cls``; keys it leaves out keep their values in ``base`` (the
    enclosing default), so a recipe may say only what differs from the defaults."""
    where = path or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise RecipeError(
            f"{_join(path, unknown[0])}: unknown key (known: {', '.join(sorted(names))})"
        )
    if base is None:
        base = cls()
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    kwargs.update(
        {k: _coerce(hints[k], v, _join(path, k), getattr(base, k)) for k, v in data.items()}
    )
    try:
        return cls(**kwargs)
    except ValueError as e:  # RecipeError from nested checks, ValueError from shared classes
        msg = str(e)
        # nested checks report their own field name; prefix the path of this object
        raise RecipeError(msg if msg.startswith(path) or not path else f"{path}.{msg}") from None


def _coerce(tp: Any, value: Any, path: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, base)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path, base if dataclasses.is_dataclass(base) else None)
    if tp is bool:
        _check(isinstance(value, bool), path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            path,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            path,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), path, f"expected a string, got {value!r}")
        return value
    if origin is tuple or tp is tuple:
        _check(isinstance(value, (list, tuple)), path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (str,)
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return dict(value)
    raise RecipeError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug
