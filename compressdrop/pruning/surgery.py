"""From trained gates to a genuinely smaller model.

``mask_`` zeroes the units whose SNR is below the threshold (the reference behaviour);
``prune`` returns a plain ``nn.Module`` with those units physically removed and every kept unit's
E[θ] folded into the weights, checked against the masked model before it is returned.

Note: the slim model has new ``Parameter`` objects; an optimizer built on the gated model must be
rebuilt for fine-tuning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import CompressDropError, InputError
from ..gating import (
    HeadGated,
    detach,
    example_input_for,
    example_inputs_of,
    is_gated,
    named_gates,
    sites,
)
from ..gating.aligned import align_keep
from ..gating.heads import remove_heads_
from ..gating.inputs import checked_example, run_example, uncompiled
from ..gating.known import register_for, sync_config
from ..gating.shuffle import prepare_shufflenets, remove_units_, stream_norms
from ..gating.tpgraph import build_graph
from .constants import ConstantInputs, add_biases_
from .copying import model_copy
from .grouped import prune_group
from .own_surgery import MARK_OF, SURGERY
from .report import BIAS, HEADS, MARKS, STREAM, LayerReport, PruneReport, check_history
from .uniform import repeats, uniform_keep

__all__ = [
    "LayerReport",
    "PruneReport",
    "PruningWarning",
    "SurgeryError",
    "check_threshold",
    "mask_",
    "prune",
    "replay",
    "unmask_",
]


class PruningWarning(UserWarning):
    """Pruning did something other than asked (e.g. kept one unit of a layer the threshold emptied)."""


class SurgeryError(CompressDropError, RuntimeError):
    """The slim model does not reproduce the masked model; the input model is left untouched."""


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float if it is an SNR threshold: finite and ≥ 0 (0 keeps every unit).

    Raises:
        InputError: naming the value otherwise (a negative one would keep every unit, NaN or an
            infinite one would cut every layer to its best unit).
    """
    t = float(threshold)
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"an SNR threshold must be a finite number ≥ 0, got {threshold}")
    return t


def _keep_masks(
    model: nn.Module, threshold: float | None, uniform: bool = False
) -> dict[int, tuple[str, torch.Tensor, float]]:
    out = _threshold_masks(model, threshold)
    if uniform:
        gates = list(named_gates(model))
        if not repeats(gates):
            warnings.warn(
                "compressdrop: uniform pruning changes nothing here: no two gated layers are the "
                "same place in repeated blocks (as a transformer's layers are)",
                PruningWarning,
                stacklevel=3,
            )
        kept = uniform_keep(gates, {k: v[1] for k, v in out.items()})
        out = {k: (name, kept[k], thr) for k, (name, _, thr) in out.items()}
    return out


def _threshold_masks(
    model: nn.Module, threshold: float | None
) -> dict[int, tuple[str, torch.Tensor, float]]:
    out = {}
    threshold = None if threshold is None else check_threshold(threshold)
    for name, g in named_gates(model):
        thr = g.default_threshold if threshold is None else threshold
        # units feeding (or made by) a grouped conv: every group keeps as many (gating/aligned.py)
        keep = align_keep(
            g.mask(thr), g.snr(), getattr(g, "unit_blocks", 1), getattr(g, "unit_multiple", 1)
        )
        if not keep.any():
            best = int(torch.argmax(g.snr().detach()))
            keep = torch.zeros_like(keep)
            keep[best] = True
            warnings.warn(
                f"compressdrop: threshold {thr:g} prunes every unit of {name!r}; keeping its "
                f"highest-SNR unit ({best}) so the model stays connected",
                PruningWarning,
                stacklevel=4,  # prune / mask_ → _keep_masks → here: the caller's line
            )
        out[id(g)] = (name, keep, thr)
    return out


def mask_(model: nn.Module, threshold: float | None = None, *, uniform: bool = False) -> nn.Module:
    """Mark the units with SNR below ``threshold`` as pruned, in place.

    The gated model's eval forward then multiplies them by 0: the reference that the slim model of
    :func:`prune` must reproduce. At least one unit per group is kept (with a
    :class:`PruningWarning`). Units that feed or come from a grouped convolution are kept evenly:
    every conv group keeps as many, the units over the threshold topped up by the group's next
    best by SNR (keeping a unit is always exact: it only keeps some units under the threshold).

    Args:
        model: a gated model.
        threshold: SNR threshold; ``None``: each gate family's default.
        uniform: every layer of a stack keeps as many units (:mod:`compressdrop.pruning.uniform`).

    Returns:
        ``model``.

    Raises:
        InputError: ``model`` has no gates.
    """
    if not is_gated(model):
        raise InputError("model has no gates; attach() them and train before pruning")
    masks = _keep_masks(model, threshold, uniform)
    for _, g in named_gates(model):
        g.pruned.copy_(~masks[id(g)][1])
    return model


