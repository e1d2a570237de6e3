"""A gated MLP whose gate and up projections are packed in one Linear (Phi-3's ``Phi3MLP``):
one gate per neuron, and the surgery that removes a neuron's two rows and its column together.

Layout (``I`` neurons, width ``H``): ``gate_up_proj`` is a Linear ``H → 2I`` whose rows are
``[gate; up]``, its output split by ``chunk(2, -1)``, and ``down_proj`` a Linear ``I → H`` that
reads ``up · act(gate)``. Neuron ``j`` is rows ``j`` and ``I + j`` of ``gate_up_proj`` and column
``j`` of ``down_proj``; it reaches the output only through that column, so a gate on
``down_proj``'s input multiplies the neuron once, and a neuron at zero is removed exactly.

Torch-Pruning sees ``gate_up_proj``'s ``2I`` rows as the units: a gate per row gave each neuron
two gates, and cut a neuron when either of its rows went, so a prune removed more neurons than
the gates chose and a uniform prune kept different widths. A module is taken for this layout only
if it has the two Linears of matching widths and removing neurons is, on the call recorded while
tracing, the same as zeroing their ``down_proj`` columns. One that has the two Linears but fails
that check (its rows interleaved, ``gate, up = h[..., 0::2], h[..., 1::2]``, not ``[gate; up]``
halves) is left ungated with a :class:`~compressdrop.gating.units.GatingWarning` that says why: a
gate per row would give each neuron two gates again.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .heads import cut_features
from .inputs import in_float32
from .units import Site, UnitGroup, _matches

__all__ = [
    "PACKED_NAMES",
    "find_packed_mlps",
    "is_packed_mlp",
    "packed_names",
    "remove_packed_units",
    "remove_packed_units_",
]

#: the names of a packed MLP's two Linears, ``gate_up_proj`` and ``down_proj`` in the module
#: docstring: Phi-3's and GLM's, and GraniteMoE-Hybrid's shared MLP's (``input_linear``)
PACKED_NAMES = (("gate_up_proj", "down_proj"), ("input_linear", "output_linear"))


def packed_names(m: nn.Module) -> tuple[str, str] | None:
    """The names of ``m``'s packed Linear of ``2I`` outputs and its down Linear of ``I``
    inputs (the layout of the module docstring, before it is checked); ``None``: it has none."""
    for up_name, down_name in PACKED_NAMES:
        up, down = m._modules.get(up_name), m._modules.get(down_name)
        if (
            isinstance(up, nn.Linear)
            and isinstance(down, nn.Linear)
            and up.out_features == 2 * down.in_features
        ):
            return up_name, down_name
    return None


def is_packed_mlp(m: nn.Module) -> bool:
    """Whether ``m`` has a packed Linear and its down Linear (:func:`packed_names`)."""
    return packed_names(m) is not None


@torch.no_grad()
def remove_packed_units(m: nn.Module, pruned: list[int]) -> None:
    """Remove neurons ``pruned`` of packed MLP ``m``, in place: rows ``j`` and ``I + j`` of its
    ``gate_up_proj``, column ``j`` of its ``down_proj``.

    Raises:
        InputError: every neuron would go.
    """
    names = packed_names(m)
    assert names is not None  # is_packed_mlp
    up, down = m.get_submodule(names[0]), m.get_submodule(names[1])
    assert isinstance(up, nn.Linear) and isinstance(down, nn.Linear)
    n = down.in_features
    gone = sorted({int(j) for j in pruned if 0 <= int(j) < n})
    if len(gone) >= n:
        raise InputError(f"a packed MLP must keep at least one of its {n} neurons")
    if not gone:
        return
    cut_features(up, gone + [n + j for j in gone], out=True)  # [gate; up]: both halves
    cut_features(down, gone, out=False)


def remove_packed_units_(root: nn.Module, name: str, pruned: list[int]) -> None:
    """Remove neurons ``pruned`` of the packed MLP ``name`` of ``root`` (see
    :func:`remove_packed_units`), in place.

    Raises:
        InputError: ``name`` is not a packed MLP.
    """
    m = root.get_submodule(name)
    if not is_packed_mlp(m):
        raise InputError(f"{name!r} ({type(m).__name__}) is not a packed gate/up MLP")
    remove_packed_units(m, pruned)


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of ``m`` whose two Linears can be cut without touching ``m`` (the same tensors)."""
    out = copy.copy(m)
    out._modules = dict(m._modules)
    for key in packed_names(m) or ():
        layer = copy.copy(m._modules[key])
        assert layer is not None  # is_packed_mlp
        layer._parameters = dict(layer._parameters)
        out._modules[key] = layer
    return out


