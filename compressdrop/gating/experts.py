"""The intermediate neurons of a mixture of experts stored as fused 3-D parameters (Hugging Face
transformers 5: Mixtral, Qwen2-MoE, OLMoE and every experts class decorated with
``use_experts_implementation``): one gate per layer over all its experts' neurons, and the
surgery that removes them.

Layout (``E`` experts, ``I`` neurons each, width ``H``): ``gate_up_proj`` ``(E, 2I, H)`` holds
each expert's gate and up rows (``[gate; up]``, or interleaved ``g0, u0, g1, ...``),
``down_proj`` ``(E, H, I)`` its down projection (both transposed where ``is_transposed``; an
``up_proj`` alone where the experts have no gate). Neuron ``j`` of expert ``e`` is gate/up row
``j`` (and ``I + j``) of expert ``e`` and column ``j`` of its down projection; it reaches the
output only through that column, so a gate that scales the column multiplies the neuron, and a
neuron at zero is removed exactly.

The gate has ``E·I`` units, expert-major, in ``E`` blocks (:attr:`UnitGroup.blocks`): the fused
tensors need one width for all experts of a layer, so pruning keeps in every expert as many
neurons as the expert that keeps most under the threshold, each expert its own highest-SNR ones
(:func:`~compressdrop.gating.aligned.align_keep`; keeping a neuron is always exact), rounded up
to a multiple of :data:`ALIGN`: transformers' default kernel, ``grouped_mm``, needs rows of 16
bytes (4 float32 or 8 bfloat16 neurons) and fails on a width of 23.

The gate multiplies ``down_proj`` itself (``functional_call``), so whatever kernel the library
dispatches to (eager loop, ``batched_mm``, ``grouped_mm``) runs on the gated weights. In
training the gate draws one θ per forward pass (as a gate with ``noise="batch"``): the routed
tokens share the experts' weights, and a θ per example would need a copy of them per example.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InputError
from .units import Site, UnitGroup, _matches

__all__ = [
    "ALIGN",
    "experts_widths",
    "find_experts",
    "is_experts",
    "remove_expert_units",
    "remove_expert_units_",
    "scaled_down",
    "tuple_routers",
]


#: each expert keeps a multiple of this many neurons (or all): 16-byte rows in half precision
ALIGN = 8


def is_experts(m: nn.Module) -> bool:
    """Whether ``m`` holds its experts as fused 3-D parameters with transformers' layout flags
    (``use_experts_implementation`` sets ``is_transposed`` and ``has_gate``)."""
    down = m._parameters.get("down_proj")
    return isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(m, "is_transposed")


def _why_not(m: nn.Module) -> str | None:
    if getattr(m, "_is_expert_parallel", False):
        return "its experts are sharded over devices (expert parallelism)"
    up = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
    if not isinstance(m._parameters.get(up), torch.Tensor):
        return f"it has no {up} parameter"
    return None


def _sizes(m: nn.Module) -> tuple[int, int]:
    """``(E, I)``: experts and neurons per expert (``N`` in the code: ruff reserves ``I``)."""
    down = m.get_parameter("down_proj")
    return int(down.shape[0]), int(down.shape[1] if m.is_transposed else down.shape[2])


def _down_dim(m: nn.Module) -> int:
    """The dimension of ``down_proj`` that holds the neurons."""
    return 1 if m.is_transposed else 2


def scaled_down(m: nn.Module, theta: torch.Tensor) -> torch.Tensor:
    """The experts' ``down_proj`` with neuron ``j`` of expert ``e`` scaled by ``theta[e·I + j]``."""
    down = m.get_parameter("down_proj")
    E, N = _sizes(m)
    shape = (E, N, 1) if m.is_transposed else (E, 1, N)
    return down * theta.to(down.dtype).reshape(shape)


