"""What pruning did, as data: units per group, the threshold, a replayable history."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BIAS", "HEADS", "STREAM", "LayerReport", "PruneReport"]

HEADS = "heads"  # the pruning history's mark of an attention's removed heads
BIAS = "bias"  # ... and of a layer given a bias to fold a pruned unit's constant into
STREAM = "stream"  # ... and of a ShuffleNetV2 branch's removed channels (gating/shuffle.py)


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
            branch whose channels were, ``[layer, "bias", []]`` per layer given a bias, then
            Torch-Pruning's ``[name, is_out, idxs]`` per step.
        max_rel_error: the parity check's relative error of the slim model against the masked one.
        uniform: whether every layer of a stack kept as many units (``prune(uniform=True)``).
    """

    family: str
    threshold: float | None
    layers: list[LayerReport]
    history: list = field(repr=False)  # [name, "heads" | "stream" | "bias" | is_out, idxs]
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
            [n, o if o in (HEADS, BIAS, STREAM) else bool(o), [int(i) for i in idx]]
            for n, o, idx in self.history
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneReport:
        """The report :meth:`to_dict` wrote (as saved in checkpoints)."""
        return cls(
            d["family"],
            d["threshold"],
            [LayerReport(**layer) for layer in d["layers"]],
            d["history"],
            d["max_rel_error"],
            bool(d.get("uniform", False)),  # (not recorded before 2026-12-06)
        )
