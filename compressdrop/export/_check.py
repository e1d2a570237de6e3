"""What every exporter here shares: run the model in eval mode on the CPU, a dynamic batch
dimension, and the check of an exported file against PyTorch at several batch sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..errors import CompressDropError

__all__ = [
    "ExportError",
    "ExportMismatchError",
    "as_inputs",
    "compare_at_batches",
    "draw_like",
    "dynamic_batch",
    "errors_at_lengths",
    "eval_on_cpu",
    "export_dims",
    "export_shapes",
    "fixed_gate_factors",
    "made_by",
    "output_names",
    "token_lengths",
    "with_lengths",
]


class ExportError(CompressDropError, RuntimeError):
    """The model could not be exported."""


class ExportMismatchError(ExportError):
    """The exported file's output differs from PyTorch's beyond the tolerance."""


@contextlib.contextmanager
def fixed_gate_factors(model: nn.Module) -> Iterator[None]:
    """While a gated model is exported, each gate's :meth:`~compressdrop.gates.Gate.eval_factor`
    (E[θ], 0 for a pruned unit) is computed here by PyTorch and is a constant in the graph.
    Traced, the closed forms failed: the ONNX exporter folded log-normal ones to NaN (its float64
    log-CDF), and those of the families built on pyro's distributions stopped torch.export
    (data-dependent guards)."""
    from ..gating import named_gates

    gates = [g for _, g in named_gates(model)]
    try:
        for g in gates:
            with torch.no_grad():
                g.__dict__["_fixed_factor"] = g.eval_factor().detach().clone()
        yield
    finally:
        for g in gates:
            g.__dict__.pop("_fixed_factor", None)


@contextlib.contextmanager
def eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on the CPU; its device and training flag come back afterwards."""
    was_training = model.training
    device = next(model.parameters()).device
    try:
        yield model.eval().cpu()
    finally:
        model.to(device).train(was_training)


def dynamic_batch() -> torch.export.Dim:
    """The batch dimension every export leaves dynamic."""
    return torch.export.Dim("batch", min=1, max=1 << 20)


def as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """An export's example as a tuple of input batches (a tensor: one input).

    Raises:
        ExportError: anything but a tensor or a tuple (or list) of tensors of one batch size.
    """
    xs = (example,) if isinstance(example, torch.Tensor) else example
    if not (
        isinstance(xs, (tuple, list))
        and xs
        and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in xs)
    ):
        raise ExportError(
            f"the exporters take an input batch or a tuple of them, got {type(example).__name__}"
        )
    if len({len(t) for t in xs}) > 1:
        raise ExportError(f"the inputs differ in batch size: {[len(t) for t in xs]}")
    return tuple(xs)


def export_shapes(
    xs: tuple[torch.Tensor, ...],
    check_lengths: Sequence[int],
    longest: int = 1 << 16,
    auto_length: bool = False,
) -> tuple[dict, ...]:
    """The dynamic dimensions of each input (:func:`export_dims`); several inputs share one
    batch dimension, and have no dynamic length.

    Raises:
        ExportError: ``check_lengths`` with several inputs.
    """
    if len(xs) == 1:
        return (export_dims(xs[0], check_lengths, longest, auto_length),)
    if check_lengths:
        raise ExportError("check_lengths needs a model of one input (token ids)")
    batch = dynamic_batch()
    return tuple({0: batch} for _ in xs)


def draw_like(example: torch.Tensor, batch: int, model: nn.Module | None = None) -> torch.Tensor:
    """A fresh random batch of ``batch`` inputs like ``example`` (token ids within its ids, each
    row ended by the end-of-sequence id where ``model`` reads its state: BART's classifier)."""
    from ..gating.inputs import with_eos

    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, dtype=example.dtype)
    ids = torch.randint(0, int(example.max()) + 1, shape, dtype=example.dtype)
    return ids if model is None else with_eos(model, ids)


