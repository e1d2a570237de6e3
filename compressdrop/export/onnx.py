"""ONNX export of (slim) models, verified in onnxruntime before the file appears."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..gating.inputs import run_example
from ..runtime import max_length, no_cache
from ._check import (
    ExportError,
    ExportMismatchError,
    as_inputs,
    compare_at_batches,
    errors_at_lengths,
    eval_on_cpu,
    export_shapes,
    fixed_gate_factors,
    made_by,
    output_names,
)
from ._complex import real_valued
from ._dims import ExportWarning, accepted_sizes, checked_sizes, pin_fixed, report
from ._experts import exportable_experts
from ._gemm import gemm_linears
from ._optimizer import exact_constants

__all__ = [
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "ExportWarning",
    "export_onnx",
    "load_onnx_metadata",
]

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ExportReport:
    """What was written and how well onnxruntime reproduced PyTorch (per checked batch size)."""

    path: Path
    bytes: int
    provider: str
    max_rel_error: dict[int | str, float]
    opset: int
    metadata: dict[str, str]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision notices, progress lines); errors still raise,
    as exceptions: the tracebacks torch also logs of a failed trace (an input of the wrong
    shape printed some forty lines before the error that names it) are left out."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch._subclasses", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(devnull),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _spelled_out_attention(model: nn.Module) -> Iterator[list]:
    """Every stock ``nn.MultiheadAttention`` in ``model`` swapped, for the export, for
    compressdrop's drop-in subclass on the same parameters (put back afterwards).

    PyTorch's fused attention exports through a decomposition of ``scaled_dot_product_attention``
    that leaves kᵀ as a Transpose node onnxruntime cannot fold into its MatMul; on CPU that node
    costs about as much as the product (BENCHMARKS §1, ``benchmarks/profile_vit_ort.py``). The
    subclass spells the attention out when exported, so dense and slim models get the same graph.
    Modules it cannot stand in for (``add_bias_kv``, ``add_zero_attn``) stay as they are. Yields
    the swaps made (parent, name, stock module).
    """
    from ..gating.attention import nested_off, to_prunable, why_not_heads

    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.MultiheadAttention and why_not_heads(child) is None
    ]
    nested: list[str] = []
    try:
        for parent, name, child in swaps:
            setattr(parent, name, to_prunable(child))
        nested = nested_off(model)  # that path hands the subclass tensors it does not take
        yield swaps
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
        for name in nested:
            encoder = model.get_submodule(name)
            assert isinstance(encoder, nn.TransformerEncoder)
            encoder.use_nested_tensor = True


def _named_outputs(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> list[str] | None:
    """The export's output names (:func:`~._check.output_names`: ``logits`` for a Hugging Face
    model, not the exporter's ``linear_7``); ``None`` where the model does not run on ``xs``
    (the export then fails and names why)."""
    try:
        with torch.no_grad():
            out = model(*xs)
    except Exception:  # any error of the model's own forward: reported by the export
        return None
    params = inspect.signature(model.forward).parameters
    return output_names(out, taken=list(params)[: len(xs)])


def _onnx_program(
    model: nn.Module, xs: tuple[torch.Tensor, ...], dims: tuple[dict, ...], opset: int | None
) -> Any:
    """``torch.onnx.export`` of ``model``, tried in turn, each only where it changes something:
    with its attention spelled out (:func:`_spelled_out_attention`) and its linear layers as one
    ``Gemm`` each (:func:`~._gemm.gemm_linears`); with the attention alone; as the model is. Only
    the last attempt's error is raised (a forward that reads a stock attention's internals, e.g.
    to call ``F.multi_head_attention_forward`` itself, cannot take the subclass; a failure of the
    ``Gemm`` switch alone still keeps the attention spelled out). Where complex values stopped the
    exporter, its program once more with them written as real ones
    (:func:`~._complex.real_valued`: an :class:`ExportError` naming what it cannot write)."""
    kwargs: dict[str, Any] = {
        "dynamo": True,
        "dynamic_shapes": dims,
        "opset_version": opset,
        "external_data": False,
        "verbose": False,
        "output_names": _named_outputs(model, xs),
    }
    tried: set[tuple[bool, bool]] = set()
    for attention, gemm in ((True, True), (True, False)):
        with contextlib.ExitStack() as stack:
            swapped = stack.enter_context(_spelled_out_attention(model)) if attention else []
            gemms = stack.enter_context(gemm_linears(model)) if gemm else 0
            changes = (bool(swapped), bool(gemms))
            if changes == (False, False) or changes in tried:
                continue  # the model as it is, or an export already tried
            tried.add(changes)
            # a failure is retried without: torch.export's error log of it would alarm
            log = logging.getLogger("torch.export")
            level = log.level
            log.setLevel(logging.CRITICAL)
            try:
                return torch.onnx.export(model, xs, **kwargs)
            except Exception:
                continue
            finally:
                log.setLevel(level)
    try:
        return torch.onnx.export(model, xs, **kwargs)
    except Exception as e:  # raised as it is unless eager attention exports
        first = e
    if _complex_failure(first):  # complex rotary positions: the program once more, all real
        try:
            real = real_valued(model, xs, dims)
        except ExportError:  # an operation it cannot write, named
            raise
        except Exception:  # torch.export itself fails: the exporter's error says more
            real = None
        if real is not None:
            return torch.onnx.export(real, xs, **kwargs)
    with _eager_attention(model) as switched:
        if switched:
            with contextlib.suppress(Exception):
                return torch.onnx.export(model, xs, **kwargs)
    raise first


def _complex_failure(e: BaseException) -> bool:
    """Whether the exporter's error, or one it was raised from, is about complex values."""
    seen: BaseException | None = e
    while seen is not None:
        if "complex" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[bool]:
    """A Hugging Face model's attention switched from ``sdpa`` to ``eager`` (the same function,
    spelled out as matmul and softmax) for a last export attempt, and back afterwards; yields
    whether it switched. T5 failed in the exporter's decomposition (step 2/3) with ``sdpa``: its
    attention views the transposed output of CPU attention, whose decomposition lays it out
    otherwise ("Cannot view a tensor with shape [B, 8, 4, 8] and strides (256, 8, 64, 1)")."""
    config = getattr(model, "config", None)
    was = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if was != "sdpa" or not callable(switch):
        yield False
        return
    switch("eager")
    try:
        yield True
    finally:
        switch(was)


