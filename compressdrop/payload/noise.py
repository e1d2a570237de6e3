"""A slim file's ``noise`` record (the learned noise of its kept units), checked before any gate
is built from it: :func:`check_noise`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError, InputError, prefixed
from ..gates import check_gate_kwargs, gate_class
from ._common import _MAX_DIMS, _name, _what

__all__ = ["check_noise"]

_NOISE_KEYS = {"site", "unit_dim", "head_dim", "attention", "shares", "family", "units", "kwargs"}
_GATE_KEYS = {"family", "units", "kwargs"}


#: the most noisy sites a file may hold, and the largest head size
_MAX_SITES, _MAX_SIZE = 100_000, 1 << 20


def check_noise(record: Any, state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A slim file's noise record (:func:`~compressdrop.gating.noisy.noise_record`), checked
    before :func:`~compressdrop.gating.noisy.put_noise` builds its gates: a list of mappings, each
    with its ``site`` (a layer's dotted name, once in the record), ``unit_dim`` (an integer, -16
    to 15), ``head_dim`` (``None`` or an integer from 1 to 2^20) and ``attention`` (``None`` or a
    name), and either the
    earlier site whose gate it ``shares`` or the gate's ``family``, ``units`` and ``kwargs`` (the
    family's arguments, checked as :func:`~compressdrop.attach` checks its ``gate_kwargs``).

    A gate's ``units`` must fit the file's own tensors of that gate (``SITE.gate.mu``, ...): the
    gate is built on the ``meta`` device, which takes no memory, and the shapes of its state
    compared with the file's ``state`` before any gate is built for real (400,000,000 units took
    5 GB).

    At most 100,000 entries (each one wraps its site: a chain of them overflowed the stack).

    Returns:
        The record, its entries as plain dicts.

    Raises:
        CheckpointError: anything else, in one line naming the entry.
    """
    if not isinstance(record, list | tuple):
        raise CheckpointError(f"noise record: expected a list of noisy sites, got {_what(record)}")
    if len(record) > _MAX_SITES:
        raise CheckpointError(f"noise record: {len(record):,} sites, more than {_MAX_SITES:,}")
    owners: set[str] = set()
    sites: set[str] = set()
    out = []
    for i, entry in enumerate(record):
        where = f"noise record, entry {i}"
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{where}: expected a mapping, got {_what(entry)}")
        unknown = sorted(str(k) for k in entry if k not in _NOISE_KEYS)
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {unknown}")
        site, unit_dim = entry.get("site"), entry.get("unit_dim")
        head_dim, attention = entry.get("head_dim"), entry.get("attention")
        if not _name(site):
            raise CheckpointError(f"{where}: site must be a layer's name, got {_what(site)}")
        if not (type(unit_dim) is int and -_MAX_DIMS <= unit_dim < _MAX_DIMS):
            raise CheckpointError(
                f"{where}: unit_dim must be an integer from {-_MAX_DIMS} to {_MAX_DIMS - 1}, "
                f"got {_what(unit_dim)}"
            )
        if head_dim is not None and not (type(head_dim) is int and 0 < head_dim <= _MAX_SIZE):
            raise CheckpointError(
                f"{where}: head_dim must be an integer from 1 to {_MAX_SIZE:,} or None"
            )
        if site in sites:  # each entry wraps its site again: a chain of them overflowed the stack
            raise CheckpointError(f"{where}: site {site!r} is noisy twice")
        sites.add(site)
        if attention is not None and not _name(attention):
            raise CheckpointError(f"{where}: attention must be a layer's name or None")
        if "shares" in entry:
            shares = entry["shares"]
            if not (type(shares) is str and shares in owners) or _GATE_KEYS & set(entry):
                raise CheckpointError(
                    f"{where}: shares must name an earlier site that holds a gate, with no "
                    f"family, units or kwargs of its own, got shares={_what(entry['shares'])}"
                )
        else:
            _check_gate(entry, state, where)
            owners.add(str(site))
        out.append(dict(entry))
    return out


def _check_gate(entry: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    """The gate of a noise record's entry: a known family, its arguments, and units that fit the
    file's tensors of that gate."""
    family, units, kwargs = entry.get("family"), entry.get("units"), entry.get("kwargs") or {}
    if not isinstance(family, str):
        raise CheckpointError(f"{where}: family must be a gate family's name, got {_what(family)}")
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{where}: kwargs must be a mapping, got {_what(kwargs)}")
    with prefixed(where, catch=InputError):
        cls = gate_class(family)
        kwargs = check_gate_kwargs(cls, kwargs)  # as attach checks them
    if not (type(units) is int and units > 0):
        raise CheckpointError(f"{where}: units must be a positive integer, got {_what(units)}")
    with torch.device("meta"):  # shapes only: no memory taken, whatever the units
        want = {k: tuple(v.shape) for k, v in cls(units, **kwargs).state_dict().items()}
    for key, shape in want.items():
        got = state.get(f"{entry['site']}.gate.{key}")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
            held = f"is {list(got.shape)}" if isinstance(got, torch.Tensor) else "is missing"
            raise CheckpointError(
                f"{where}: {units:,} units do not fit the file's weights ({entry['site']}.gate."
                f"{key} {held}, {list(shape)} for {units:,} units)"
            )
