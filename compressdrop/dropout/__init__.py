"""The dropout family: Bernoulli, DropConnect, Gaussian, Standout, fast, spatial, Cutout, Max-Drop,
and recurrent dropout (Zaremba, RNNDrop, Semeniuta, Gal) for LSTM and GRU."""

from .layers import (
    BernoulliDropout,
    Cutout,
    DropConnect,
    FastDropout,
    GaussianDropout,
    MaxDrop,
    SpatialDropout,
    Standout,
    StochasticLayer,
)
from .recurrent import GRU, LSTM, SCHEMES, RecurrentDropout

__all__ = [
    "GRU",
    "LSTM",
    "SCHEMES",
    "BernoulliDropout",
    "Cutout",
    "DropConnect",
    "FastDropout",
    "GaussianDropout",
    "MaxDrop",
    "RecurrentDropout",
    "SpatialDropout",
    "Standout",
    "StochasticLayer",
]
