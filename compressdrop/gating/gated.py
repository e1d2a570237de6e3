"""Attach gates to any model, and take them off again.

Lifecycle: ``attach`` → train (loss = NLL + β·kl(model)/N) → ``compressdrop.prune`` → export.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..gates import Gate, gate_class
from .groups import UnitGroup, find_groups
from .registry import has_role, registered_types, spec_of

__all__ = [
    "Gated",
    "attach",
    "attach_config",
    "detach",
    "example_input_for",
    "example_inputs_of",
    "groups_of",
    "input_shapes_of",
    "input_specs",
    "input_specs_of",
    "is_gated",
    "kl",
    "named_gates",
    "random_inputs",
    "sites",
]

_STATE = "_compressdrop"  # attribute on the root model holding the attach record
KL_COSTS = ("uniform", "params", "flops")


def _no_op(module: nn.Module, args: Any) -> None:
    """The forward pre-hook of every :class:`Gated` (see there)."""


class Gated(nn.Module):
    """Wraps a layer so that its output passes through a gate: ``gate(module(x), dim=unit_dim)``.

    Args:
        module: the wrapped layer; it keeps its parameters and its name under ``.module``.
        gate: the gate; several wrappers share one gate when their units are coupled.
        unit_dim: the dimension of the layer's output that holds the units.
    """

    def __init__(self, module: nn.Module, gate: Gate, unit_dim: int) -> None:
        super().__init__()
        self.module = module
        self.gate = gate
        self.unit_dim = unit_dim
        # a hooked submodule turns fused fast paths off (nn.TransformerEncoderLayer's in eval):
        # they read the wrapped weights directly and would skip the gate
        self.register_forward_pre_hook(_no_op)

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``weight``, ``in_features``, ...), for code that reads
        them through the parent module (``nn.TransformerEncoderLayer`` does)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "module":
                raise
            return getattr(super().__getattr__("module"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped layer's output on ``args``, multiplied unit-wise by the gate."""
        return self.gate(self.module(*args, **kwargs), dim=self.unit_dim)

    def extra_repr(self) -> str:
        return f"unit_dim={self.unit_dim}"


