"""compressdrop's model files: safe to load, and rebuildable without pickled code.

A checkpoint is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors), so it
loads with ``torch.load(weights_only=True)``. It records how to rebuild the structure:

* ``arch``: an :class:`~compressdrop.arch.ArchRecord`: a built-in reference net or a factory
  ``"package.module:function"``. A factory the file names runs only with the user's consent (see
  :mod:`compressdrop.arch`);
* ``attach``: for a gated model, the arguments of ``attach`` (re-attached on the fresh net);
* ``sites``: for a gated model, where its gates sit: the re-attached gates are restricted to
  these layers and checked against them (optional: a file written before it was recorded is
  planned from ``attach`` alone; see :mod:`compressdrop._reattach`);
* ``prune_history``: for a slim model, Torch-Pruning's pruning history (replayed on the fresh net);
* ``noise``: for a slim model whose kept units keep their learned noise
  (:func:`compressdrop.uncertainty.keep_noise`), where its gates sit (rebuilt by family name);

plus the ``state_dict``, the recipe that made it and free-form ``meta``; each record is checked
before anything is built from it (:class:`compressdrop.payload.Payload`). Other files are accepted
with care: a bare ``state_dict`` needs the user to name its architecture; a whole pickled module
needs ``trust_code=True``, because unpickling runs arbitrary code. The training run's resume file
(``format: compressdrop-run``) is read through the same loader.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._attrs import set_record
from ._io import atomic_write
from ._reattach import reattach
from ._version import __version__
from .arch import (
    ArchRecord,
    CheckpointError,
    Factory,
    build_arch,
    check_spec,
    check_state_fits,
    factory_spec,
)
from .errors import InputError, prefixed
from .gating import is_gated
from .gating.gated import input_shapes_of, input_specs_of
from .gating.noisy import noise_record, noisy_sites, put_noise
from .gating.record import attach_config, gate_sites
from .hf_folder import is_hf_folder, load_hf_folder
from .models import MODELS
from .payload import Payload, _what
from .payload.run import check_run_state
from .programs import is_pt2, load_program
from .torchload import load_checkpoint

__all__ = [
    "CheckpointError",
    "build_arch",
    "describe_arch",
    "load_checkpoint",
    "load_model",
    "load_run_state",
    "save_model",
]

FORMAT = "compressdrop-model"
FORMAT_VERSION = 1
RUN_FORMAT = "compressdrop-run"


def describe_arch(model: nn.Module) -> dict[str, Any]:
    """The ``arch`` record of a model (compressdrop reference nets and user factories carry one)."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        raise CheckpointError(
            "the model has no `arch` record, so its structure could not be rebuilt without pickled "
            "code; build it with compressdrop.models.build_model, or set model.arch = "
            "{'factory': 'package.module:function', 'input_shape': [...], 'num_classes': N, "
            "'kwargs': {...}} (kwargs: the factory's arguments, num_classes among them for a "
            "factory that takes it through **kwargs only, as torchvision's do)"
        )
    return ArchRecord.from_dict(arch, "model.arch").to_dict()


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
    names = getattr(model, "class_names", None)
    if names:  # an image folder's classes, in output order
        payload["classes"] = [str(c) for c in names]
    for name, data in (getattr(model, "tokenizer_files", None) or {}).items():  # its HF folder's
        array = np.frombuffer(data, dtype=np.uint8).copy()  # (torch.frombuffer refuses b"")
        payload.setdefault("tokenizer", {})[name] = torch.from_numpy(array)
    if payload["kind"] == "gated":
        payload["attach"] = attach_config(model)
        payload["sites"] = gate_sites(model)
        payload["input_shape"] = [list(s) for s in input_shapes_of(model)]
        payload["inputs"] = input_specs_of(model)
    if report is not None:
        payload["prune_report"] = report.to_dict()
    noise = noise_record(model)
    if noise:
        payload["noise"] = noise
    if payload["kind"] == "slim" and payload["arch"].get("program") is not None:
        baked = (getattr(model, "compressdrop_meta", None) or {}).get("slim_program")
        if report is not None and baked == report.architecture_after:
            payload["slim_program"] = True  # loaded as its own program, not pruned since
        elif not _replays(payload):
            payload.update(_slim_program(model, payload["arch"], noise))
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def _replays(payload: Mapping[str, Any]) -> bool:
    """Whether a slim model kept as a program rebuilds the usual way: the dense program, the
    cuts replayed on it, the weights loaded (as :func:`load_model` does)."""
    from .pruning import replay

    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            # a program this process loaded or made already: any operator it calls
            data = payload["arch"]["program"].numpy().tobytes()
            model = load_program(data, "the dense program", any_operator=True)
            replay(model, payload["prune_report"]["history"])
            if payload.get("noise"):
                put_noise(model, payload["noise"])
            model.load_state_dict(payload["state_dict"])
    except Exception:  # any failure: the slim model is saved as its own program instead
        return False
    return True