def unmask_(model: nn.Module) -> nn.Module:
    """Undo :func:`mask_`: every unit of every gate counts as kept again; returns ``model``."""
    for _, g in named_gates(model):
        g.pruned.zero_()
    return model


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Switch TF32 off for cuDNN convolutions and CUDA matmuls, and restore the settings on exit.

    cuDNN's default is on, which gives relative errors near 1e-3 on Ampere and Hopper GPUs; off, a
    parity check measures the surgery, not the arithmetic.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _dependency_graph(model: nn.Module, example: tuple):
    dg, error = build_graph(model, example)
    if dg is None:
        raise SurgeryError(f"Torch-Pruning cannot trace the model: {error}")
    return dg


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _float_leaves(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output: a tensor, or any nesting of tuples, lists
    and dicts (a segmentation model's ``{"out": ...}``, an encoder's ``(hidden, pooled)``)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _compare_outputs(out: Any, reference: Any) -> float:
    """The largest relative error over the outputs' tensors.

    Raises:
        SurgeryError: the outputs differ in structure or shapes.
    """
    got, want = _float_leaves(out), _float_leaves(reference)
    shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in want]
    if shapes[0] != shapes[1] or not want:
        raise SurgeryError(f"slim model output shapes {shapes[0]} != {shapes[1]}")
    return max(_rel_error(a, b) for a, b in zip(got, want))


def prune(
    model: nn.Module,
    threshold: float | None = None,
    *,
    example_inputs: torch.Tensor | tuple | None = None,
    rtol: float = 1e-4,
    uniform: bool = False,
) -> nn.Module:
    """Return a new, smaller, gate-free model; ``model`` itself is left untouched.

    Every unit whose gate SNR is below ``threshold`` (``None``: each family's default) is removed
    with everything coupled to it (Torch-Pruning's dependency graph: residual streams, concats,
    depthwise and grouped convs, flatten into Linear); kept units have E[θ] folded into their
    layer's weights. A grouped conv keeps as many channels in each of its groups (see
    :func:`mask_`).
    The slim model is checked against the masked gated model on random inputs before it is
    returned; a mismatch above ``rtol`` raises :class:`SurgeryError`.

    The returned module carries ``prune_report``: a :class:`PruneReport` with units before and after
    per group and the pruning history that :func:`replay` uses to rebuild the structure.

    Args:
        model: a gated model (see :func:`compressdrop.attach`), or its ``torch.compile`` wrapper.
        threshold: SNR threshold; units with SNR < threshold are removed.
        example_inputs: an input batch for tracing; by default random inputs of the shapes
            ``attach`` recorded, else inferred as in ``attach``.
        rtol: tolerance of the built-in parity check (for a bf16 or fp16 model at least 4× its
            dtype's epsilon, the rounding of one such operation).
        uniform: every layer of a stack keeps as many units, so that a library's config can
            describe the slim model (:mod:`compressdrop.pruning.uniform`); a Hugging Face
            model's config is then updated to the slim shape (``save_pretrained`` writes a
            folder that ``from_pretrained`` loads without compressdrop).

    Returns:
        The slim model, in eval mode, with ``prune_report`` set.

    Raises:
        InputError: ``model`` has no gates, or does not run on ``example_inputs``.
        SurgeryError: Torch-Pruning refused a group, or the slim model does not run or does not
            match the masked model within ``rtol``.

    Example:
        >>> slim = compressdrop.prune(net, threshold=1.0)  # doctest: +SKIP
        >>> slim.prune_report.architecture()  # doctest: +SKIP
        '300-100 → 41-37'
    """
    model = uncompiled(model)  # a torch.compile wrapper: prune the gated model it runs
    if not is_gated(model):
        raise InputError("model has no gates; attach() them and train before pruning")
    for _, g in named_gates(model):
        g.clear_sample()  # a shared gate's θ of the last training forward: not copyable
    work = model_copy(model).eval()
    masks = _keep_masks(work, threshold, uniform)
    for _, g in named_gates(work):
        g.pruned.copy_(~masks[id(g)][1])
    if example_inputs is None:
        example_inputs = example_inputs_of(work, batch=4) or example_input_for(work, batch=4)
    example_inputs = checked_example(work, example_inputs)  # a list as a tuple; else refused
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    family = next(iter(named_gates(work)))[1].family
    with torch.no_grad(), full_fp32(), ConstantInputs(work) as constants:
        reference = run_example(work, example)

    # the first site of each gate is the handle of its group in the dependency graph
    first_site: dict[int, nn.Module] = {}
    heads: dict[str, list[int]] = {}  # attention → its heads to remove
    own: dict[str, tuple[str, list[int]]] = {}  # fused experts, packed MLP → (mark, neurons)
    streams: dict[str, list[int]] = {}  # ShuffleNetV2 branch (its last norm) → channels to remove
    stream_sites = stream_norms(work)
    pruned = {gid: (~masks[gid][1]).nonzero().flatten().tolist() for gid in masks}
    for name, site in sites(work):
        site.fold_()
        if isinstance(site, HeadGated):
            heads[site.attention] = pruned[id(site.gate)]
        elif type(site) in MARK_OF:  # fused experts, packed MLPs: their own surgery
            own[name] = MARK_OF[type(site)], pruned[id(site.gate)]
        elif name in stream_sites:
            streams[name] = pruned[id(site.gate)]
        else:
            first_site.setdefault(id(site.gate), site.module)
    layers = [
        LayerReport(name, int(keep.numel()), int(keep.sum()), thr)
        for name, keep, thr in masks.values()
    ]
    detach(work)
    # Torch-Pruning gives a cut layer new parameters that require grad: keep frozen ones frozen
    frozen = {n for n, p in work.named_parameters() if not p.requires_grad}
    for name, idxs in heads.items():
        if idxs:
            remove_heads_(work, name, idxs)
    for name, idxs in streams.items():
        if idxs:
            remove_units_(work, name, idxs)
    for name, (mark, idxs) in own.items():
        if idxs:
            SURGERY[mark](work, name, idxs)
    head_history: list = [[name, HEADS, idxs] for name, idxs in heads.items() if idxs]
    head_history += [[name, STREAM, idxs] for name, idxs in streams.items() if idxs]
    head_history += [[name, mark, idxs] for name, (mark, idxs) in own.items() if idxs]

    dg = _dependency_graph(work, example)
    for gid, module in first_site.items():  # constants a pruned unit leaves, into biases
        if pruned[gid] and constants.records:
            pruner = dg.get_pruner_of_module(module)
            group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs=pruned[gid])
            problem = constants.fold_(group)
            if problem is not None:
                raise SurgeryError(f"cannot cut the group of {masks[gid][0]!r}: {problem}")
    for gid, module in first_site.items():
        if not pruned[gid]:
            continue
        pruner = dg.get_pruner_of_module(module)
        group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs=pruned[gid])
        if not dg.check_pruning_group(group):
            raise SurgeryError(f"Torch-Pruning refused the group of {masks[gid][0]!r}")
        problem = prune_group(group)
        if problem is not None:
            raise SurgeryError(f"cannot cut the group of {masks[gid][0]!r}: {problem}")
    for n, p in work.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    work.eval()
    try:
        with torch.no_grad(), full_fp32():
            out = work(*example)
    except RuntimeError as e:
        raise SurgeryError(
            f"the slim model does not run ({e}); please report this model structure"
        ) from e
    err = _compare_outputs(out, reference)
    # a half-precision model rounds far above rtol: its coarsest dtype's epsilon sets the bound
    eps = [torch.finfo(p.dtype).eps for p in work.parameters() if p.is_floating_point()]
    tol = max(rtol, 4 * max(eps, default=0.0))
    if not err <= tol:
        raise SurgeryError(
            f"slim model differs from the masked model by relative error {err:.3g} > {tol:g}; "
            "please report this model structure"
        )
    why = sync_config(work)
    if why is not None:
        warnings.warn(f"compressdrop: {why}", PruningWarning, stacklevel=2)
    # torch's stubs type Module.__setattr__'s value as Tensor | Module; any value is allowed
    bias_history = [[name, BIAS, []] for name in constants.biased]
    work.prune_report = PruneReport(  # type: ignore[assignment]
        family, threshold, layers, head_history + bias_history + dg.pruning_history(), err, uniform
    )
    return work


