"""``import torchvision`` where its compiled ops do not load, for the libraries that import it.

A torchvision wheel built for another torch (the CUDA build beside a CPU torch, as pip resolves
``torchvision`` next to ``torch==2.13.0`` on this project's machines) cannot load its compiled ops
(``torchvision/_C.so``). torchvision tolerates that, except that its import then registers fake
kernels for two ops nobody defined and fails (``operator torchvision::nms does not exist``).
Hugging Face transformers imports torchvision when it is installed, so every model class it
resolves failed with it ("Could not import module 'GPT2LMHeadModel'"). :func:`import_torchvision`
declares those two op schemas (no kernel: calling them raises) and imports torchvision again;
its model definitions are plain Python and need none of the compiled ops (detection's NMS and
RoI pooling do). Where torchvision is missing or imports cleanly, nothing is declared.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch

__all__ = ["import_torchvision"]  # public as compressdrop.import_torchvision

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
T = TypeVar("T")
_BROKEN = "torchvision::nms does not exist"  # what importing a mismatched build raises
_LIB: list[torch.library.Library] = []  # kept alive: dropping a Library removes its definitions


def import_torchvision() -> ModuleType | None:
    """torchvision, imported (the two op schemas declared first if its ``_C`` failed); ``None``
    where it is not installed.

    compressdrop calls it wherever it imports torchvision (a ``--arch torchvision.models:...``
    factory, a pickled torchvision model, transformers, Lightning); call it in your own script
    before ``import torchvision`` where that fails with "operator torchvision::nms does not
    exist". Detection ops (NMS, RoI pooling) still need a torchvision built for your torch.
    """
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if _BROKEN not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIB.append(lib)
    return importlib.import_module("torchvision")


def retry_with_torchvision(load: Callable[[], T]) -> T:
    """``load()``, run again after :func:`import_torchvision` if it failed on importing a
    torchvision whose compiled ops do not load (a factory from ``torchvision.models``, a pickled
    torchvision model, a factory of the user's that builds a transformers model: transformers
    raises that failure as the cause of a ``ModuleNotFoundError``)."""
    try:
        return load()
    except Exception as e:  # any type: only torchvision's failure, in its chain, is retried
        if not _broken_torchvision(e):
            raise
    import_torchvision()
    return load()


def _broken_torchvision(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is torchvision's failed import."""
    for _ in range(16):
        if e is None:
            return False
        if isinstance(e, RuntimeError) and _BROKEN in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
