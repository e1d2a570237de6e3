"""What pruning did, as data: units per group, the threshold, a replayable history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, brief

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BIAS",
    "EXPERTS",
    "HEADS",
    "PACKED",
    "STREAM",
    "LayerReport",
    "PruneReport",
    "check_history",
]

HEADS = "heads"  # the pruning history's mark of an attention's removed heads
BIAS = "bias"  # ... and of a layer given a bias to fold a pruned unit's constant into
STREAM = "stream"  # ... and of a ShuffleNetV2 branch's removed channels (gating/shuffle.py)
EXPERTS = "experts"  # ... and of a fused experts module's removed neurons (gating/experts.py)
PACKED = "packed"  # ... and of a packed gate/up MLP's removed neurons (gating/packed_mlp.py)
MARKS = (HEADS, BIAS, STREAM, EXPERTS, PACKED)


@dataclass(frozen=True)
class LayerReport:
    """Units of one gated group before and after pruning.

    Attributes:
        name: the group's name (that of its first gated layer).
        before: units before pruning.
        after: units kept.
        threshold: the SNR threshold applied to the group.
    """

    name: str
    before: int
    after: int
    threshold: float


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` did: per-group units, the threshold, and a replayable pruning history.

    Attributes:
        family: the gate family of the pruned model.
        threshold: the threshold asked for; ``None``: each family's default.
        layers: one :class:`LayerReport` per gated group.
        history: the pruning history, for :func:`replay`: ``[attention, "heads", idxs]`` per
            attention whose heads were removed, ``[norm, "stream", idxs]`` per ShuffleNetV2
            branch whose channels were, ``[experts, "experts", idxs]`` per fused experts module
            whose neurons were, ``[layer, "bias", []]`` per layer given a bias, then
            Torch-Pruning's ``[name, is_out, idxs]`` per step.
        max_rel_error: the parity check's relative error of the slim model against the masked one.
        uniform: whether every layer of a stack kept as many units (``prune(uniform=True)``).
    """

    family: str
    threshold: float | None
    layers: list[LayerReport]
    history: list = field(repr=False)  # [name, a mark of MARKS | is_out, idxs]
    max_rel_error: float | None
    uniform: bool = False

    @property
    def units_before(self) -> int:
        """Gated units before pruning, over every group."""
        return sum(layer.before for layer in self.layers)

    @property
    def units_after(self) -> int:
        """Units kept, over every group."""
        return sum(layer.after for layer in self.layers)

    @property
    def architecture_before(self) -> str:
        """Units per gated group before pruning, e.g. ``"20-50-500"``."""
        return "-".join(str(layer.before) for layer in self.layers)

    @property
    def architecture_after(self) -> str:
        """Units per gated group after pruning, e.g. ``"5-17-120"``."""
        return "-".join(str(layer.after) for layer in self.layers)

    def architecture(self) -> str:
        """Units per gated group, e.g. ``"20-50-500 → 5-17-120"``."""
        return f"{self.architecture_before} → {self.architecture_after}"

    def metadata(self) -> dict[str, str]:
        """How the slim model was made: threshold, gate family, units before and after, as strings.

        Every exported file records them (ONNX ``metadata_props``, ``report.json``).
        """
        used = sorted({layer.threshold for layer in self.layers})
        default = "the family's default" + (f" ({used[0]:g})" if len(used) == 1 else "")
        return {
            "threshold": default if self.threshold is None else str(self.threshold),
            "gate_family": self.family,
            "architecture_before": self.architecture_before,
            "architecture_after": self.architecture_after,
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON- and ``weights_only``-safe), for :meth:`from_dict`."""
        d = asdict(self)
        d["history"] = [
            [n, o if o in MARKS else bool(o), [int(i) for i in idx]] for n, o, idx in self.history
        ]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "prune report") -> PruneReport:
        """The report :meth:`to_dict` wrote (as saved in checkpoints), checked field by field:
        ``family`` a string, ``threshold`` and ``max_rel_error`` numbers or ``None``, ``layers``
        a list of :class:`LayerReport` fields (a name, unit counts, a threshold), ``history`` as
        :func:`check_history` says, ``uniform`` true or false.

        Raises:
            CheckpointError: a field missing or of another type, named after ``where``.
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("family", "threshold", "layers", "history", "max_rel_error")
                   if k not in d]  # fmt: skip
        if missing:
            raise CheckpointError(f"{where}: missing {missing}")
        for key, fits, what in _FIELDS:
            if key in d and not fits(d[key]):
                raise CheckpointError(f"{where}: {key} must be {what}, got {brief(d[key])}")
        for i, layer in enumerate(d["layers"]):
            ok = isinstance(layer, Mapping) and set(layer) == _LAYER_KEYS
            ok = ok and isinstance(layer["name"], str) and _number(layer["threshold"])
            ok = ok and all(type(layer[k]) is int and layer[k] >= 0 for k in ("before", "after"))
            if not ok:
                raise CheckpointError(
                    f"{where}: layers[{i}] is not a name, units before and after and a threshold:"
                    f" {brief(layer)}"
                )
        return cls(
            d["family"],
            d["threshold"],
            [LayerReport(**layer) for layer in d["layers"]],
            check_history(d["history"]),
            d["max_rel_error"],
            bool(d.get("uniform", False)),  # (not recorded before 2026-12-06)
        )


_LAYER_KEYS = {"name", "before", "after", "threshold"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# a report's fields besides its history (check_history): (key, test, what it must be)
_FIELDS = (
    ("family", lambda v: isinstance(v, str), "a gate family's name"),
    ("threshold", lambda v: v is None or _number(v), "a number or None"),
    ("layers", lambda v: isinstance(v, list), "a list"),
    ("max_rel_error", lambda v: v is None or _number(v), "a number or None"),
    ("uniform", lambda v: isinstance(v, bool), "true or false"),
)


def check_history(history: Any, model: nn.Module | None = None) -> list:
    """``history`` if every step is ``[name, kind, indices]``: a module's dotted name (one of
    ``model.named_modules()`` when a model is given), ``True``/``False`` (Torch-Pruning's output
    or input channels) or one of :data:`MARKS`, and indices that are ints from 0 to below the
    module's largest size (its largest tensor's numel for :data:`EXPERTS`). A file's history is walked with ``getattr``
    by the replay: ``__class__.__init__.__globals__`` reached a module's globals.

    Raises:
        CheckpointError: a step that is none of these, named.
    """
    modules = dict(model.named_modules()) if model is not None else None
    if not isinstance(history, list):
        raise CheckpointError(f"prune history: expected a list, got {type(history).__name__}")
    for i, step in enumerate(history):
        three = isinstance(step, list | tuple) and len(step) == 3
        name, kind, idxs = step if three else (None, None, [])
        ok = isinstance(name, str) and (isinstance(kind, bool) or kind in MARKS)
        ok = ok and isinstance(idxs, list) and all(type(j) is int and j >= 0 for j in idxs)
        if ok and modules is not None:
            module = modules.get(name)
            sizes = [] if module is None else [*module.parameters(), *module.buffers()]
            top = max((max(t.shape, default=1) for t in sizes), default=None)
            if kind == EXPERTS and top is not None:  # flat indices e·I + j over all experts
                top = max(t.numel() for t in sizes)
            ok = module is not None and (top is None or all(j < top for j in idxs))
        if not ok:
            text = str(step)
            raise CheckpointError(
                f"prune history step {i} is not [a module's name, a kind, indices in its range]: "
                f"{text[:120]}{' ...' if len(text) > 120 else ''}"
            )
    return history
