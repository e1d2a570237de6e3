"""Gates: per-unit multiplicative noise layers with a KL term and a signal-to-noise ratio.

Families (``GATES`` maps their names to classes):

* ``"lognormal"`` — :class:`LogNormalGate`, Structured Bayesian Pruning (Neklyudov et al. 2017);
* ``"variational"`` — :class:`VariationalGate`, Gaussian noise with a log-uniform prior
  (Kingma et al. 2015; Molchanov et al. 2017; Louizos et al. 2017);
* ``"concrete"`` — :class:`ConcreteGate`, concrete dropout (Gal et al. 2017);
* ``"hardconcrete"`` — :class:`HardConcreteGate`, L0 gates (Louizos et al. 2018).
"""

from ..errors import InputError
from ._mul import hand_overs_off
from .base import Gate, noise_shard
from .concrete import ConcreteGate, HardConcreteGate
from .lognormal import LogNormalGate
from .options import check_gate_kwargs, gate_kwargs_problem, gate_parameters
from .variational import VariationalGate

__all__ = [
    "GATES",
    "ConcreteGate",
    "Gate",
    "HardConcreteGate",
    "LogNormalGate",
    "VariationalGate",
    "check_gate_kwargs",
    "gate_class",
    "gate_kwargs_problem",
    "gate_parameters",
    "hand_overs_off",
    "noise_shard",
]

GATES: dict[str, type[Gate]] = {
    cls.family: cls for cls in (LogNormalGate, VariationalGate, ConcreteGate, HardConcreteGate)
}


def gate_class(name: str) -> type[Gate]:
    """The gate class of a family name.

    Args:
        name: a key of :data:`GATES`: ``"lognormal"``, ``"variational"``, ``"concrete"`` or
            ``"hardconcrete"``.

    Raises:
        InputError: an unknown name (the message lists the families).

    Example:
        >>> gate_class("lognormal")
        <class 'compressdrop.gates.lognormal.LogNormalGate'>
    """
    try:
        return GATES[name]
    except KeyError:
        raise InputError(f"unknown gate family {name!r}; choose one of {sorted(GATES)}") from None
