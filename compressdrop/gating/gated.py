"""Attach gates to any model, and take them off again.

Lifecycle: ``attach`` → train (loss = NLL + β·kl(model)/N) → ``compressdrop.prune`` → export.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..gates import Gate, _mul, bank, check_gate_kwargs, gate_class
from ..gates._bn import fused_batchnorm
from ..gates._compiled import expect_relu
from ..gates._defer import defer, hand_over, remove_hand_overs
from ..gates._mul import wrapper_pre_hook
from ..gates._proj import fused_projection
from .attention import MultiheadAttention, nested_off, to_stock
from .costs import KL_COSTS, check_kl_scale, group_factors, normalized_costs
from .groups import GatingWarning, UnitGroup, find_groups
from .heads import head_spec_of
from .inputs import (
    _STATE,
    checked_example,
    example_input_for,
    example_inputs_of,
    input_shapes_of,
    input_specs,
    input_specs_of,
    random_inputs,
    uncompiled,
)
from .record import attach_config
from .registry import spec_of, wrapper_of
from .selection import (
    nothing_to_gate,
    only_sites_of,
    pattern_names,
    unmatched_include,
    unused_kl_scale,
)
from .shuffle import prepare_shufflenets

__all__ = [
    "Gated",
    "HeadGated",
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


class Wrapper(nn.Module):
    """A module that wraps one layer as ``self.module`` and answers for its attributes."""

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``weight``, ...), for code that reads them through the
        parent (``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` do)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


class Gated(Wrapper):
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
        self.register_forward_pre_hook(wrapper_pre_hook)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped layer's output on ``args``, multiplied unit-wise by the gate."""
        if (fused := fused_batchnorm(self, args, kwargs)) is not None:  # BatchNorm + gate, fused
            return fused
        out = self.module(*args, **kwargs)
        if self.__dict__.get("defer_ok", False) and defer(self, out):
            return out  # the pool after it multiplies (gates/_defer.py)
        after, inplace = _mul.handoff_flags(self)  # what the readers of its output take over
        after = expect_relu(self, after)  # compiled: the ReLU after it, applied by the gate
        return self.gate(out, dim=self.unit_dim, relu_after=after, inplace=inplace)

    @torch.no_grad()
    def fold_(self) -> None:
        """Scale the wrapped layer's output units by E[θ]·keep for good (its spec's ``fold``), so
        that it no longer needs the gate."""
        spec = spec_of(self.module)
        if spec is None:
            raise InputError(f"no layer spec for {type(self.module).__name__}: register_layer() it")
        spec.fold(self.module, self.gate.eval_factor())

    def extra_repr(self) -> str:
        return f"unit_dim={self.unit_dim}"


class HeadGated(Gated):
    """Wraps an attention's output projection so that each head's slice of its input passes
    through the gate: ``module(gate(x split into heads of head_dim features))``.

    Args:
        module: the output projection.
        gate: one unit per head.
        head_dim: features per head.
        attention: the name of the attention module in the model (surgery removes its heads).
    """

    def __init__(self, module: nn.Module, gate: Gate, head_dim: int, attention: str) -> None:
        super().__init__(module, gate, -2)
        self.head_dim = head_dim
        self.attention = attention

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The projection of ``x`` with each head's features multiplied by its gate."""
        if not (args or kwargs) and (fused := fused_projection(self, x)) is not None:
            return fused  # keeps x·θ no more
        heads = self.gate(x.unflatten(-1, (-1, self.head_dim)), dim=-2)
        return self.module(heads.flatten(-2), *args, **kwargs)

    @torch.no_grad()
    def fold_(self) -> None:
        """Scale the projection's input columns of each head by its E[θ]·keep for good."""
        spec = spec_of(self.module)
        if spec is None or spec.fold_in is None:
            raise InputError(f"{type(self.module).__name__} cannot fold a gate on its input")
        spec.fold_in(self.module, self.gate.eval_factor().repeat_interleave(self.head_dim))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, attention={self.attention!r}"