def _clear_gate_samples(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook on the root: shared gates draw a fresh θ once per forward pass."""
    for m in module.modules():
        if isinstance(m, Gate) and m.shared:
            m.clear_sample()


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random input batch for ``model``, of the shape the model declares or implies.

    The shape comes from ``model.arch['input_shape']`` (compressdrop's reference nets), else from
    a ``model.input_shape`` attribute, else from a first layer that is a Linear.

    Args:
        model: the model to feed.
        batch: examples in the batch.

    Returns:
        A standard-normal tensor of shape ``(batch, *input_shape)`` on the model's device.

    Raises:
        InputError: no input shape can be inferred (pass ``example_inputs`` to the caller).
    """
    arch = getattr(model, "arch", None)
    declared = getattr(model, "input_shape", None)
    shape = None
    if isinstance(arch, Mapping) and "input_shape" in arch:
        shape = tuple(arch["input_shape"])
    elif declared is not None:
        shape = tuple(declared)
    else:
        first = next((m for m in model.modules() if not list(m.children())), None)
        if isinstance(first, nn.Linear):
            shape = (first.in_features,)
    if shape is None:
        raise InputError(
            "cannot infer the model's input shape: pass example_inputs=<a batch of inputs> "
            "(or give the model an `arch = {'input_shape': [...]}` attribute)"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    return torch.randn(batch, *shape, device=device)


def attach(
    model: nn.Module,
    gate: str = "lognormal",
    granularity: str = "auto",
    include: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] | None = None,
    *,
    example_inputs: torch.Tensor | tuple | None = None,
    gate_kwargs: Mapping[str, Any] | None = None,
    kl_cost: str = "uniform",
) -> nn.Module:
    """Put gates into ``model`` in place and return it.

    Every coupled group of units (a layer's output channels or neurons, together with whatever must
    be removed with them) gets one gate, placed where removing a unit is exact: after the BatchNorm
    that follows a conv, and on every layer writing into a residual stream. Groups that cannot be
    gated exactly are left alone with a :class:`~compressdrop.gating.groups.GatingWarning`; the
    model's output layer is never gated.

    Args:
        model: any ``nn.Module``; traced once on ``example_inputs``.
        gate: family name: ``"lognormal"``, ``"variational"``, ``"concrete"`` or ``"hardconcrete"``.
        granularity: ``"auto"``, ``"channel"`` (conv layers only) or ``"neuron"`` (linear only).
        include / exclude: module-name globs (``"features.*"``) or module types (``nn.Linear``);
            ``None`` or empty: no restriction.
        example_inputs: an input batch; inferred for compressdrop's reference nets and MLPs.
        gate_kwargs: extra arguments for the gate class (e.g. ``{"init_log_sigma": -4}``).
        kl_cost: ``"uniform"`` (each unit's KL weighs 1), ``"params"`` or ``"flops"``: weigh each
            unit's KL by the parameters or multiply-adds it controls, normalized to mean 1 over the
            model (a cost-aware prior).

    Returns:
        ``model``, with its gated layers wrapped in :class:`Gated`.

    Example:
        >>> net = compressdrop.models.build_model("lenet300", input_shape=(1, 8, 8))
        >>> compressdrop.attach(net, gate="lognormal")  # doctest: +SKIP
        >>> loss = F.cross_entropy(net(x), y) + compressdrop.kl(net) / n_train  # doctest: +SKIP
    """
    if is_gated(model):
        raise InputError("model already has gates attached; detach() it first")
    if kl_cost not in KL_COSTS:
        raise InputError(f"kl_cost must be one of {KL_COSTS}, got {kl_cost!r}")
    cls = gate_class(gate)
    if example_inputs is None:
        example_inputs = example_input_for(model)
    groups = find_groups(model, example_inputs, granularity, include or None, exclude or None)
    if not groups:
        raise InputError(_nothing_to_gate(model))
    param = next(model.parameters())
    costs = _normalized_costs(groups, kl_cost)
    for grp, cost in zip(groups, costs):
        g = cls(grp.num_units, **dict(gate_kwargs or {})).to(device=param.device, dtype=param.dtype)
        g.unit_cost.copy_(cost)
        g.shared = len(grp.sites) > 1
        g.unit_blocks = grp.blocks  # type: ignore[assignment]  # grouped convs: aligned.py
        for site in grp.sites:
            layer = model.get_submodule(site.name)
            spec = spec_of(layer)
            wrapper = spec.wrapper if spec is not None and spec.wrapper is not None else Gated
            # the new modules take the layer's train/eval mode (a gate in training mode samples)
            _set_submodule(model, site.name, wrapper(layer, g, site.unit_dim).train(layer.training))
    handle = model.register_forward_pre_hook(_clear_gate_samples)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    setattr(
        model,
        _STATE,
        {
            "gate": gate,
            "granularity": granularity,
            "groups": groups,
            "hook": handle.id,
            "input_shape": [tuple(t.shape[1:]) for t in inputs],
            "inputs": input_specs(inputs),
            "kl_cost": kl_cost,
            "gate_kwargs": dict(gate_kwargs or {}),
            "include": _pattern_names(include),
            "exclude": _pattern_names(exclude),
        },
    )
    return model


def _nothing_to_gate(model: nn.Module) -> str:
    """Why attach found no group, in words that hold whether or not warnings were shown."""
    producers = [type(m).__name__ for m in model.modules() if has_role(m, "producer")]
    if not producers:
        known = ", ".join(t.__name__ for t in registered_types("producer"))
        return (
            f"no gateable layer found: the model has no layer of a type compressdrop gates "
            f"({known}; register_layer() adds one)"
        )
    return (
        f"no gateable layer found among its {len(producers)} layers "
        f"({', '.join(sorted(set(producers)))}): the units of each reach the model's output "
        "(the output layer is never gated) or pass through an operation that keeps removal from "
        "being exact (any GatingWarning above names it)"
    )


def _pattern_names(patterns: Sequence[str | type] | None) -> list[str]:
    return [p if isinstance(p, str) else p.__name__ for p in (patterns or ())]


def attach_config(model: nn.Module) -> dict[str, Any]:
    """The arguments :func:`attach` was called with, as plain data.

    ``attach(fresh_model, **attach_config(model))`` puts the same gates on a fresh copy of the
    model (a checkpoint re-attaches this way).

    Returns:
        ``gate``, ``granularity``, ``include``, ``exclude`` (names, types by their class name),
        ``gate_kwargs`` and ``kl_cost``.

    Raises:
        InputError: ``model`` has no attach record.
    """
    state = getattr(model, _STATE, None)
    if state is None:
        raise InputError("model has no attach record (was it gated with compressdrop.attach?)")
    keys = ("gate", "granularity", "include", "exclude", "gate_kwargs", "kl_cost")
    return {k: state[k] for k in keys}


def _normalized_costs(groups: list[UnitGroup], kl_cost: str) -> list[torch.Tensor]:
    if kl_cost == "uniform":
        return [torch.ones(g.num_units) for g in groups]
    raw = [g.params_per_unit if kl_cost == "params" else g.macs_per_unit for g in groups]
    mean = torch.cat(raw).mean().clamp(min=1e-12)
    return [r / mean for r in raw]


def is_gated(model: nn.Module) -> bool:
    """Whether ``model`` has gates attached (by :func:`attach`, or loaded into a gated skeleton)."""
    return any(isinstance(m, Gated) for m in model.modules())


def detach(model: nn.Module) -> nn.Module:
    """Remove every gate: each wrapped layer goes back in its place, the model is as before attach.

    The gates' learned state is dropped; call :func:`compressdrop.prune` first to keep its effect.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, Gated):
            _set_submodule(model, name, m.module)
    hooks = model._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if fn is _clear_gate_samples]:
        del hooks[key]
    if hasattr(model, _STATE):
        delattr(model, _STATE)
    return model


def named_gates(model: nn.Module) -> Iterator[tuple[str, Gate]]:
    """Yield ``(name, gate)`` once per gate, a shared gate included.

    The name is that of the gate's first gated layer, in ``named_modules`` order.
    """
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, Gated) and id(m.gate) not in seen:
            seen.add(id(m.gate))
            yield name, m.gate


def sites(model: nn.Module) -> Iterator[tuple[str, Gated]]:
    """Yield ``(name, wrapper)`` for every gated layer; a shared gate appears once per site."""
    for name, m in model.named_modules():
        if isinstance(m, Gated):
            yield name, m


def groups_of(model: nn.Module) -> list[UnitGroup]:
    """The unit groups recorded at attach time (empty for a model rebuilt from a checkpoint)."""
    return list(getattr(model, _STATE, {}).get("groups", []))


def input_shapes_of(model: nn.Module) -> list[tuple[int, ...]]:
    """The per-example shapes of the inputs :func:`attach` traced ``model`` with.

    Args:
        model: a model gated by :func:`attach`.

    Returns:
        One shape per positional input, without the batch dimension (``[(1, 28, 28)]`` for an
        MNIST net); empty for a model with no attach record (as :func:`groups_of`).
    """
    return list(getattr(model, _STATE, {}).get("input_shape", []))


def input_specs(inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """What random inputs like ``inputs`` must be, as plain data: per positional input its shape
    without the batch dimension, its dtype and, for integer inputs (token ids), the bound
    ``high`` that ids stay below (the largest seen plus one)."""
    specs = []
    for t in inputs:
        integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        high = int(t.max()) + 1 if integer and t.numel() else None
        specs.append(
            {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch."), "high": high}
        )
    return specs


def random_inputs(
    specs: Sequence[Mapping[str, Any]], batch: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, ...]:
    """Random inputs that fit :func:`input_specs`: standard normal floats, integers (token ids)
    uniform below their ``high``.

    Raises:
        InputError: a spec names an unknown dtype.
    """
    out = []
    for spec in specs:
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown input dtype {spec.get('dtype')!r}")
        shape = (batch, *spec["shape"])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, dtype=dtype, device=device))
        elif dtype == torch.bool:
            out.append(torch.rand(shape, device=device) < 0.5)
        else:
            out.append(
                torch.randint(
                    0, max(1, int(spec.get("high") or 2)), shape, dtype=dtype, device=device
                )
            )
    return tuple(out)


def input_specs_of(model: nn.Module) -> list[dict[str, Any]]:
    """The :func:`input_specs` of the inputs :func:`attach` traced ``model`` with (empty for a
    model with no attach record)."""
    state = getattr(model, _STATE, {})
    return list(state.get("inputs") or [{"shape": list(s)} for s in state.get("input_shape", [])])


def example_inputs_of(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...] | None:
    """Random inputs like those :func:`attach` traced ``model`` with (token ids stay within the
    ids seen), on the model's device; ``None`` for a model with no attach record."""
    specs = input_specs_of(model)
    if not specs:
        return None
    return random_inputs(specs, batch, next(model.parameters()).device)


def kl(model: nn.Module) -> torch.Tensor:
    """The model's regularizer: Σ over its gates of their cost-weighted KL.

    A shared gate counts once. Divide by the training-set size to add it to a mean NLL.

    Returns:
        A differentiable scalar.

    Raises:
        InputError: ``model`` has no gates.

    Example:
        >>> loss = F.cross_entropy(net(x), y) + compressdrop.kl(net) / n_train  # doctest: +SKIP
    """
    terms = [g.kl() for _, g in named_gates(model)]
    if not terms:
        raise InputError("model has no gates; call compressdrop.attach(model) first")
    return torch.stack(terms).sum()
