"""What a gate family's constructor accepts: the ``gate_kwargs`` of :func:`compressdrop.attach`
and a recipe's ``gates.kwargs``, checked before any model is traced or trained.

The accepted names are the family's constructor parameters after ``num_units``; a value is checked
against the parameter's annotation (a number, true/false, a string) and then by building one gate
of the family with every argument given, so that the constructor's own range checks speak.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError
from .base import Gate

__all__ = ["check_gate_kwargs", "gate_kwargs_problem", "gate_parameters"]

# what a failed constructor raises for a value of the right type but the wrong range or kind
_BUILD_ERRORS = (InputError, TypeError, ValueError, ArithmeticError)


def gate_parameters(cls: type[Gate]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a gate family takes beyond ``num_units``, by name, in order.

    Example:
        >>> list(gate_parameters(compressdrop.gates.HardConcreteGate))
        ['init_drop', 'penalty', 'noise']
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, num_units
    return {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _accepted(cls: type[Gate]) -> str:
    """The family's arguments with their defaults, in words: ``init_drop=0.5, penalty=10.0``."""
    return ", ".join(f"{n}={p.default!r}" for n, p in gate_parameters(cls).items())


def gate_kwargs_problem(cls: type[Gate], kwargs: Mapping[Any, Any]) -> tuple[str, str] | None:
    """What is wrong with ``kwargs`` for a gate of ``cls``, or ``None`` if nothing.

    Returns:
        ``(name, message)``: the argument at fault (``""`` when the arguments only fail together)
        and why, the family's accepted arguments included.
    """
    params = gate_parameters(cls)
    takes_any = any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()
    )
    family = f"({cls.family} gates accept {_accepted(cls) or 'no arguments'})"
    for name in kwargs:
        if name not in params and not takes_any:
            return str(name), f"unknown argument {family}"
    hints = typing.get_type_hints(cls.__init__)
    for name, value in kwargs.items():
        expected = _type_problem(hints.get(name), value)
        if expected is not None:
            return name, f"expected {expected}, got {value!r} {family}"
    error = _build_error(cls, kwargs)
    if error is None:
        return None
    # the argument at fault: the one that fails alone, else the one the message names first
    alone = [n for n in kwargs if _build_error(cls, {n: kwargs[n]}) is not None]
    where = {n: m.start() for n in kwargs if (m := re.search(rf"\b{re.escape(n)}\b", error))}
    named = sorted(where, key=where.__getitem__)
    culprit = (alone or named or [""])[0]
    return culprit, f"{error} {family}"


def check_gate_kwargs(cls: type[Gate], kwargs: Mapping[Any, Any] | None) -> dict[str, Any]:
    """``kwargs`` as a plain dict, checked for a gate of ``cls`` (see :func:`gate_kwargs_problem`).

    Raises:
        InputError: an argument the family does not take, or a value its constructor refuses;
            the message starts ``gate_kwargs['name']``.
    """
    out = dict(kwargs or {})
    problem = gate_kwargs_problem(cls, out)
    if problem is not None:
        name, message = problem
        raise InputError(f"gate_kwargs{f'[{name!r}]' if name else ''}: {message}")
    return out


def _type_problem(hint: Any, value: Any) -> str | None:
    """What ``value`` should have been for a parameter annotated ``hint`` (``None``: it fits, or
    the annotation is not one checked here)."""
    if hint is bool:
        return None if isinstance(value, bool) else "true/false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _build_error(cls: type[Gate], kwargs: Mapping[Any, Any]) -> str | None:
    """Why a gate of two units with ``kwargs`` cannot be built (``None``: it can). The global
    random state is left as it was (constructors draw their initial values)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            cls(2, **kwargs)
        except _BUILD_ERRORS as e:
            return str(e)
    return None
