"""The shapes a program's inputs may have: the sizes its export fixed, and the range of each size
it left dynamic. :func:`program_to_module <.convert.program_to_module>` drops torch's guards
(their code is built from strings in the file), and with them torch's input check; this one is
rebuilt from the graph's numbers only, so that an input of another shape is named before the
call, not met deep in the graph as ``shape '[-1, 9]' is invalid for input of size 24``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import InputError

__all__: list[str] = []  # internal: convert.py records the specs and registers the check

#: one input's sizes: a fixed size, or the (lower, upper) bounds of a dynamic one (``None``: not
#: bounded, or an expression of other sizes, not checked)
Dims = tuple[int | tuple[int | None, int | None], ...]


def input_dims(graph: fx.Graph, ranges: dict[Any, Any]) -> tuple[Dims | None, ...]:
    """Per placeholder of ``graph`` (the program's user inputs, in order), its sizes, or ``None``
    for an input that is not a tensor. ``ranges``: the program's ``range_constraints``."""
    specs: list[Dims | None] = []
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dims: list[int | tuple[int | None, int | None]] = []
        for size in val.shape:
            if isinstance(size, int):
                dims.append(size)
                continue
            found = ranges.get(size.node.expr)
            lower, upper = getattr(found, "lower", None), getattr(found, "upper", None)
            dims.append((_finite(lower), _finite(upper)))
        specs.append(tuple(dims))
    return tuple(specs)


def _finite(bound: Any) -> int | None:
    """A range's bound as an int, or ``None`` where it is absent or not an integer (torch's
    ``int_oo``, whose ``is_finite`` is not False)."""
    if isinstance(bound, int) or getattr(bound, "is_Integer", False) is True:
        return int(bound)
    return None


def check_inputs(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook: refuse tensors whose shapes the program cannot take.

    Raises:
        InputError: an input of another rank, a fixed size that differs (but for the batch size:
            a program exported at one runs at others once ``load_program`` has checked that its
            graph does not depend on it), or a dynamic size out of its exported range (a lower
            bound of 2 or less is not checked: torch exports batch dimensions from 2 and the
            programs run at 1).
    """
    specs = vars(module).get("program_inputs")
    if not specs:
        return
    for i, (x, dims) in enumerate(zip(args, specs)):
        if dims is None or not isinstance(x, torch.Tensor):
            continue
        if not all(isinstance(s, int) for s in x.shape):
            return  # traced (torch.export, compile): the tracer checks the shapes itself
        problem = _misfit(tuple(x.shape), dims)
        if problem is None:
            continue
        fixed_length = len(dims) == 2 and isinstance(dims[1], int) and not x.is_floating_point()
        advice = (
            " (a token model's length is fixed unless it was exported with check_lengths=..., "
            "as compressdrop export does)"
            if fixed_length and problem.startswith("dimension 1 ")
            else ""
        )
        raise InputError(
            f"input {i} has shape {tuple(x.shape)}, and this program takes {_shape(dims)}: "
            f"{problem}{advice}"
        )


def _misfit(shape: tuple[int, ...], dims: Dims) -> str | None:
    """What about ``shape`` the program's ``dims`` do not allow, or ``None``."""
    if len(shape) != len(dims):
        return f"{len(shape)} dimensions where it has {len(dims)}"
    for d, (size, want) in enumerate(zip(shape, dims)):
        if isinstance(want, int):
            if size != want and d > 0:  # a fixed batch size: load_program checked it is free
                return f"dimension {d} is {size}, fixed at {want} when it was exported"
            continue
        lower, upper = want
        if (lower is not None and lower > 2 and size < lower) or (
            upper is not None and size > upper
        ):
            return f"dimension {d} is {size}, outside its exported range {lower} to {upper}"
    return None


def _shape(dims: Dims) -> str:
    """``(N, 9)``-style: fixed sizes as numbers, dynamic ones as their range, the batch size and
    unbounded ones as ``N``."""

    def one(d: int, size: int | tuple[int | None, int | None]) -> str:
        if isinstance(size, int):
            return "N" if d == 0 else str(size)
        lower, upper = size
        return "N" if upper is None else f"{lower or 0}..{upper}"

    return f"({', '.join(one(d, size) for d, size in enumerate(dims))})"
