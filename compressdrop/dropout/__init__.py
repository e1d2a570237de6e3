"""The dropout family: Bernoulli, DropConnect, Gaussian, Standout, fast, spatial, Cutout, Max-Drop."""

from .layers import (
    BernoulliDropout,
    Cutout,
    DropConnect,
    FastDropout,
    GaussianDropout,
    MaxDrop,
    SpatialDropout,
    Standout,
)

__all__ = [
    "BernoulliDropout",
    "Cutout",
    "DropConnect",
    "FastDropout",
    "GaussianDropout",
    "MaxDrop",
    "SpatialDropout",
    "Standout",
]
