"""Several gates of one family computed as one: the model's KL and the per-step terms.

A gated model's training step has a fixed cost per gate: each gate's per-unit terms, its KL, the
KL's backward pass, every one a few dozen tensor operations on a few hundred numbers. On a small
net that cost is most of what the gates add (a gated ViT of 8 gates ran about 1,500 more ATen
calls a step than the plain one). Here the gates of one family that agree on device, dtype and
settings are concatenated: their KL is one computation and one backward pass, and a family whose
draw shares terms with its KL (log-normal) computes those terms once for all of its gates, before
the forward pass (``prime``, called by the root's forward pre-hook that :func:`~compressdrop.attach`
registers), handing each gate its slice.

The draws stay with each gate, in its own autograd node from its own slice of the random stream.
One draw for a whole bank was built and measured (the tiny ViT's step ratio 1.28 → 1.17 beyond
what this module gives) and taken out again: under activation checkpointing
(``torch.utils.checkpoint``) a segment's recomputation restores the random stream and must draw
the same θ, which a draw made outside the segment cannot give (the non-reentrant variant raised
``CheckpointError``, the reentrant one silently took its gradient from another sample).
``tests/test_gate_bank.py`` checks both variants.

A family opts in by naming, on its own class (a subclass inherits nothing), ``_bank_params``: its
per-unit parameters, concatenated in this order. Gates are concatenated when they also agree on
device, dtype and every scalar setting (their public attributes that are numbers, strings or
tuples). By default the bank's KL is the class's own ``kl_per_unit`` called on a stand-in gate
holding the concatenated parameters and the first gate's settings, so it must depend on nothing
else. A family may instead define (classmethods):

* ``_bank_kl_per_unit(gates, params)``: the per-unit KL of the concatenation;
* ``_bank_prime(gates)``: seed each gate's per-step terms before the forward pass.

The results equal the per-gate ones (each is an element-wise computation over the units); the
sum's order differs, so the KL can differ in the last bits of float32. Nothing is banked under
``torch.compile`` (the compiler fuses the per-gate code itself) or for parameters swapped in by
``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .base import Gate

__all__: list[str] = []  # internal: compressdrop.kl and attach's pre-hook use it

_OFF = [0]  # open off() contexts
# per bank (keyed by its first gate): (key, weak refs to the gates' parameters, {name: value})
_SHARED: weakref.WeakKeyDictionary[Gate, tuple[tuple, list, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Compute every gate on its own inside this context, as under ``torch.compile``: the same
    values (the KL to float rounding), for measuring what the banks save."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def _banks(gates: Iterable[Gate]) -> tuple[list[list[Gate]], list[Gate]]:
    """The gates in banks of two or more (same class, device, dtype and settings), and the rest."""
    banks: dict[tuple, list[Gate]] = {}
    single: list[Gate] = []
    if _OFF[0]:
        return [], list(gates)
    for g in gates:
        cls = type(g)
        names = cls.__dict__.get("_bank_params")
        if names is None or g._cache_key() is None:
            single.append(g)
            continue
        p = getattr(g, names[0])
        banks.setdefault((cls, p.device, p.dtype, settings(g)), []).append(g)
    out = []
    for bank in banks.values():
        if len(bank) > 1:
            out.append(bank)
        else:
            single.extend(bank)
    return out, single


def settings(gate: Gate) -> tuple:
    """The scalar settings two gates of one class must share to be concatenated."""
    skip = {"training", "shared", "num_units"}
    return tuple(
        sorted(
            (k, v)
            for k, v in vars(gate).items()
            if not k.startswith("_") and k not in skip and isinstance(v, (int, float, str, tuple))
        )
    )


def _stand_in(bank: Sequence[Gate], params: list[torch.Tensor]) -> Gate:
    """A gate over all the bank's units: the first gate's settings, the concatenated parameters
    (plain tensors, so nothing is cached on it)."""
    first = bank[0]
    new = object.__new__(type(first))
    new.__dict__.update(first.__dict__)
    names = type(first)._bank_params  # type: ignore[attr-defined]
    new.__dict__["_parameters"] = dict(zip(names, params, strict=True))
    new.__dict__.update(num_units=sum(g.num_units for g in bank), _cache=None)
    return new


def shared(bank: Sequence[Gate], name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for the bank, reused while every gate's parameters are unchanged (the rules
    of :meth:`Gate._memo <compressdrop.gates.Gate>`: same objects, versions, dtype, device and
    grad mode)."""
    params = [p for g in bank for p in g._parameters.values()]
    key = (tuple(id(g) for g in bank), tuple(g._cache_key() for g in bank))
    entry = _SHARED.get(bank[0])
    if entry is not None:
        old_key, refs, values = entry
        same = old_key == key and all(r() is p for r, p in zip(refs, params, strict=True))
        if same and name in values:
            return values[name]
        if not same:
            entry = None
    if entry is None:
        entry = (key, [weakref.ref(p) for p in params], {})
        _SHARED[bank[0]] = entry
    value = compute()
    entry[2][name] = value
    return value


def concat(bank: Sequence[Gate]) -> list[torch.Tensor]:
    """The bank's parameters, each name's tensors concatenated (differentiable)."""
    names = type(bank[0])._bank_params  # type: ignore[attr-defined]
    return [torch.cat([getattr(g, n) for g in bank]) for n in names]


def kl_sum(gates: list[Gate]) -> torch.Tensor:
    """Σ over ``gates`` of their ``kl()``, each bank computed as one (see the module docstring)."""
    if torch.compiler.is_compiling():
        return torch.stack([g.kl() for g in gates]).sum()
    banks, single = _banks(gates)
    terms = [g.kl() for g in single]
    for bank in banks:
        cls, params = type(bank[0]), concat(bank)
        custom = getattr(cls, "_bank_kl_per_unit", None)
        per_unit = custom(bank, params) if custom else cls.kl_per_unit(_stand_in(bank, params))
        cost = torch.cat([g.unit_cost for g in bank]).to(per_unit.dtype)
        terms.append(torch.dot(cost, per_unit))
    return torch.stack(terms).sum()


def prime(gates: Iterable[Gate]) -> None:
    """Start a forward pass: each bank whose family shares per-step terms between its draw and its
    KL computes them once for all its gates."""
    if torch.compiler.is_compiling():
        return
    for bank in _banks(gates)[0]:
        seed = getattr(type(bank[0]), "_bank_prime", None)
        if seed is not None:
            seed(bank)
