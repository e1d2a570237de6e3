"""Several gates of one family computed as one: the model's KL and the per-step terms.

A gated model's training step has a fixed cost per gate: each gate's per-unit terms, its KL, the
KL's backward pass, every one a few dozen tensor operations on a few hundred numbers. On a small
net that cost is most of what the gates add (a gated ViT of 8 gates ran about 1,500 more ATen
calls a step than the plain one). Here the gates of one family that agree on device, dtype and
settings are concatenated: their KL is one computation and one backward pass, and a family whose
draw shares terms with its KL (log-normal) computes those terms once for all of its gates, before
the forward pass (``prime``, called by the root's forward pre-hook that :func:`~compressdrop.attach`
registers), handing each gate its slice. The draws too: the first gate of a bank to sample in a
forward pass draws θ for every gate of the bank at once (one uniform or normal tensor, one autograd
node) and each gate takes its columns.

Each gate's columns are an independent draw from its own posterior, as before; only the order in
which the random stream is consumed changes. A gate takes its columns at most once per pass (a
gate called twice, a layer applied twice, draws afresh the second time), only while its
parameters are those the bank drew with and only until a backward pass has gone through the
bank's draw; otherwise it draws on its own.

A family opts in by naming, on its own class (a subclass inherits nothing), ``_bank_params``: its
per-unit parameters, concatenated in this order. Gates are concatenated when they also agree on
device, dtype and every scalar setting (their public attributes that are numbers, strings or
tuples). By default the bank's draw and KL are the class's own ``sample`` and ``kl_per_unit``
called on a stand-in gate holding the concatenated parameters and the first gate's settings, so
those two must depend on nothing else. A family may instead define (classmethods):

* ``_bank_kl_per_unit(gates, params)``: the per-unit KL of the concatenation;
* ``_bank_sample(gates, batch)``: θ of shape ``(batch, Σ units)``, the gates' columns in order;
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
    """Compute every gate on its own inside this context, as under ``torch.compile``.

    The same values in distribution; the random stream is consumed gate by gate in the order the
    gates sample, so a compiled step (``aot_eager``) and an eager one inside ``off()`` draw the
    same noise from the same seed, which a step with banks does not.
    """
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
    new.__dict__.update(num_units=sum(g.num_units for g in bank), _cache=None, _bank_slot=None)
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


class _Draws:
    """One forward pass's draws for a bank: per batch size, one θ for every gate, in columns."""

    __slots__ = ("__weakref__", "bank", "keys", "sizes", "slices", "spent", "taken")

    def __init__(self, bank: list[Gate]) -> None:
        self.bank = [weakref.ref(g) for g in bank]  # the gates hold this object, not it them
        self.keys = [g._cache_key() for g in bank]
        self.sizes = [g.num_units for g in bank]
        self.slices: dict[int, tuple[torch.Tensor, ...]] = {}
        self.taken: dict[int, set[int]] = {}
        self.spent = False

    def take(self, gate: Gate, index: int, batch: int) -> torch.Tensor | None:
        """Gate ``index``'s columns of the bank's draw for ``batch`` rows, or ``None`` if it must
        draw on its own (see the module docstring)."""
        taken = self.taken.setdefault(batch, set())
        if self.spent or index in taken or gate._cache_key() != self.keys[index]:
            return None
        if batch not in self.slices:
            bank = [g for r in self.bank if (g := r()) is not None]
            if len(bank) < len(self.bank):
                return None
            cls = type(gate)
            custom = getattr(cls, "_bank_sample", None)
            theta = (
                custom(bank, batch) if custom else cls.sample(_stand_in(bank, concat(bank)), batch)
            )
            if theta.requires_grad:
                me = weakref.ref(self)

                def spend(grad: torch.Tensor) -> None:
                    # the draw's graph is freed by this backward pass: later takes draw afresh
                    draws = me()
                    if draws is not None:
                        draws.spent = True

                theta.register_hook(spend)
            self.slices[batch] = theta.split(self.sizes, dim=1)
        taken.add(index)
        return self.slices[batch][index]


def prime(gates: Iterable[Gate]) -> None:
    """Start a forward pass: each bank computes its per-step terms once for all its gates (where
    its family shares them) and offers its gates one draw for all (where its family can)."""
    if torch.compiler.is_compiling():
        return
    banks, single = _banks(gates)
    for g in single:
        g._bank_slot = None
    for bank in banks:
        cls = type(bank[0])
        seed = getattr(cls, "_bank_prime", None)
        if seed is not None:
            seed(bank)
        draws = _Draws(bank)
        for i, g in enumerate(bank):
            g._bank_slot = (draws, i)