def _slim_program(model: nn.Module, arch: Mapping[str, Any], noise: list) -> dict[str, Any]:
    """A slim model kept as a program that the dense program and the cuts cannot rebuild, saved
    as its own program: a block that pruning rewrote (ShuffleNetV2's shuffle, as index buffers)
    has no form in the dense graph, and the program's constants (Swin's lifted tensors) no key
    in the model's state_dict. Its batch dimension is dynamic, other dimensions as exported
    (token ids: the example's length). The state saved is the one the rebuilt program holds, with
    the noise record's sites put back (their gates' values from ``model``)."""
    from .gating import example_input_for
    from .programs import program_record

    with torch.random.fork_rng(devices=[]):
        cpu = copy.deepcopy(model).cpu()
        plain = copy.deepcopy(cpu) if noise else cpu
        for name, site in list(noisy_sites(plain)):  # the program is of the slim model alone
            plain.set_submodule(name, site.module)
        record = {**arch, **program_record(plain, example_input_for(plain, batch=2))}
        # the program of a module in this process, not a file's: any operator it calls
        data = record["program"].numpy().tobytes()
        rebuilt = load_program(data, "the slim model's program", any_operator=True)
        if noise:
            put_noise(rebuilt, noise)
            rebuilt.load_state_dict(cpu.state_dict(), strict=False)  # program constants kept
    state = {k: v.detach().cpu() for k, v in rebuilt.state_dict().items()}
    return {"arch": record, "state_dict": state, "slim_program": True}


def load_model(
    path: str | Path,
    *,
    arch: Factory | str | Mapping[str, Any] | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Load a model file and return the model (in eval mode, on the CPU).

    No code named by the file runs unless the caller allows it: see :mod:`compressdrop.arch`.

    Args:
        path: a compressdrop checkpoint, a ``torch.export`` program (``.pt2``; see
            :mod:`compressdrop.programs`), a Hugging Face causal-LM folder (``config.json`` +
            safetensors; see :mod:`compressdrop.hf_folder`), a ``state_dict`` (needs ``arch``),
            or, only with ``trust_code``, a whole pickled ``nn.Module``.
        arch: the architecture, named by the caller: a factory (callable or
            ``"package.module:function"``; for a checkpoint it replaces the factory the file
            names), or, for a bare state_dict, an ``arch`` record.
        arch_kwargs: keyword arguments of ``arch`` for a bare state_dict (e.g. ``num_classes``).
        input_shape: one example's shape, recorded on a model built for a bare state_dict.
        trust_code: the file is trusted: unpickle whole objects and call any factory it names.

    Raises:
        CheckpointError: the file is missing, damaged, pickled without ``trust_code``, names a
            factory nobody allowed, or its weights do not fit.
    """
    if isinstance(arch, str) and arch not in MODELS:  # the user's --arch, named as typed
        check_spec(arch, f"--arch {arch}")
    if (is_pt2(path) or is_hf_folder(path)) and arch is not None:
        raise CheckpointError(f"{path} holds its own structure: --arch (arch=) is not used for it")
    if is_pt2(path):  # a torch.export program: checked, then loaded without pickle
        return load_program(path, any_operator=trust_code).eval()
    if is_hf_folder(path):  # config.json + safetensors: the transformers library's own classes
        return load_hf_folder(path)
    if Path(path).is_dir():
        raise CheckpointError(
            f"{path}: a folder without config.json; compressdrop reads model files and Hugging "
            "Face model folders"
        )
    obj = _unwrapped(load_checkpoint(path, trust_code=trust_code))
    if isinstance(obj, nn.Module):
        return obj.eval()
    if _format_of(obj) == FORMAT:
        if isinstance(arch, Mapping):
            raise CheckpointError(
                f"{path}: a compressdrop checkpoint records its own architecture; arch= may only "
                "name a factory to call instead"
            )
        return _from_payload(obj, path, factory=arch, trust_code=trust_code).eval()
    if _format_of(obj) == RUN_FORMAT:
        raise CheckpointError(
            f"{path}: a training run's resume file, not a model; continue it with "
            "`compressdrop train --resume`, or load gated.pt / slim.pt"
        )
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise CheckpointError(
                f"{path}: a bare state_dict holds weights but not the structure; pass the "
                "architecture (CLI: --arch package.module:factory, or a reference net's name "
                "such as --arch lenet300, with --arch-arg NAME=VALUE for its arguments)"
            )
        if isinstance(arch, Mapping):  # the caller's own record: consent to its factory
            record, factory = ArchRecord.from_dict(arch, "arch"), arch.get("factory")
        elif isinstance(arch, str) and arch in MODELS:  # a reference net, by its name
            kwargs = dict(arch_kwargs or {})
            shape = kwargs.pop("input_shape", None) or input_shape
            record = ArchRecord(
                name=arch,
                input_shape=tuple(shape) if shape else None,
                num_classes=kwargs.pop("num_classes", None),
                kwargs=kwargs,
            )
            factory = None
        else:
            record = ArchRecord(
                factory=arch if isinstance(arch, str) else factory_spec(arch),
                input_shape=tuple(input_shape) if input_shape else None,
                kwargs=dict(arch_kwargs or {}),
            )
            factory = arch
        hint = (
            f" {record.label}(**{dict(record.kwargs)}) (pass its arguments with --arch-arg "
            "NAME=VALUE, e.g. num_classes=10 or input_shape=[1,28,28])"
        )
        check_state_fits(record, obj, factory=factory, where=str(path), hint=hint)
        model = build_arch(record, factory=factory, where=str(path))
        _load_state(model, obj, path, hint)
        return model.eval()
    what = f"a dict of {list(obj)[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path}: not a compressdrop checkpoint, state_dict or nn.Module ({what}); save the "
        f"model's state_dict() alone, or under one of the keys {list(_WRAPPER_KEYS)}"
    )


# where training scripts put the model in the dict they save (with the epoch, optimizer, ...)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _unwrapped(obj: Any) -> Any:
    """The model inside a training script's save, ``{"state_dict": ..., "epoch": ...}`` (the
    first of :data:`_WRAPPER_KEYS` that holds a state_dict or a module); anything else as it is.
    (DDP's ``module.`` key prefix is tried off by :func:`_load_state`.)"""
    if isinstance(obj, Mapping) and _format_of(obj) not in (FORMAT, RUN_FORMAT):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or (
                isinstance(inner, Mapping) and inner and _all_tensors(inner)
            ):
                obj = inner
                break
    return obj


def _format_of(obj: Any) -> str | None:
    """The ``format`` a saved dict declares, if it is a dict with a string there (a user's save
    may hold anything under that key, a numpy array say)."""
    value = obj.get("format") if isinstance(obj, Mapping) else None
    return value if isinstance(value, str) else None


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def load_run_state(path: str | Path) -> dict[str, Any]:
    """A training run's resume file (``format: compressdrop-run``), read through the safe loader."""
    payload = load_checkpoint(path)
    if _format_of(payload) != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a compressdrop run checkpoint")
    check_run_state(payload, path)
    return dict(payload)


def _load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Any, hint: str = ""
) -> None:
    ddp = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    tries = [state, ddp] if len(ddp) == len(state) else [state]  # DDP's keys: without the prefix
    for attempt in tries:
        try:
            model.load_state_dict(attempt)
            return
        except RuntimeError as e:  # the last attempt's error names what does not fit
            why = str(e)
    raise CheckpointError(f"{path}: weights do not fit the architecture{hint}: {why}")


