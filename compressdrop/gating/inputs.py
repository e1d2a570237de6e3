"""The inputs a model is traced and checked with: inferred shapes, recorded specs, random batches.

:func:`~compressdrop.gating.attach` records the specs of the inputs it traced a model with (shape
without the batch dimension, dtype, and for token ids the bound they stay below), so that pruning,
checkpoints and export can draw fresh inputs of the same kind later.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "checked_example",
    "end_rows_with",
    "eos_read_by",
    "example_input_for",
    "example_inputs_of",
    "in_float32",
    "input_shapes_of",
    "input_specs",
    "input_specs_of",
    "random_inputs",
    "run_example",
    "uncompiled",
    "with_eos",
]

_STATE = "_compressdrop"  # attribute on the root model holding the attach record
_HALF = (torch.bfloat16, torch.float16)


def in_float32(m: nn.Module, call: tuple[tuple, dict]) -> tuple[nn.Module, tuple[tuple, dict]]:
    """``m`` and a ``call`` of it recorded while tracing, for a check of its structure (removing
    units equals zeroing them, to 1e-5): where ``m`` holds bfloat16 or float16 weights, a float32
    copy of it and the call's tensors of those dtypes in float32, since their rounding (bfloat16:
    8 bits of mantissa) is far above the check's tolerance; else both as they are."""
    from torch.utils._pytree import tree_map

    if not any(p.dtype in _HALF for p in m.parameters()):
        return m, call
    call = tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t, call
    )
    return copy.deepcopy(m).float(), call


def checked_example(model: nn.Module, example: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``example`` (a tensor, or a tuple or list of tensors: the model's positional inputs), or,
    for ``None``, one drawn for ``model`` (:func:`example_input_for`).

    Raises:
        InputError: anything else (a dict of named inputs, say), naming what it got.
    """
    if example is None:
        return example_input_for(model)
    if isinstance(example, list):
        example = tuple(example)
    if isinstance(example, torch.Tensor) or (
        isinstance(example, tuple) and example and all(isinstance(t, torch.Tensor) for t in example)
    ):
        return example
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors (the model's positional "
        f"inputs), got {type(example).__name__}; a model whose forward takes a dict or keyword "
        "inputs needs a wrapper module that takes them as positional tensors"
    )


def run_example(model: nn.Module, inputs: tuple, what: str = "example_inputs") -> Any:
    """``model(*inputs)`` without gradients, the model's own failure turned into an error that
    names the inputs (a wrong shape or dtype is the usual cause).

    Raises:
        InputError: the forward pass raised; the message gives each input's shape and dtype and
            the model's own error (chained).
    """
    try:
        with torch.no_grad():
            return model(*inputs)
    except (InputError, Warning, torch.OutOfMemoryError):  # (a warning made an error; memory)
        raise
    except Exception as e:  # whatever the model's forward raises on inputs that do not fit it
        shapes = ", ".join(
            f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(
            f"the model does not run on {what} ({shapes}): {type(e).__name__}: {first}"
        ) from e


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (its ``_orig_mod``), else ``model`` itself:
    the wrapper's own tracing hides the layers' structure from Torch-Pruning."""
    inner = model._modules.get("_orig_mod") if type(model).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else model


TOKENS = 16  # the sequence length of an example for a token model that records no input shape


def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random input batch for ``model``, of the shape the model declares or implies.

    The shape comes from ``model.arch['input_shape']`` (compressdrop's reference nets), else from
    a ``model.input_shape`` attribute, else from a first layer that is a Linear (its features) or
    an ``nn.Embedding`` (:data:`TOKENS` token ids).

    Args:
        model: the model to feed.
        batch: examples in the batch.

    Returns:
        A standard-normal tensor of shape ``(batch, *input_shape)`` on the model's device; token
        ids below its size if the model's first layer is an ``nn.Embedding``.

    Raises:
        InputError: no input shape can be inferred (pass ``example_inputs`` to the caller).
    """
    arch = getattr(model, "arch", None)
    declared = getattr(model, "input_shape", None)
    first = next((m for m in model.modules() if not list(m.children())), None)
    shape = None
    if isinstance(arch, Mapping) and "input_shape" in arch:
        shape = tuple(arch["input_shape"])
    elif declared is not None:
        shape = tuple(declared)
    elif isinstance(first, nn.Linear):
        shape = (first.in_features,)
    elif isinstance(first, nn.Embedding):
        shape = (TOKENS,)  # a sequence model (a Hugging Face folder's): any length will do
    if shape is None:
        raise InputError(
            "cannot infer the model's input shape: pass example_inputs=<a batch of inputs> "
            "(or give the model an `arch = {'input_shape': [...]}` attribute)"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    if isinstance(first, nn.Embedding) or _program_reads_ids(model):  # token ids
        emb = first if isinstance(first, nn.Embedding) else _first(model, nn.Embedding)
        high = emb.num_embeddings if isinstance(emb, nn.Embedding) else 2
        return with_eos(model, torch.randint(0, high, (batch, *shape), device=device))
    return torch.randn(batch, *shape, device=device, dtype=_float_dtype(model))


def _program_reads_ids(model: nn.Module) -> bool:
    """Whether ``model`` is a graph (a ``.pt2`` program's module) whose first input is integer:
    token ids (its layers' order need not start with the embedding)."""
    graph = getattr(model, "graph", None)
    first = next((n for n in getattr(graph, "nodes", ()) if n.op == "placeholder"), None)
    val = first.meta.get("val") if first is not None else None
    return isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex())


def _first(model: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


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
    # the model's float dtype now, which a model converted after attach (.double()) changed
    dtype = _float_dtype(model)
    inputs = random_inputs(specs, batch, next(model.parameters()).device)
    return tuple(
        t.to(dtype) if t.is_floating_point() and dtype else with_eos(model, t) if i == 0 else t
        for i, t in enumerate(inputs)
    )


def eos_read_by(model: nn.Module) -> int | None:
    """The end-of-sequence id whose state ``model``'s output is read from, or ``None``: a Hugging
    Face encoder-decoder's sequence classifier (BART, mBART, PLBART, LED, MVP, T5) classifies
    each example by the state at its last ``config.eos_token_id`` and refuses a batch whose rows
    hold none ("Each example must contain at least one <eos> token") or differ in how many they
    hold ("All examples must have the same number of <eos> tokens")."""
    config = getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if (
        isinstance(eos, int)
        and not isinstance(eos, bool)
        and getattr(config, "is_encoder_decoder", False)
        and type(model).__name__.endswith("ForSequenceClassification")
    ):
        return eos
    return None


def with_eos(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token ids ``(B, T)`` made valid for a model that reads an end-of-sequence state
    (:func:`eos_read_by`): each row ends with the EOS id and holds no other (a drawn EOS becomes
    the id below it, or above for id 0); ``ids`` unchanged for any other model or input."""
    eos = eos_read_by(model)
    return ids if eos is None else end_rows_with(ids, eos)


def end_rows_with(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Token ids ``(B, T)`` whose rows end with ``eos`` and hold no other (a drawn ``eos`` becomes
    the id below it, or above for id 0), as :func:`with_eos` makes them; any other input as it
    is (floats, another rank, no positions)."""
    if ids.is_floating_point() or ids.dim() != 2 or ids.shape[1] == 0:
        return ids
    out = ids.masked_fill(ids == eos, eos - 1 if eos > 0 else eos + 1)
    out[:, -1] = eos
    return out


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (``None``: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
