"""The plain-data records compressdrop keeps on a model: ``arch`` (how to rebuild it),
``prune_report``, ``compressdrop_meta``, ``compressdrop_report``, ``input_shape``.

torch types ``nn.Module.__setattr__`` as taking tensors and modules only, which is wrong for plain
attributes (they go to the instance dict like on any object); :func:`set_record` is the one typed
place that sets them, so the rest of the package needs no ``type: ignore`` for it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["set_record"]


def set_record(model: nn.Module, name: str, value: Any) -> None:
    """Set the plain attribute ``name`` of ``model`` to ``value``."""
    setattr(model, name, value)