def _refuse_cpu_bfloat16(model: nn.Module, providers: str) -> None:
    """Refuse a bfloat16 model that onnxruntime would check on its CPU provider, which has no
    bfloat16 kernels for common operators (``Mul``): its session would fail on the graph."""
    import onnxruntime as ort

    # the weights' dtype: a float32 model may keep a bfloat16 constant that it casts before use
    # (RecurrentGemma's embedding normalizer), which the CPU provider's Cast takes
    tensors: list[torch.Tensor] = list(model.parameters()) or list(model.buffers())
    if not any(t.dtype == torch.bfloat16 for t in tensors):
        return
    cuda = (
        providers == "cuda" or (providers == "auto" and torch.cuda.is_available())
    ) and "CUDAExecutionProvider" in ort.get_available_providers()
    if not cuda:
        raise ExportError(
            "the model is in bfloat16, which onnxruntime's CPU provider has no kernels for "
            "(Mul, MatMul, ...): export model.float() instead (nothing was written)"
        )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    opset: int | None = None,
    check_batch_sizes: Sequence[int] = (1, 7, 64),
    rtol: float = 1e-4,
    providers: str = "auto",
    check_lengths: Sequence[int] = (),
    dynamic_length: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path``, with a dynamic batch dimension, and verify it.

    Steps, all on a temporary file beside ``path``: the dynamo exporter (weights embedded, batch
    dimension dynamic), ``onnx.checker``, a check that only standard ONNX operators appear, the
    metadata (``compressdrop_version`` plus ``metadata``), then onnxruntime against PyTorch on fresh
    random inputs at every batch size in ``check_batch_sizes``. Only when all of it passes does the
    file move to ``path``; on any failure ``path`` is left as it was.

    Args:
        model: exported in eval mode (its training flag is restored afterwards), on the CPU.
        example_input: one input batch (its shape without the batch dimension is the input
            shape), or a tuple of them for a model of several inputs (one batch size).
        path: where to write the ``.onnx`` file.
        metadata: extra ``metadata_props`` (string to string). A slim model from ``prune`` also
            records :meth:`PruneReport.metadata
            <compressdrop.pruning.PruneReport.metadata>` (threshold, gate family, units before
            and after).
        opset: ONNX opset (``None``: the exporter's default); one the exporter cannot write
            (torch's dynamo exporter starts at 18 and converts down only so far) is an error.
        check_batch_sizes: batch sizes run in onnxruntime.
        rtol: largest accepted max|ort − torch| / max|torch|.
        providers: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        check_lengths: for sequence models (token ids ``(batch, length)``): leave dimension 1
            dynamic too, and check at each of these lengths (batch 2) as well; the report's
            ``max_rel_error`` keys them as ``"length L"``. A Hugging Face model is exported with
            ``config.use_cache`` off (restored afterwards): logits without the key/value cache.
        dynamic_length: leave dimension 1 dynamic without ``check_lengths`` (for a caller that
            checks other lengths itself: a graph that samples cannot match PyTorch exactly).

    Where the model's code fixes a dimension asked to be dynamic (a Python loop over the tokens
    unrolls at the example's length: RWKV's recurrence), or narrows its range, the graph takes
    only those sizes: it is checked only there, an :class:`ExportWarning` names the dimension,
    its sizes and why, and the metadata's ``input_dims`` records them (``{"input_ids": {"1":
    [8, 8]}}``; a fixed size is also written into the graph's input).

    Raises:
        InputError: the model does not run on ``example_input`` (its shapes and dtypes named).
        ExportError: the exporter failed, produced non-standard operators or another opset;
            a bfloat16 model to be checked on onnxruntime's CPU provider (no kernels there).
        ExportMismatchError: onnxruntime disagrees with PyTorch beyond ``rtol``.
    """
    import onnx

    path = Path(path)
    # metadata values are strings: the class names as JSON
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in made_by(model).items()}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    _refuse_cpu_bfloat16(model, providers)
    xs = tuple(t.detach().cpu() for t in as_inputs(example_input))
    if len(xs[0]) == 1:  # torch.export fixes a dimension of size 1: trace a batch of 2
        xs = tuple(t.repeat(2, *([1] * (t.dim() - 1))) for t in xs)
    dynamic = tuple(check_lengths) or ((2,) if dynamic_length else ())  # 2: any length
    dims = export_shapes(xs, dynamic, max_length(model), auto_length=True)
    with eval_on_cpu(model) as model_cpu, no_cache(model_cpu), atomic_write(path) as tmp:
        try:
            with (
                _quiet_exporter(),
                fixed_gate_factors(model_cpu),
                exportable_experts(model_cpu),
                exact_constants(),
            ):
                program = _onnx_program(model_cpu, xs, dims, opset)
                if program is None:
                    raise ExportError("torch.onnx.export returned no program")
                program.save(str(tmp), external_data=False)
                limits = accepted_sizes(program, xs, dims)
        except ExportError:  # compressdrop's own, which says what failed
            raise
        except Exception as e:  # the exporter raises many types; report them as one
            run_example(model_cpu, xs, "example_input")  # an input that does not fit: named
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
        proto = onnx.load(str(tmp))
        pin_fixed(proto, limits)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
        odd = sorted(
            {
                f"{n.domain}::{n.op_type}"
                for n in proto.graph.node
                if n.domain not in STANDARD_DOMAINS
            }
        )
        if odd:
            raise ExportError(f"the exported model uses non-standard operators: {', '.join(odd)}")
        names = [i.name for i in proto.graph.input]
        batches, lengths = checked_sizes(limits, check_batch_sizes, check_lengths, len(xs[0]))
        taken, said = report(limits, names)
        if limits:  # a dimension the model's code fixed or bounds: checked where it holds
            meta["input_dims"] = json.dumps(taken)
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
        op = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), -1)
        if opset is not None and op != opset:  # the exporter falls back without a word
            raise ExportError(
                f"the exporter could not write ONNX opset {opset} (it wrote opset {op}); "
                f"ask for {op} or leave the opset out"
            )

        session, provider = _session(tmp, providers, model_cpu)
        names = [i.name for i in session.get_inputs()]
        run = lambda *xb: session.run(None, {n: t.numpy() for n, t in zip(names, xb)})  # noqa: E731
        what = f"onnxruntime ({provider})"
        checked = compare_at_batches(model_cpu, run, xs, batches, rtol, what)
        errors: dict[int | str, float] = {b: e for b, e in checked.items()}
        errors.update(errors_at_lengths(model_cpu, run, xs[0], lengths, rtol, what))
    if limits:  # said once the file is written
        warnings.warn(said, ExportWarning, stacklevel=2)
    return ExportReport(path, path.stat().st_size, provider, errors, op, meta)


def _session(path: Path, providers: str, model: nn.Module) -> tuple[Any, str]:
    """An onnxruntime session on the exported graph; a graph it has no kernel for (float64
    convolutions on the CPU provider, say) is an :class:`ExportError` that says what to do."""
    from ..runtime import ort_session

    try:
        return ort_session(path, providers)
    except Exception as e:  # onnxruntime's own NotImplemented, not Python's
        if type(e).__name__ != "NotImplemented":
            raise
        said = str(e).split("NOT_IMPLEMENTED : ")[-1]
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        fix = "" if dtypes == ["float32"] else ": export model.float() instead"
        raise ExportError(
            f"onnxruntime cannot run the exported graph of this {', '.join(dtypes)} model "
            f"({said}){fix} (nothing was written)"
        ) from None


def load_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (read as :func:`~compressdrop.runtime.onnx_bytes`
    reads it: a regular file of at most 2 GB, a FIFO refused without blocking on it)."""
    import onnx

    from ..runtime import onnx_bytes

    proto = onnx.load_model_from_string(onnx_bytes(Path(path)))
    return {p.key: p.value for p in proto.metadata_props}
