"""What a gated model records of how it was gated, as plain data: the arguments :func:`attach`
was called with and the sites of the gates it planned.

A checkpoint re-attaches its gates with both: ``attach(fresh, **attach_config(model),
only_sites=...)`` with the layers of :func:`gate_sites`. The plan is made again on the fresh model,
so a later compressdrop that gates one more layer type would plan gates the file's weights do not
hold; restricted to the recorded layers, it puts back the file's gates, and
:func:`sites_differ` names the layers where it cannot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import InputError
from .inputs import _STATE
from .selection import SHOWN, shown_names

__all__ = ["attach_config", "gate_sites", "sites_differ"]


def _state(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, _STATE, None)
    if state is None:
        raise InputError("model has no attach record (was it gated with compressdrop.attach?)")
    return state


def attach_config(model: nn.Module) -> dict[str, Any]:
    """The arguments :func:`attach` was called with, as plain data.

    ``attach(fresh_model, **attach_config(model))`` puts the same gates on a fresh copy of the
    model, with the same compressdrop (a checkpoint also restricts them to :func:`gate_sites`).

    Returns:
        ``gate``, ``granularity``, ``include``, ``exclude`` (names, types by their class name),
        ``gate_kwargs``, ``kl_cost`` and ``kl_scale``.

    Raises:
        InputError: ``model`` has no attach record.
    """
    state = _state(model)
    keys = ("gate", "granularity", "include", "exclude", "gate_kwargs", "kl_cost")
    return {**{k: state[k] for k in keys}, "kl_scale": dict(state.get("kl_scale", {}))}


def gate_sites(model: nn.Module) -> list[dict[str, Any]]:
    """The gates :func:`attach` put on ``model``, one record per gate: ``layers``, the names of
    the layers it multiplies (as :func:`sites` yields them; several for a shared gate), ``kind``
    (``"channel"``, ``"neuron"`` or ``"head"``) and ``units``, its number of units; none for
    a model that :func:`attach` did not gate.
    """
    return [
        {"layers": [s.name for s in g.sites], "kind": g.kind, "units": g.num_units}
        for g in getattr(model, _STATE, {}).get("groups", [])
    ]


def _gate(record: Mapping[str, Any]) -> str:
    return f"{record['units']} {record['kind']} units on {shown_names(record['layers'])}"


def sites_differ(recorded: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> str:
    """Where the gates ``now`` (:func:`gate_sites` of a model just re-attached) differ from the
    ``recorded`` ones, in words that name the layers: those recorded but not gated now, those
    gated now but not recorded, and those whose gate differs (its units or the layers that share
    it); ``""`` where they are the same gates."""
    before = {n: r for r in recorded for n in r["layers"]}
    after = {n: r for r in now for n in r["layers"]}
    same = {n for n in before.keys() & after.keys() if _key(before[n]) == _key(after[n])}
    gone = [n for n in before if n not in after]
    new = [n for n in after if n not in before]
    changed = [n for n in before if n in after and n not in same]
    said = [
        *([f"recorded but not gated now: {shown_names(gone)}"] if gone else []),
        *([f"gated now but not recorded: {shown_names(new)}"] if new else []),
        *(
            f"gated otherwise now: {n!r} (recorded: {_gate(before[n])}; now: {_gate(after[n])})"
            for n in changed[:SHOWN]
        ),
    ]
    return "; ".join(said)


def _key(record: Mapping[str, Any]) -> tuple[str, int, frozenset[str]]:
    return str(record["kind"]), int(record["units"]), frozenset(record["layers"])
