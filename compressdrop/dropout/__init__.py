"""The dropout family, and recurrent dropout for LSTM and GRU.

Layers: Bernoulli, DropConnect, Gaussian, Standout, fast, spatial, Cutout and Max-Drop; recurrent
schemes: Zaremba, RNNDrop, Semeniuta and Gal.
"""

from .gru import GRU
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
from .recurrent import LSTM, SCHEMES, RecurrentDropout

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
