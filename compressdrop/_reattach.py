"""A gated file's gates, put back on its freshly built model as they were when it was written.

The gates are planned again on the fresh model, with the arguments of ``attach`` the file
records. Where the file also records its gates' sites (its ``sites`` record), the plan is
restricted to those layers, so that a later compressdrop whose plan gates more (a layer type
registered since, an attention that became prunable) still puts back the file's gates, and the
gates put back are checked against the record: a layer that cannot be gated any more is an
error that names it, not a state_dict that does not fit. A file without the record (written
before compressdrop kept it) is planned from its attach record alone, as it always was.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._version import __version__
from ._warn import recorded
from .errors import CheckpointError, InputError
from .gating import GatingWarning, attach
from .gating.gated import random_inputs
from .gating.record import gate_sites, sites_differ
from .programs._measure import check_run_bound

__all__: list[str] = []  # internal to compressdrop.checkpoint and the training run


def recorded_layers(sites: Sequence[Mapping[str, Any]] | None) -> list[str] | None:
    """The layers a sites record names (attach's ``only_sites``), or ``None`` for no record."""
    return None if sites is None else [n for gate in sites for n in gate["layers"]]


def moved_gates(
    where: str, differ: str, plan: Sequence[str] = (), written_by: Any = None
) -> CheckpointError:
    """The error for gates that cannot be put back as a file records them: ``differ`` names the
    layers (:func:`~compressdrop.gating.record.sites_differ`), ``plan`` the plan's own words,
    ``written_by`` the compressdrop version that wrote the file, if it says."""
    if isinstance(written_by, str) and written_by != __version__:
        cause = (
            f"the file was written by compressdrop {written_by}, whose plan of the gates differs "
            f"from this version's ({__version__})"
        )
    else:
        cause = (
            "the plan of the gates changed since the file was written (a layer type registered "
            "or not, the model's code, a library's version)"
        )
    said = f" (the gates' plan said: {'; '.join(plan)})" if plan else ""
    return CheckpointError(
        f"{where}: the file's gates cannot be put back as they were: {differ}; {cause}{said}"
    )


def reattach(
    model: nn.Module,
    args: Mapping[str, Any],
    inputs: list[dict[str, Any]],
    sites: list[dict[str, Any]] | None,
    where: str,
    written_by: Any = None,
) -> str:
    """Attach a gated file's gates to ``model``, built from its arch record: with attach's
    ``args`` (its attach record), traced on inputs drawn from its ``inputs`` record, restricted
    to the layers of its ``sites`` record and checked against it (``None``: the plan unchecked).

    Returns:
        What to add to the error of weights that do not fit: the plan's warnings, kept back
        here (they were given when the gates were first attached).

    Raises:
        CheckpointError: a recorded gate that cannot be put back, naming its layers.
    """
    example = random_inputs(inputs, 2)
    if isinstance(model, torch.fx.GraphModule):  # the file's program: measured before it runs
        check_run_bound(model, example, where)
    only = recorded_layers(sites)
    _, failed, said = recorded(
        lambda: attach(model, **args, example_inputs=example, only_sites=only)
    )
    plan = [str(w.message) for w in said if issubclass(w.category, GatingWarning)]
    differ = ""
    if sites is not None and (failed is None or isinstance(failed, InputError)):
        differ = sites_differ(sites, gate_sites(model) if failed is None else [])
        plan += [str(failed)] if failed is not None else []
    for w in said:  # the plan's warnings: in the error below if there is one, else kept back
        if (failed is not None and not differ) or not issubclass(w.category, GatingWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if differ:
        raise moved_gates(where, differ, plan, written_by)
    if failed is not None:
        raise failed
    return f" (the gates' plan said: {'; '.join(plan)})" if plan else ""