def token_lengths(x: torch.Tensor) -> tuple[int, ...]:
    """For token ids (an int64 or int32 batch ``(B, T)``, ``T`` ≥ 4): a shorter length,
    ``T // 2``, at which to check an export whose sequence dimension is dynamic; ``()`` for any
    other input (floats, bytes of pixels, masks)."""
    if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2 or x.shape[1] < 4:
        return ()
    return (x.shape[1] // 2,)


def with_lengths(
    export: Callable[..., Any], model: nn.Module, x: torch.Tensor, path: Any, **kwargs: Any
) -> Any:
    """``export(model, x, path, check_lengths=..., **kwargs)`` with the sequence dimension of
    token ids left dynamic (:func:`token_lengths`); where that export fails, or the model (or
    the file) fails at the other length, once more with the example's length fixed, and a warning
    that says so. A program loaded from a ``.pt2`` whose length was fixed keeps it, unwarned."""
    import warnings

    lengths = token_lengths(x)
    first = (vars(model).get("program_inputs") or (None,))[0]  # a .pt2's (programs/_inputs)
    if first is not None and len(first) > 1 and isinstance(first[1], int):
        lengths = ()  # a program exported at one length: it takes no other
    if not lengths:
        return export(model, x, path, **kwargs)
    try:
        return export(model, x, path, check_lengths=lengths, **kwargs)
    except Exception as e:  # the export, its check, or the model itself at another length
        first = e
    fixed = export(model, x, path, **kwargs)  # fails as the first try did where that was not it
    cause = (str(first).splitlines() or [type(first).__name__])[0][:300]
    warnings.warn(
        f"compressdrop: exported with dimension 1 of the token ids (the sequence length) fixed "
        f"at {x.shape[1]}: a dynamic length failed ({cause})",
        UserWarning,
        stacklevel=3,
    )
    return fixed


def export_dims(
    x: torch.Tensor, check_lengths: Sequence[int], longest: int = 1 << 16, auto_length: bool = False
) -> dict[int, Any]:
    """The dynamic dimensions of an export of inputs like ``x``: the batch, and with
    ``check_lengths`` dimension 1 (the sequence of token ids) too, from 2 to ``longest``
    (:func:`~compressdrop.runtime.max_length`). With ``auto_length`` the length is a hint,
    ``Dim.AUTO`` in that range: torch.export keeps it dynamic where the model's code allows, and
    fixes or narrows it where not instead of failing; the ONNX export then reads what it did
    (:func:`~._dims.accepted_sizes`).

    Raises:
        ExportError: ``check_lengths`` for inputs without a dimension 1, or beyond ``longest``.
    """
    if check_lengths and x.dim() < 2:
        raise ExportError("check_lengths needs inputs with a sequence dimension (batch, length)")
    beyond = [n for n in (*check_lengths, x.shape[1] if check_lengths else 0) if n > longest]
    if beyond:
        raise ExportError(
            f"sequence length {beyond[0]} is longer than the model takes ({longest}, its "
            "config's max_position_embeddings or n_positions): check shorter lengths"
        )
    hint = _auto(longest) if auto_length else None
    length = {1: hint or torch.export.Dim("length", min=2, max=longest)} if check_lengths else {}
    return {0: dynamic_batch(), **length}


def _auto(longest: int) -> Any:
    """``Dim.AUTO`` from 2 to ``longest``; ``None`` where this torch has no such hint or its
    hint takes no range (an older torch): the named length then, as before."""
    try:
        return torch.export.Dim.AUTO(min=2, max=longest)
    except (AttributeError, TypeError):
        return None


def errors_at_lengths(
    model: nn.Module,
    run: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    lengths: Sequence[int],
    rtol: float,
    what: str,
) -> dict[str, float]:
    """:func:`compare_at_batches` (batch 2) at each of ``lengths``, keyed ``"length L"``: one
    example of ``x`` cut or tiled to that length, token ids all set to the largest in ``x`` (its
    values bound the ids a model takes), the last the end-of-sequence id where the model reads
    its state (BART's classifier)."""
    from ..gating.inputs import with_eos

    out = {}
    for n in lengths:
        at = x[:1, :1].expand(1, n, *x.shape[2:]).clone()
        if not x.is_floating_point():
            at = with_eos(model, at.fill_(int(x.max())))
        out[f"length {n}"] = compare_at_batches(model, run, at, (2,), rtol, f"{what}, length {n}")[
            2
        ]
    return out


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def output_arrays(out: Any) -> list[np.ndarray]:
    """A model's outputs as arrays, in the order exporters flatten them: a tensor, or the tensors
    of any nesting of tuples, lists and dicts."""
    from torch.utils._pytree import tree_leaves

    return [t.detach().cpu().numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_names(out: Any, taken: Sequence[str] = ()) -> list[str]:
    """Names for a model's output tensors, in the order :func:`output_arrays` flattens them:
    ``output`` for one tensor, ``output_0``, ``output_1``, ... for a tuple, a dictionary's keys
    (a Hugging Face model's ``logits``), joined by ``_`` where nested (``hidden_states_1``);
    made unique, and distinct from ``taken`` (the input names)."""
    from torch.utils._pytree import tree_flatten_with_path

    leaves = [(p, t) for p, t in tree_flatten_with_path(out)[0] if isinstance(t, torch.Tensor)]
    names: list[str] = []
    used = set(taken)
    for path, _ in leaves:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts or not isinstance(getattr(path[0], "key", None), str):
            parts.insert(0, "output")
        name = base = "_".join(parts)
        n = 1
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def compare_at_batches(
    model: nn.Module,
    run: Callable[..., Any],
    example: torch.Tensor | tuple[torch.Tensor, ...],
    batch_sizes: Sequence[int],
    rtol: float,
    what: str,
) -> dict[int, float]:
    """max|run(*x) − model(*x)| / max|model(*x)| on fresh random inputs like ``example`` (an
    input batch, or a tuple of them; token ids for an integer one) at each batch size, over
    every output tensor (``run`` returns an array, a tensor or a sequence of them, in the order
    :func:`output_arrays` flattens the model's output).

    Raises:
        ExportMismatchError: naming ``what``, at the first batch size beyond ``rtol``.
    """
    errors: dict[int, float] = {}
    xs = as_inputs(example)
    for b in batch_sizes:
        xb = tuple(draw_like(t, b, model if i == 0 else None) for i, t in enumerate(xs))
        with torch.no_grad():
            ref = output_arrays(model(*xb))
        raw = run(*xb)
        got = [np.asarray(a) for a in (raw if isinstance(raw, (list, tuple)) else [raw])]
        shapes = [a.shape for a in got], [r.shape for r in ref]
        if shapes[0] != shapes[1]:
            raise ExportMismatchError(
                f"{what} gives outputs of shapes {shapes[0]} at batch size {b}, PyTorch {shapes[1]}"
            )
        errors[b] = max(_rel_error(g, r) for g, r in zip(got, ref))
        if not errors[b] <= rtol:
            raise ExportMismatchError(
                f"{what} differs from PyTorch at batch size {b}: relative error "
                f"{errors[b]:.3g} > {rtol:g}{_tied_topk(model, xb)}"
            )
    return errors


def _tied_topk(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> str:
    """Why a mismatch may be no fault of the export: the rows of ``model``'s ``torch.topk``
    calls on ``xs`` whose k-th and (k+1)-th largest entries are equal, so that which of them is
    picked is a choice, which PyTorch and onnxruntime make differently; ``""`` where none tie."""
    from torch.overrides import TorchFunctionMode

    counts = [0, 0]  # tied rows, rows

    class _Ties(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.topk, torch.Tensor.topk):  # (the mode is off in here: no loop)
                a = dict(zip(("input", "k", "dim", "largest"), args)) | (kwargs or {})
                x, k, dim = a["input"], int(a["k"]), a.get("dim", -1)
                if 0 < k < x.shape[dim]:
                    v = torch.topk(x, k + 1, dim, a.get("largest", True)).values
                    tied = v.select(dim, k - 1) == v.select(dim, k)
                    counts[0] += int(tied.sum())
                    counts[1] += tied.numel()
            return out

    with torch.no_grad(), _Ties():
        model(*xs)
    if not counts[0]:
        return ""
    return (
        f"; {counts[0]} of the {counts[1]} rows the model's torch.topk ranks tie at the k-th "
        "largest, and PyTorch picks among tied entries otherwise than onnxruntime's TopK (the "
        "lowest index first, as ONNX specifies): tokens routed to other experts, say. Random or "
        "zero weights tie where trained ones do not (AFMoE's router starts at zero): check the "
        "export on the trained model"
    )


def made_by(model: nn.Module) -> dict[str, Any]:
    """What made ``model``, for an exported file's metadata: compressdrop's version, how a slim
    model was pruned (its ``prune_report``), its outputs' class names (``classes``, a list) and,
    for a model that reads each row's end-of-sequence state (BART's classifier), that id
    (``eos_token_id``: a latency run on the file ends its rows with it)."""
    from ..gating.inputs import eos_read_by

    meta: dict[str, Any] = {"compressdrop_version": __version__}
    report = getattr(model, "prune_report", None)
    if report is not None:
        meta.update(report.metadata())
    names = getattr(model, "class_names", None)
    if names:
        meta["classes"] = [str(c) for c in names]
    eos = eos_read_by(model)
    if eos is not None:
        meta["eos_token_id"] = eos
    return meta