def _clear_gate_samples(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook on the root: each shared gate a fresh θ for this forward pass (its seed,
    taken here, outside any checkpointed segment: gates/_replay.py)."""
    gates = [m for m in module.modules() if isinstance(m, Gate)]
    compiling = torch.compiler.is_compiling()
    for g in gates:
        if not g.shared:
            continue
        if g.training and not compiling:
            g.reseed()
        else:
            g.clear_sample()
    if module.training:  # each family's per-step terms, once for all of its gates
        bank.prime(gates)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def attach(
    model: nn.Module,
    gate: str = "lognormal",
    granularity: str = "auto",
    include: str | type | Sequence[str | type] | None = None,
    exclude: str | type | Sequence[str | type] | None = None,
    *,
    example_inputs: torch.Tensor | tuple | None = None,
    gate_kwargs: Mapping[str, Any] | None = None,
    kl_cost: str = "uniform",
    kl_scale: Mapping[str, float] | None = None,
    only_sites: Collection[str] | None = None,
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
        granularity: ``"auto"``, ``"channel"`` (conv layers only), ``"neuron"`` (linear only)
            or ``"head"`` (attention heads only; ``"auto"`` gates them too).
        include / exclude: module-name globs (``"features.*"``) or module types (``nn.Linear``),
            one or a sequence of them; ``None`` or empty: no restriction. An ``include`` pattern
            that matches no gateable layer is named: in the error when nothing is gated, else in
            a :class:`~compressdrop.gating.groups.GatingWarning`.
        example_inputs: an input batch; inferred for compressdrop's reference nets and MLPs. One
            the model does not run on is an ``InputError`` that names its shapes and dtypes.
        gate_kwargs: extra arguments for the gate class (e.g. ``{"init_log_sigma": -4}``),
            checked before tracing (:func:`compressdrop.gates.check_gate_kwargs`).
        kl_cost: ``"uniform"`` (each unit's KL weighs 1), ``"params"`` or ``"flops"``: weigh each
            unit's KL by the parameters or multiply-adds it controls, normalized to mean 1 over the
            model (a cost-aware prior).
        kl_scale: a further factor on the KL of each kind of unit, ``{"head": 4.0}`` (kinds:
            ``"channel"``, ``"neuron"``, ``"head"``) or of the layers a name glob matches,
            ``{"conv1": 0.5}`` (factors that apply together multiply): more pressure on one
            structure than others (CoFi and Sheared-LLaMA weigh heads and MLP units apart). A
            kind no gated unit has: a ``GatingWarning``; a glob no gated layer matches: an error.
        only_sites: names of layers (as :func:`sites` yields them): of the groups found, only
            those with a gate on one of them are gated (a checkpoint's recorded gates, put back
            as they were where the plan now finds more); none of them: an ``InputError``.

    Returns:
        ``model``, with its gated layers wrapped in :class:`Gated`.

    Example:
        >>> net = compressdrop.models.build_model("lenet300", input_shape=(1, 8, 8))
        >>> compressdrop.attach(net, gate="lognormal")  # doctest: +SKIP
        >>> loss = F.cross_entropy(net(x), y) + compressdrop.kl(net) / n_train  # doctest: +SKIP
    """
    if is_gated(model):
        raise InputError("model already has gates attached; detach() it first")
    if uncompiled(model) is not model:
        raise InputError("attach to the model, then compile it: torch.compile(attach(net, ...))")
    # one pattern alone, not its characters (a string is a sequence too)
    include = [include] if isinstance(include, str | type) else include
    exclude = [exclude] if isinstance(exclude, str | type) else exclude
    if kl_cost not in KL_COSTS:
        raise InputError(f"kl_cost must be one of {KL_COSTS}, got {kl_cost!r}")
    scale = check_kl_scale(kl_scale)
    cls = gate_class(gate)
    gate_kwargs = check_gate_kwargs(cls, gate_kwargs)  # before tracing: a bad name fails fast
    example_inputs = checked_example(model, example_inputs)
    for why in prepare_shufflenets(model):  # their shuffles as index buffers: the same outputs
        warnings.warn(f"compressdrop: {why}", GatingWarning, stacklevel=2)
    groups = find_groups(model, example_inputs, granularity, include or None, exclude or None)
    if not groups:
        raise InputError(nothing_to_gate(model, granularity, include, exclude))
    if only_sites is not None:
        groups = only_sites_of(groups, only_sites)
    unmatched = [unmatched_include(model, include), unmatched_include(model, exclude, "exclude")]
    for why in filter(None, [*unmatched, *unused_kl_scale(groups, scale)]):
        warnings.warn(f"compressdrop: {why}", GatingWarning, stacklevel=2)
    factors = group_factors(groups, scale)  # a glob matching nothing: an error, model untouched
    nested = _prepare_attentions(model, groups)
    param = next(model.parameters())
    costs = [c * f for c, f in zip(normalized_costs(groups, kl_cost), factors)]
    for grp, cost in zip(groups, costs):
        g = cls(grp.num_units, **gate_kwargs).to(device=param.device, dtype=param.dtype)
        g.unit_cost.copy_(cost)
        g.shared = len(grp.sites) > 1
        g.unit_blocks = grp.blocks  # type: ignore[assignment]  # grouped convs: aligned.py
        g.unit_multiple = grp.multiple  # type: ignore[assignment]  # fused experts: experts.py
        for site in grp.sites:
            layer = model.get_submodule(site.name)
            if site.head_dim:
                new: nn.Module = HeadGated(layer, g, site.head_dim, site.attention)
            elif (wrapper := wrapper_of(layer)) is not None:
                new = wrapper(layer, g, site.unit_dim)
            else:
                new = Gated(layer, g, site.unit_dim)
            # the new modules take the layer's train/eval mode (a gate in training mode samples)
            _set_submodule(model, site.name, new.train(layer.training))
    handle = model.register_forward_pre_hook(_clear_gate_samples)
    hand_over(model, Gated)
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
            "kl_scale": scale,
            "gate_kwargs": dict(gate_kwargs),
            "include": pattern_names(include),
            "exclude": pattern_names(exclude),
            "nested": nested,
        },
    )
    return model


