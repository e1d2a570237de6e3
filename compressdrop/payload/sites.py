"""A gated file's ``sites`` record (where its gates sit), checked before the gates are attached
again: :func:`check_sites`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..gating.costs import UNIT_KINDS
from ._common import _among, _name, _what

__all__ = ["check_sites"]

_GATE_KEYS = ("layers", "kind", "units")


def check_sites(record: Any, state: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A gated file's sites record (:func:`~compressdrop.gating.record.gate_sites`), checked:
    ``None`` (a file written before compressdrop recorded its sites: the gates are planned from
    the attach record alone), or a list of one mapping per gate, each with exactly ``layers`` (a
    list of the dotted names of the layers it multiplies, each in no other gate and with its gate's
    tensors in the file's ``state``: ``LAYER.gate.*``), ``kind`` (one of ``channel``, ``neuron``,
    ``head``) and ``units`` (an integer ≥ 1).

    Returns:
        The record, its entries as plain dicts, or ``None``.

    Raises:
        CheckpointError: anything else, in one line naming the gate and the field.
    """
    if record is None:
        return None
    if not isinstance(record, list | tuple) or not record or len(record) > len(state):
        raise CheckpointError(
            f"sites record: expected a list of 1 to {len(state):,} gates (no more than the "
            f"state_dict's tensors), got {_what(record)}"
        )
    gated = {p for k in state for p in _gated_prefixes(k)}
    seen: set[str] = set()
    out = []
    for i, gate in enumerate(record):
        where = f"sites record, gate {i}"
        if not isinstance(gate, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {_what(gate)}")
        unknown = sorted(str(k) for k in gate if k not in _GATE_KEYS)
        missing = [k for k in _GATE_KEYS if k not in gate]
        if unknown or missing:
            raise CheckpointError(
                f"{where}: expected the keys {list(_GATE_KEYS)}, "
                + (f"unknown: {unknown}" if unknown else f"missing: {missing}")
            )
        layers, kind, units = gate["layers"], gate["kind"], gate["units"]
        if not (isinstance(layers, list | tuple) and layers and all(map(_name, layers))):
            raise CheckpointError(
                f"{where}: layers must be a list of layer names, got {_what(layers)}"
            )
        for name in layers:
            if name in seen:
                raise CheckpointError(f"{where}: layer {name!r} is in an earlier gate too")
            if name not in gated:
                raise CheckpointError(
                    f"{where}: layer {name!r} has no gate in the state_dict ({name}.gate.*)"
                )
            seen.add(name)
        if not _among(kind, UNIT_KINDS):
            raise CheckpointError(f"{where}: kind must be one of {UNIT_KINDS}, got {_what(kind)}")
        if not (type(units) is int and units >= 1):
            raise CheckpointError(f"{where}: units must be an integer ≥ 1, got {_what(units)}")
        out.append({"layers": list(layers), "kind": kind, "units": units})
    return out


def _gated_prefixes(key: str) -> list[str]:
    """Each ``LAYER`` of a state_dict key ``LAYER.gate.REST`` (a router named ``gate`` may make
    one key several)."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) - 1) if parts[i] == "gate"]
