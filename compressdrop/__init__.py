"""compressdrop: make neural networks smaller and faster with Bayesian dropout.

Lifecycle::

    attach(model, gate="lognormal")           # gates on every prunable unit group
    loss = nll + beta * kl(model) / n_train   # train as usual
    slim = prune(model)                       # a plain, smaller nn.Module, exact to rounding
    export_onnx(slim, x, "slim.onnx")         # verified in onnxruntime

``import compressdrop`` stays light: onnx, onnxruntime, matplotlib and click load on first use.
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .arch import add_safe_factories
from .errors import CompressDropError
from .gates import GATES, ConcreteGate, Gate, HardConcreteGate, LogNormalGate, VariationalGate
from .gating import GatingWarning, attach, detach, is_gated, kl, named_gates

__all__ = [
    "GATES",
    "CompressDropError",
    "ConcreteGate",
    "ExportWarning",
    "Gate",
    "GatingWarning",
    "HardConcreteGate",
    "LogNormalGate",
    "PrecisionWarning",
    "PruningWarning",
    "VariationalGate",
    "__version__",
    "add_safe_factories",
    "attach",
    "detach",
    "export_mc_onnx",
    "export_onnx",
    "export_program",
    "import_torchvision",
    "is_gated",
    "keep_noise",
    "kl",
    "load_model",
    "mask_",
    "mc_evaluate",
    "mc_predict",
    "named_gates",
    "prune",
    "save_model",
    "size",
]

# name -> module that defines it, imported on first attribute access
_LAZY = {
    "prune": "compressdrop.pruning",
    "mask_": "compressdrop.pruning",
    "PruneReport": "compressdrop.pruning",
    "PruningWarning": "compressdrop.pruning",
    "PrecisionWarning": "compressdrop.workflows",
    "keep_noise": "compressdrop.uncertainty",
    "ExportWarning": "compressdrop.export",
    "export_onnx": "compressdrop.export",
    "export_program": "compressdrop.export",
    "export_mc_onnx": "compressdrop.uncertainty",
    "mc_predict": "compressdrop.uncertainty",
    "mc_evaluate": "compressdrop.uncertainty",
    "size": "compressdrop.evaluation",
    "load_model": "compressdrop.checkpoint",
    "save_model": "compressdrop.checkpoint",
    "import_torchvision": "compressdrop._torchvision",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compressdrop' has no attribute {name!r}")