@torch.no_grad()
def _check(m: nn.Module, call: tuple[tuple, dict]) -> str | None:
    """Why removing the first and last neurons does not give exactly the output of zeroing
    their ``down_proj`` columns, on the recorded ``call`` (in float32 for a bfloat16 or float16
    MLP: :func:`~compressdrop.gating.inputs.in_float32`); ``None`` where it does."""
    m, call = in_float32(m, call)
    names = packed_names(m)
    assert names is not None  # is_packed_mlp
    down = m.get_submodule(names[1])
    assert isinstance(down, nn.Linear)
    n = down.in_features
    if n < 2:
        return f"it has {n} neuron, which must stay"
    cut = [0, n - 1]
    args, kwargs = call

    def zero(_mod: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0].clone()
        x[..., cut] = 0
        return (x, *inputs[1:])

    handle = down.register_forward_pre_hook(zero)
    try:
        want = m(*args, **kwargs)
    except Exception as e:
        return f"it could not be run again on its recorded call ({type(e).__name__}: {e})"
    finally:
        handle.remove()
    removed = _shallow(m)
    layout = f"its {names[0]} rows are not [gate; up] halves (rows j and {n} + j per neuron)"
    try:
        remove_packed_units(removed, cut)
        got = removed(*args, **kwargs)
    except Exception as e:
        return f"{layout}: without two neurons' rows its forward failed ({type(e).__name__})"
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        return f"its output is a {type(want).__name__}, not a tensor"
    if got.shape != want.shape:
        return f"{layout}: without two neurons' rows its output is {tuple(got.shape)}"
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    if not err <= 1e-5:
        return (
            f"{layout}: removing a neuron's two rows is not the same as zeroing it (relative "
            f"error {err:.2g}), and a gate per row would give each neuron two gates"
        )
    return None


def find_packed_mlps(
    model: nn.Module, calls: dict[str, tuple[tuple, dict]], include: Any, exclude: Any, batch: int
) -> tuple[list[UnitGroup], dict[str, str]]:
    """The neuron groups of ``model``'s packed MLPs called while tracing (``calls``) whose
    removal checks out: one group of ``I`` units per MLP, its site the MLP itself (its wrapper,
    :class:`~compressdrop.gating.packed_mlp_gated.PackedMLPGated`, gates ``down_proj``'s input).

    Returns:
        The groups, and the packed MLPs whose removal does not check out, left ungated: their
        ``gate_up_proj``'s name → a sentence saying why (no other group may gate its rows).
    """
    groups, left = [], {}
    for name, m in model.named_modules():
        names = packed_names(m)
        if names is None or name not in calls:
            continue
        up = f"{name}.{names[0]}" if name else names[0]
        gate_up, down = m.get_submodule(names[0]), m.get_submodule(names[1])
        if include and not (_matches(name, m, include) or _matches(up, gate_up, include)):
            continue
        if _matches(name, m, exclude) or _matches(up, gate_up, exclude):
            continue
        why = _check(m, calls[name])
        if why is not None:
            left[up] = f"MLP {name!r} left ungated: {why}"
            continue
        assert isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear)
        n, h_in, h_out = down.in_features, gate_up.in_features, down.out_features
        macs = 2.0 * h_in + h_out  # a gate row, an up row, a down column
        params = macs + (2.0 if gate_up.bias is not None else 0.0)
        x = calls[name][0][0] if calls[name][0] else None
        tokens = x.numel() / (h_in * max(batch, 1)) if isinstance(x, torch.Tensor) else 1.0
        costs = torch.full((n,), params), torch.full((n,), macs * tokens)
        groups.append(UnitGroup(name, n, "neuron", [up], [Site(name, -1)], *costs))
    return groups, left