def _from_payload(
    payload: Mapping[str, Any], path: Any, *, factory: Factory | str | None, trust_code: bool
) -> nn.Module:
    version = payload.get("format_version")
    if not (type(version) is int and version == FORMAT_VERSION):  # (an array: no truth value)
        raise CheckpointError(
            f"{path}: checkpoint format version {_what(version)} is not supported (expected "
            f"{FORMAT_VERSION})"
        )
    where = str(path)
    rec = Payload.from_dict(payload, where)  # every record checked: nothing built or drawn yet
    if rec.slim_program and factory is not None:  # refused before any factory runs
        raise CheckpointError(f"{path}: a slim model saved as its own program; --arch is not used")
    # the record's sizes against the file's weights, before any memory is taken for them
    check_state_fits(
        rec.arch, rec.state_dict, kind=rec.kind, factory=factory, trust_code=trust_code, where=where
    )
    model = build_arch(rec.arch, factory=factory, trust_code=trust_code, where=where)
    hint, baked = "", None
    if rec.kind == "gated":  # the file's gates, checked against its sites record if it has one
        version = payload.get("compressdrop_version")
        hint = reattach(model, rec.attach, rec.inputs, rec.sites, where, version)
    elif rec.report is not None:  # slim
        from .pruning import replay

        if not rec.slim_program:  # else the program is the slim structure itself
            with prefixed(str(path)):  # the history's names and indices checked as it walks
                replay(model, rec.report.history)
        set_record(model, "prune_report", rec.report)
        if rec.slim_program:
            baked = rec.report.architecture_after
        if rec.noise:
            try:
                put_noise(model, rec.noise)
            except InputError as e:  # a layer the record names that the model lacks
                raise CheckpointError(
                    f"{path}: the noise record does not fit the model: {e}"
                ) from None
    _load_state(model, rec.state_dict, path, hint)
    if rec.classes is not None:
        set_record(model, "class_names", rec.classes)
    if rec.tokenizer:
        set_record(model, "tokenizer_files", rec.tokenizer)
    set_record(
        model,
        "compressdrop_meta",
        {
            "recipe": rec.recipe,
            "meta": rec.meta,
            "kind": rec.kind,
            # the structure its program holds already (saved again as it is, unless pruned again)
            "slim_program": baked,
        },
    )
    return model
