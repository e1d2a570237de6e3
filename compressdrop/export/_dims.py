"""Which sizes an exported graph really takes along the dimensions the export left dynamic.

The ONNX export asks for a dynamic sequence length as a hint, ``Dim.AUTO`` (:func:`~._check.
export_dims`). A named ``Dim`` made torch.export fail wherever it could not prove a guard for the
whole range (the chunked scans of Mamba-2 and of the gated delta rule pad the sequence to whole
chunks: Bamba, Jamba, Qwen3-Next), and ``torch.onnx.export`` then applied torch.export's
suggested fix without a word: the length fixed at the example's. onnxruntime refused every other
length with its own message ("Got invalid dimensions for input"). With the hint those graphs stay
dynamic. A model whose code does depend on the length (RWKV's recurrence on the CPU, a Python
loop over the tokens) still gets it fixed: :func:`accepted_sizes` reads that from the exported
program, so that the export checks only the sizes its graph takes and says which those are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Accepted",
    "ExportWarning",
    "accepted_sizes",
    "axis_name",
    "checked_sizes",
    "pin_fixed",
    "report",
]


class ExportWarning(UserWarning):
    """The exported graph takes fewer input sizes than the export was asked to leave dynamic."""


@dataclass(frozen=True)
class Accepted:
    """The sizes ``low``..``high`` that dimension ``axis`` of input ``index`` takes, narrower
    than the ``asked`` range; ``why`` says what narrowed it."""

    index: int
    axis: int
    low: int
    high: int
    asked: tuple[int, int]
    why: str

    def takes(self, size: int) -> bool:
        """Whether the graph takes ``size`` along this dimension."""
        return self.low <= size <= self.high


def axis_name(axis: int) -> str:
    """``the batch`` or ``the sequence length`` (axes 0 and 1 of token ids)."""
    return "the batch" if axis == 0 else "the sequence length" if axis == 1 else f"axis {axis}"


def _bounds(dim: Any) -> tuple[int, int]:
    """The range asked of a ``torch.export.Dim`` or a ``Dim.AUTO(min=, max=)`` hint."""
    low, high = getattr(dim, "min", None), getattr(dim, "max", None)
    return (0 if low is None else int(low)), (1 << 62 if high is None else int(high))


def accepted_sizes(
    program: Any, xs: tuple[torch.Tensor, ...], dims: Sequence[dict]
) -> list[Accepted]:
    """The dynamic dimensions asked in ``dims`` (one ``{axis: Dim}`` per input of ``xs``) that
    the exported ``program`` (a ``torch.onnx.ONNXProgram``) takes only some sizes of: one fixed
    at the example's size, or one whose range torch.export narrowed (read from the program's
    placeholders and ranges). Empty where every such dimension is dynamic as asked."""
    ep = getattr(program, "exported_program", None)
    if ep is None:
        return []
    ranges = ep.range_constraints
    holders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    users = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in holders if n.name in users]
    out = []
    for i, (x, asked) in enumerate(zip(xs, dims)):
        shape = getattr(vals[i], "shape", None) if i < len(vals) else None
        for axis, dim in asked.items():
            want = _bounds(dim)
            size = shape[axis] if shape is not None else x.shape[axis]
            low, high = want
            if isinstance(size, int):
                low = high = size
            elif (vr := ranges.get(size.node.expr)) is not None:
                low, high = max(low, _int(vr.lower, low)), min(high, _int(vr.upper, high))
            why = "torch.export fixed it" if low == high else "torch.export narrowed its range"
            why += ": the model's code depends on its value"
            if (low, high) != want:
                out.append(Accepted(i, axis, low, high, want, why))
    return out


def _int(bound: Any, default: int) -> int:
    """A range's bound as an int (``default`` for an infinite one)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError):  # torch's int_oo, sympy's oo
        return default


def pin_fixed(proto: Any, limits: Sequence[Accepted]) -> None:
    """Write each fixed dimension of ``limits`` into the ONNX ``proto``'s inputs as its size.
    torch.export can fix a size yet keep its symbol (a range of one value), which the graph
    would carry as a dynamic dimension: onnxruntime would then run the unrolled graph at other
    sizes instead of refusing them."""
    for a in limits:
        if a.low == a.high:
            proto.graph.input[a.index].type.tensor_type.shape.dim[a.axis].dim_value = a.low


def checked_sizes(
    limits: Sequence[Accepted], batches: Sequence[int], lengths: Sequence[int], example: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The batch sizes and lengths (of the first input, at batch 2) among those asked that the
    graph takes; the ``example`` batch size where it takes none of those asked (and some were).
    """
    batch = [a for a in limits if a.axis == 0]  # (several inputs share the batch)
    kept = tuple(b for b in batches if all(a.takes(b) for a in batch))
    kept = kept or (example,) * bool(batches)  # none asked (a sampling graph): none checked
    length = next((a for a in limits if a.index == 0 and a.axis == 1), None)
    at_two = all(a.takes(2) for a in batch)  # the lengths are checked at batch 2
    lengths = [n for n in lengths if at_two and (length is None or length.takes(n))]
    return kept, tuple(lengths)


def report(limits: Sequence[Accepted], names: Sequence[str]) -> tuple[dict, str]:
    """What ``limits`` say, as the file's metadata (``{input: {axis: [low, high]}}``) and as a
    warning's text that names each dimension, the sizes it takes and why."""
    meta: dict[str, dict[str, list[int]]] = {}
    said = []
    for a in limits:
        name = names[a.index] if a.index < len(names) else f"input {a.index}"
        meta.setdefault(name, {})[str(a.axis)] = [a.low, a.high]
        sizes = f"fixed at {a.low}" if a.low == a.high else f"only from {a.low} to {a.high}"
        said.append(
            f"dimension {a.axis} of {name!r} ({axis_name(a.axis)}) {sizes}, not dynamic from "
            f"{a.asked[0]} to {a.asked[1]} ({a.why})"
        )
    text = "compressdrop: the exported graph takes fewer input sizes than asked, and is checked "
    text += "only at those: " + "; ".join(said)
    return meta, text + "; recorded in the file's metadata 'input_dims'"