def replay(
    model: nn.Module, history: list, example_inputs: torch.Tensor | tuple | None = None
) -> nn.Module:
    """Rebuild a slim structure: apply a :class:`PruneReport`'s ``history`` to a fresh dense model.

    Loading the slim model's ``state_dict`` into the result restores it without pickled code.

    Args:
        model: a fresh dense model of the architecture that was pruned; changed in place.
        history: ``PruneReport.history``.
        example_inputs: an input batch for tracing; inferred as in ``attach`` by default.

    Returns:
        ``model``, with the slim model's structure.
    """
    check_history(history, model)  # names and indices from a file, walked with getattr
    if example_inputs is None:
        example_inputs = example_input_for(model)
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # the head specs of the model's libraries, as attach registers them: a process that loads a
    # slim checkpoint may never have gated a model of that library
    register_for(model)
    steps = [s for s in history if s[1] not in MARKS]
    for name, _, idxs in (s for s in history if s[1] == HEADS):
        remove_heads_(model, name, idxs)
    prepare_shufflenets(model)  # as attach did (index buffers in the state_dict)
    for name, _, idxs in (s for s in history if s[1] == STREAM):
        remove_units_(model, name, idxs)
    for name, mark, idxs in (s for s in history if s[1] in SURGERY):
        SURGERY[mark](model, name, idxs)
    add_biases_(model, history)
    dg = _dependency_graph(model, example)
    dg.load_pruning_history(steps)
    return model