def _prepare_attentions(model: nn.Module, groups: list[UnitGroup]) -> list[str]:
    r"""Turn each attention whose heads get gates into what its head spec prepares (a stock
    ``nn.MultiheadAttention`` into compressdrop's subclass); returns the names of the
    ``nn.TransformerEncoder``\ s whose nested-tensor path that turned off."""
    for grp in groups:
        if grp.kind != "head":
            continue
        m = model.get_submodule(grp.name)
        found = head_spec_of(m)
        if found is not None and found[0].prepare is not None:
            _set_submodule(model, grp.name, found[0].prepare(m))
    return nested_off(model)


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
    for name, m in list(model.named_modules()):
        if to_stock(m) is not m:  # an attention that was made prunable and has all its heads
            _set_submodule(model, name, to_stock(m))
    for name in getattr(model, _STATE, {}).get("nested", []):
        encoder = model.get_submodule(name)
        if not any(isinstance(a, MultiheadAttention) for a in encoder.modules()):
            setattr(encoder, "use_nested_tensor", True)  # noqa: B010 (not a tensor: mypy)
    hooks = model._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if fn is _clear_gate_samples]:
        del hooks[key]
    remove_hand_overs(model)
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
    gates = [g for _, g in named_gates(model)]
    if not gates:
        raise InputError("model has no gates; call compressdrop.attach(model) first")
    return bank.kl_sum(gates)  # the gates of one family as one computation
