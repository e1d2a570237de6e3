"""compressdrop's model files: safe to load, and rebuildable without pickled code.

A checkpoint is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors), so it
loads with ``torch.load(weights_only=True)``. It records how to rebuild the structure:

* ``arch``: a built-in reference net (``{"name", "input_shape", "num_classes", "kwargs"}``) or a
  user factory (``{"factory": "package.module:function", ...}``);
* ``attach``: for a gated model, the arguments of ``attach`` (re-attached on the fresh net);
* ``prune_history``: for a slim model, Torch-Pruning's pruning history (replayed on the fresh net);

plus the ``state_dict``, the recipe that made it and free-form ``meta``. Other files are accepted
with care: a bare ``state_dict`` needs ``arch``; a whole pickled module needs ``trust_pickle=True``,
because unpickling runs arbitrary code.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write
from ._version import __version__
from .gating import attach, is_gated
from .gating.gated import _STATE, attach_config

__all__ = [
    "CheckpointError",
    "build_arch",
    "describe_arch",
    "load_checkpoint",
    "load_model",
    "save_model",
]

FORMAT = "compressdrop-model"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message says why and what to do."""


def describe_arch(model: nn.Module) -> dict[str, Any]:
    """The ``arch`` record of a model (compressdrop reference nets and user factories carry one)."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        raise CheckpointError(
            "the model has no `arch` record, so its structure could not be rebuilt without pickled "
            "code; build it with compressdrop.models.build_model, or set model.arch = "
            "{'factory': 'package.module:function', 'input_shape': [...], 'num_classes': N, 'kwargs': {}}"
        )
    return dict(arch)


def build_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Build a fresh (dense, untrained) model from an ``arch`` record."""
    from .models import build_model

    arch = dict(arch)
    kwargs = dict(arch.get("kwargs") or {})
    if "factory" in arch:
        spec = str(arch["factory"])
        module_name, _, fn_name = spec.partition(":")
        if not fn_name:
            raise CheckpointError(f"arch factory {spec!r} must look like 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise CheckpointError(f"cannot import arch factory {spec!r}: {e}") from None
        if "input_shape" in arch:
            kwargs.setdefault("input_shape", tuple(arch["input_shape"]))
        if "num_classes" in arch:
            kwargs.setdefault("num_classes", int(arch["num_classes"]))
        model = fn(**kwargs)
        # keep what the factory recorded (input shape, classes) unless the record says otherwise
        own = dict(getattr(model, "arch", None) or {})
        own.pop("name", None)
        model.arch = {**own, **arch, "kwargs": dict(arch.get("kwargs") or {})}
        return model
    if "name" not in arch:
        raise CheckpointError(f"arch record {arch!r} names neither a reference net nor a factory")
    return build_model(
        arch["name"],
        input_shape=tuple(arch["input_shape"]),
        num_classes=int(arch["num_classes"]),
        **kwargs,
    )


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    recipe: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (dense, gated or slim) as a compressdrop checkpoint, atomically."""
    report = getattr(model, "prune_report", None)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "compressdrop_version": __version__,
        "arch": describe_arch(model),
        "kind": "gated" if is_gated(model) else "slim" if report is not None else "dense",
        "recipe": dict(recipe) if recipe is not None else None,
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if payload["kind"] == "gated":
        payload["attach"] = attach_config(model)
        payload["input_shape"] = [list(s) for s in getattr(model, _STATE)["input_shape"]]
    if report is not None:
        payload["prune_report"] = report.to_dict()
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


# torch.save writes a zip archive; files from torch < 1.6 (or _use_new_zipfile_serialization=False)
# start with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1 of 10 bytes).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` with the safety rules: weights only unless ``trust_pickle``; clear errors.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch file, is corrupt or truncated, or
            holds pickled objects (refused unless ``trust_pickle``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): it starts with neither "
            "a zip header nor the legacy torch.save magic number"
        )
    try:
        with warnings.catch_warnings():
            # a damaged pickle stream makes torch warn about odd protocol numbers before failing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler says "Unsupported global" when the stream is well formed but
        # names a class or function; every other failure of it means a damaged stream.
        if not trust_pickle and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: the file holds pickled Python objects (for example a whole nn.Module "
                "saved with torch.save(model)); loading it would run arbitrary code, so it was "
                "refused. If you trust its source, pass trust_pickle=True (CLI: --trust-pickle); "
                "better, save a compressdrop checkpoint or a state_dict."
            ) from None
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({_first_line(e)})"
        ) from None
    except Exception as e:
        # With weights_only=True no code from the file runs, so any other exception comes from a
        # damaged stream (torch's unpickler raises IndexError, KeyError, UnicodeDecodeError, ...).
        # With trust_pickle the file's own code may raise anything: the message says which.
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (corrupt or truncated?): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def load_model(
    path: str | Path,
    *,
    arch: Mapping[str, Any] | str | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a model file and return the model (in eval mode, on the CPU).

    Args:
        path: a compressdrop checkpoint, a ``state_dict`` (needs ``arch``), or, only with
            ``trust_pickle``, a whole pickled ``nn.Module``.
        arch: for a bare state_dict: an ``arch`` record, or ``"package.module:function"``.
        trust_pickle: allow unpickling arbitrary objects (runs code from the file).
    """
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return _from_payload(obj, path).eval()
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise CheckpointError(
                f"{path}: a bare state_dict holds weights but not the structure; pass the "
                "architecture (CLI: --arch package.module:factory)"
            )
        record = {"factory": arch} if isinstance(arch, str) else dict(arch)
        model = build_arch(record)
        _load_state(model, obj, path)
        return model.eval()
    raise CheckpointError(f"{path}: not a compressdrop checkpoint, state_dict or nn.Module")


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {e}") from None


def _from_payload(payload: Mapping[str, Any], path: Any) -> nn.Module:
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported (expected {FORMAT_VERSION})"
        )
    model = build_arch(payload["arch"])
    kind = payload.get("kind")
    if kind == "gated":
        cfg = payload["attach"]
        example = tuple(torch.randn(2, *s) for s in payload["input_shape"])
        attach(
            model,
            cfg["gate"],
            cfg["granularity"],
            cfg["include"] or None,
            cfg["exclude"] or None,
            example_inputs=example,
            gate_kwargs=cfg["gate_kwargs"],
            kl_cost=cfg["kl_cost"],
        )
    elif kind == "slim":
        from .pruning import PruneReport, replay
        from .pruning.prune import LayerReport

        rep = payload["prune_report"]
        replay(model, rep["history"])
        model.prune_report = PruneReport(
            rep["family"],
            rep["threshold"],
            [LayerReport(**layer) for layer in rep["layers"]],
            rep["history"],
            rep["max_rel_error"],
        )
    elif kind != "dense":
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}")
    _load_state(model, payload["state_dict"], path)
    model.compressdrop_meta = {
        "recipe": payload.get("recipe"),
        "meta": payload.get("meta", {}),
        "kind": kind,
    }
    return model