def _rows(m: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Rows of the ``(E, 2I)`` gate/up dimension of the kept neurons ``keep`` ``(E, k)``."""
    N = _sizes(m)[1]
    if not getattr(m, "has_gate", True):
        return keep
    if getattr(m, "is_concatenated", True):  # [gate; up]
        return torch.cat([keep, keep + N], dim=1)
    return torch.stack([2 * keep, 2 * keep + 1], dim=2).flatten(1)  # g0, u0, g1, u1, ...


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> nn.Parameter:
    """``t`` with, for each expert ``e`` (dim 0), entries ``idx[e]`` along ``dim``."""
    view, expand = [1] * t.dim(), list(t.shape)
    view[0], view[dim] = idx.shape[0], idx.shape[1]
    expand[dim] = idx.shape[1]
    out = t.detach().gather(dim, idx.to(t.device).reshape(view).expand(expand)).clone()
    return nn.Parameter(out, requires_grad=t.requires_grad)


@torch.no_grad()
def remove_expert_units(m: nn.Module, pruned: list[int]) -> None:
    """Remove neurons ``pruned`` (flat indices ``e·I + j``) of experts module ``m``, in place;
    every expert must lose as many. Sets its ``intermediate_dim`` (or ``intermediate_size``).

    Raises:
        InputError: the experts would keep different numbers of neurons, or none.
    """
    E, N = _sizes(m)
    keep = torch.ones(E * N, dtype=torch.bool)
    keep[torch.tensor(pruned, dtype=torch.long)] = False
    per = keep.reshape(E, N).sum(dim=1)
    if len(set(per.tolist())) != 1 or int(per[0]) == 0:
        raise InputError(
            f"every expert must keep as many neurons (at least one), got {per.tolist()}"
        )
    idx = keep.reshape(E, N).nonzero()[:, 1].reshape(E, -1)  # (E, k), ascending per expert
    rows = _rows(m, idx)
    up = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
    setattr(m, up, _take(m.get_parameter(up), 2 if m.is_transposed else 1, rows))
    if isinstance(bias := m._parameters.get(f"{up}_bias"), torch.Tensor):
        setattr(m, f"{up}_bias", _take(bias, 1, rows))
    m.down_proj = _take(m.get_parameter("down_proj"), _down_dim(m), idx)
    for attr in ("intermediate_dim", "intermediate_size"):  # its record (GPT-OSS: the second)
        if isinstance(vars(m).get(attr), int):
            vars(m)[attr] = int(idx.shape[1])


def remove_expert_units_(root: nn.Module, name: str, pruned: list[int]) -> None:
    """Remove neurons ``pruned`` of the experts module ``name`` of ``root`` (see
    :func:`remove_expert_units`), in place.

    Raises:
        InputError: ``name`` is not a fused experts module.
    """
    m = root.get_submodule(name)
    if not is_experts(m):
        raise InputError(f"{name!r} ({type(m).__name__}) is not a fused experts module")
    remove_expert_units(m, pruned)


@torch.no_grad()
def _check(m: nn.Module, call: tuple[tuple, dict]) -> str | None:
    """Whether removing neurons 0 … ALIGN − 1 of every expert gives exactly the output of zeroing
    their ``down_proj`` columns, on the recorded ``call``; ``None``: it does."""
    import copy

    E, N = _sizes(m)
    cut = [e * N + j for e in range(E) for j in range(ALIGN)]
    zero = torch.ones(E * N)
    zero[cut] = 0
    args, kwargs = call
    removed = copy.copy(m)  # a shallow copy: its own parameter dict, the same tensors
    removed._parameters = dict(m._parameters)
    try:
        want = functional_call(m, {"down_proj": scaled_down(m, zero)}, args, kwargs)
        remove_expert_units(removed, cut)
        got = removed(*args, **kwargs)
    except Exception as e:
        return f"removing a neuron breaks its forward ({type(e).__name__}: {e})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "removing a neuron changes the shape of its output"
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    if not err <= 1e-5:
        return f"removing a neuron is not the same as zeroing it (relative error {err:.2g})"
    return None


def _positions(call: tuple[tuple, dict], batch: int) -> float:
    """Expert evaluations per example: routed (token, expert) pairs over the batch."""
    args, kwargs = call
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    if not isinstance(index, torch.Tensor):
        return 1.0
    return float(index.numel()) / max(batch, 1)


def find_experts(
    model: nn.Module,
    calls: dict[str, tuple[tuple, dict]],
    include: Any,
    exclude: Any,
    batch: int,
) -> tuple[list[UnitGroup], list[str]]:
    """The neuron groups of ``model``'s fused experts modules called while tracing (``calls``).

    Returns:
        One group per experts module (``E·I`` units in ``E`` blocks), and for each module that
        cannot be gated a sentence saying why.
    """
    groups, problems = [], []
    for name, m in model.named_modules():
        if not is_experts(m) or name not in calls:
            continue
        if (include and not _matches(name, m, include)) or _matches(name, m, exclude):
            continue
        E, N = _sizes(m)
        few = f"each expert has {N} neurons, and keeps a multiple of {ALIGN}"
        why = _why_not(m) or (few if N <= ALIGN else None)
        why = why or _check(m, calls[name])
        if why is not None:
            problems.append(f"experts {name!r} left ungated: {why}")
            continue
        H = int(m.get_parameter("down_proj").shape[2 if m.is_transposed else 1])
        rows = 2 if getattr(m, "has_gate", True) else 1  # gate and up, or up alone
        params = (rows + 1.0) * H + (rows if getattr(m, "has_bias", False) else 0)
        macs = params * _positions(calls[name], batch) / E  # a neuron runs for its expert's share
        site = Site(name, -1)
        costs = torch.full((E * N,), params), torch.full((E * N,), macs)
        groups.append(UnitGroup(name, E * N, "neuron", [name], [site], *costs, E, ALIGN))
    return groups, problems


def experts_widths(model: nn.Module) -> dict[str, list[int]]:
    """The neurons per expert of each fused experts module, by the config field that describes
    them (``moe_intermediate_size`` where the config has one, else ``intermediate_size``);
    empty: none."""
    widths = [_sizes(m)[1] for m in model.modules() if is_experts(m)]
    if not widths:
        return {}
    config = getattr(model, "config", None)
    moe = hasattr(config, "moe_intermediate_size")
    return {"moe_intermediate_size" if moe else "intermediate_size": widths}


def tuple_routers(model: nn.Module, inputs: tuple) -> list[nn.Module]:
    """The Linear subclasses of ``model`` whose own forward returns no tensor: a router that
    answers ``(scores, experts)`` (Llama-4's ``Llama4Router``, PhiMoE's ``PhimoeTopKRouter``).
    Torch-Pruning's trace reads a Linear's output as a tensor and failed on them; left out of
    its graph, their outputs are routing decisions, not units to gate. Found by one forward pass
    on ``inputs``, run only where such a subclass (other than compressdrop's own) exists."""
    subclasses = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and type(m).forward is not nn.Linear.forward
        and not type(m).__module__.startswith("compressdrop.")
    ]
    if not subclasses:
        return []
    found: list[nn.Module] = []

    def record(m: nn.Module, _args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor) and m not in found:
            found.append(m)

    hooks = [m.register_forward_hook(record) for m in subclasses]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found
