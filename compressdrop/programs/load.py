"""Loading a checked ``torch.export`` archive: :func:`load_program_safely`.

It runs :func:`~.safety.check_pt2_archive`, registers the container types a Hugging Face
program's inputs and outputs name (transformers registers its ``ModelOutput`` classes with torch's
pytree when ``transformers.modeling_outputs`` is imported, and ``torch.export.load`` rebuilds
only registered types), then loads the program with torch's own logging of a failed attempt
kept off the terminal, and drops the file's guard code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ._checked import check_enum_arguments
from ._limits import _walk
from ._source import Source, read_source
from .safety import _MALFORMED, _NAME, check_pt2_archive

__all__ = ["load_program_safely"]


def load_program_safely(
    src: Source | bytes, where: str | None = None, *, any_operator: bool = False
) -> torch.export.ExportedProgram:
    """:func:`check_pt2_archive`, then ``torch.export.load`` with the guards dropped.

    Args:
        src: a path, an open binary file or the archive's bytes.
        where: the name for messages (default: the path).
        any_operator: take operators off the allowlist (see :func:`check_pt2_archive`).

    Returns:
        The program, with its ``guards_code`` (Python source from the file) emptied.

    Raises:
        CheckpointError: the archive cannot be read, is refused by :func:`check_pt2_archive`, or
            ``torch.export.load`` fails on it.
    """
    data, where = read_source(src, where)
    check_pt2_archive(data, where, any_operator=any_operator)
    _register_spec_types(data, where)
    logger, caught = logging.getLogger("torch.export"), _Caught()
    logger.addHandler(caught)
    propagate, logger.propagate = logger.propagate, False  # torch logs a traceback, then retries
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # torch raises many types on a damaged archive
        cause = caught.first or e  # the first format's error, not the fallback's
        raise CheckpointError(
            f"{where}: not a readable torch.export program: {type(cause).__name__}: {cause}"
        ) from None
    finally:
        logger.removeHandler(caught)
        logger.propagate = propagate
    program._guards_code = []  # Python source from the file; it only re-checks input shapes
    check_enum_arguments(program.graph_module, where)  # before anything runs its graph
    return program


class _Caught(logging.Handler):
    """The first exception torch.export logs while loading (it logs the archive's error and
    tries the format of PyTorch 2.7, whose error says only that it failed)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.first: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            self.first = record.exc_info[1]


def _spec_types(data: bytes) -> set[str]:
    """The container types the programs' input and output trees name (their pytree specs)."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    types: set[str] = set()

    def collect(spec: Any) -> None:
        if isinstance(spec, dict):
            if isinstance(spec.get("type"), str):
                types.add(spec["type"])
            for child in spec.get("children_spec") or []:
                collect(child)
        elif isinstance(spec, list):
            for child in spec:
                collect(child)

    for r in reader.get_all_records():
        if re.fullmatch(f"models/{_NAME}\\.json", r):
            for key, value in _walk(json.loads(reader.get_record(r))):
                if key in ("in_spec", "out_spec") and isinstance(value, str):
                    collect(json.loads(value))
    return types


def _register_spec_types(data: bytes, where: str) -> None:
    """A Hugging Face model's program returns a ``ModelOutput``, which torch rebuilds only if
    the class is registered with its pytree: transformers registers its output classes when
    ``transformers.modeling_outputs`` is imported, which is done here for such a program (that
    library module, whatever else the file names). A type still unknown is a clear error."""
    from torch.utils import _pytree

    try:
        unknown = _spec_types(data) - set(_pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)
    except _MALFORMED + (RuntimeError,):
        return  # torch.export.load names what is wrong
    if any(t.startswith("transformers.") for t in unknown):
        from .._torchvision import import_torchvision

        import_torchvision()  # transformers imports it when installed: a mismatched build must load
        with contextlib.suppress(ImportError):
            import transformers.modeling_outputs  # noqa: F401 (registers the output classes)
        unknown -= set(_pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)
    if unknown:
        raise CheckpointError(
            f"{where}: its inputs or outputs are of types this process does not know "
            f"({', '.join(sorted(unknown)[:3])}): import the module that defines them "
            "(for transformers' own, pip install 'compressdrop[hf]') and load it from Python"
        )
