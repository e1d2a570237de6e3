"""Hugging Face model folders (``config.json`` + safetensors weights) in and out.

In: a causal language model's folder loads with the transformers library's own classes only:
a config that names remote code (``auto_map``) is refused, and so are pickled weights
(``pytorch_model.bin``), since unpickling runs code, and a config larger than the weights. The
model gets an ``arch`` record (``hf-causal-lm`` with the config's fields), so that compressdrop
checkpoints of it (gated, slim) rebuild without the folder.

Out: a slim model whose config describes it (see :func:`compressdrop.gating.known.sync_config`;
``prune(uniform=True)`` makes one) is written with ``save_pretrained`` into a temporary folder,
loaded back with its own class's ``from_pretrained`` and compared with the model, and only then
moved into place: a folder that ``from_pretrained`` of the class its config names
(``AutoModelForCausalLM`` for a causal LM) loads with no compressdrop installed. A model whose
config still describes other shapes (a family :func:`~compressdrop.gating.known.sync_config` does
not know, such as OPT) is refused before anything is written (:func:`folder_problem`), and
before any training by :func:`compressdrop.hf_plan.check_folder_plan`, which asks the same.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._attrs import set_record
from ._version import __version__
from .errors import CheckpointError, InputError
from .hf_files import (
    MARKER,
    WEIGHTS,
    check_shards,
    check_sizes,
    import_transformers,
    quiet_progress,
    read_config,
    read_made,
    read_tokenizer,
    write_tokenizer,
)
from .models.hf import hub_code
from .runtime import logits_of

__all__ = [
    "check_folder_output",
    "folder_problem",
    "is_hf_folder",
    "load_hf_folder",
    "save_hf_folder",
]

# fields the arch record carries elsewhere, or that the library fills in itself; the weights'
# dtype too (a bfloat16 folder is rebuilt, trained and written in float32)
_NOT_KWARGS = {
    *("model_type", "architectures", "transformers_version", "vocab_size", "_name_or_path"),
    *("dtype", "torch_dtype"),
}


def why_no_folder(model: nn.Module) -> str | None:
    """Why no slim folder can be written for ``model`` after training it (``None``: one can). A
    transformers model read from a pickled module (or a program) is recorded as a
    ``torch.export`` program, and its slim model is rebuilt from that record: no config, no
    ``save_pretrained``."""
    if not hasattr(model, "save_pretrained"):
        return "a folder is written for Hugging Face transformers models only"
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping) or "program" in arch:
        causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        return (
            "a folder is written from a Hugging Face model folder (or a compressdrop checkpoint "
            "of one); this model was read from a pickled module, so its slim model is rebuilt "
            "as a torch.export program, without its config: "
            + (
                "save it with save_pretrained and prune that folder instead"
                if causal  # compressdrop reads causal-LM folders only
                else "save its state_dict and name a function of yours that builds the model "
                "with --arch module:function, or write .pt2, .onnx or .pt"
            )
        )
    return None


def check_folder_output(out: str | Path) -> None:
    """Refuse to write a Hugging Face folder over a folder that compressdrop did not write (a
    model's own folder, any other files).

    Raises:
        InputError: ``out`` is a file, or a folder without :data:`MARKER`.
    """
    out = Path(out)
    if out.exists() and not (out / MARKER).is_file():
        what = "a file" if not out.is_dir() else "a folder compressdrop did not write"
        raise InputError(
            f"{out}: {what} is there already; name a new folder (a slim folder from an earlier "
            "run is replaced, nothing else is)"
        )


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf_folder(path: str | Path) -> nn.Module:
    """The causal language model in a Hugging Face folder, in eval mode, on the CPU.

    Raises:
        CheckpointError: the config is unreadable, names remote code, is not a causal language
            model of the transformers library, or the weights are missing or pickled.
        InputError: transformers is not installed.
    """
    path = Path(path)
    config = read_config(path)  # read once: transformers is given these values, not the file
    if "auto_map" in config:
        raise CheckpointError(
            f"{path}: the config names its own code ({config['auto_map']}); compressdrop only "
            "builds the transformers library's own model classes, so it was refused"
        )
    if code := hub_code(config):
        raise CheckpointError(
            f"{path}/config.json: names code for transformers to download and import ({code}); "
            "refused: compressdrop runs the library's own attention only"
        )
    if not any((path / w).is_file() for w in WEIGHTS):
        pickled = [p.name for p in path.glob("*.bin")]
        raise CheckpointError(
            f"{path}: no safetensors weights ({' or '.join(WEIGHTS)})"
            + (
                f"; {pickled} are pickled and loading them could run code: convert them to "
                "safetensors where you trust them"
                if pickled
                else ""
            )
        )
    tf = import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    causal = [a for a in archs if isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel"))]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal):
        # (bert has a causal-LM class: a BertForSequenceClassification folder loaded as one
        # dropped its classifier and was trained as a language model)
        raise CheckpointError(
            f"{path}: {archs or model_type!r} is not a causal language model of transformers "
            f"{tf.__version__} (compressdrop reads causal-LM folders; for another model, save it "
            "with torch.export or its state_dict and give its factory with --arch)"
        )
    try:
        checked = tf.CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}/config.json: not a {model_type} config ({e})") from None
    checked.name_or_path = str(path)
    check_sizes(path, check_shards(path), checked, tf)  # before memory is taken for what lacks
    try:
        with quiet_progress():
            model = tf.AutoModelForCausalLM.from_pretrained(
                path,
                config=checked,  # (else transformers reads config.json again)
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                use_kernels=False,  # else on when `kernels` is installed: Hub layers on train()
            )
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # a package it needs: missing
        raise CheckpointError(f"{path}: cannot load the model: {e}") from None
    cfg = model.config
    kwargs = {k: v for k, v in cfg.to_diff_dict().items() if k not in _NOT_KWARGS}
    kwargs = json.loads(json.dumps(kwargs, default=str))  # plain data only
    set_record(
        model,
        "arch",
        {
            "name": "hf-causal-lm",
            "num_classes": int(cfg.vocab_size),
            "kwargs": {"model_type": model_type, **kwargs},
        },
    )
    set_record(model, "tokenizer_files", read_tokenizer(path))  # into its checkpoints and folders
    recipe = read_made(path).get("recipe")  # a slim folder's: eval's default data
    set_record(model, "compressdrop_meta", {"recipe": recipe if isinstance(recipe, dict) else {}})
    return model.eval()


def save_hf_folder(
    slim: nn.Module,
    out: str | Path,
    example_input: torch.Tensor,
    rtol: float = 1e-4,
    source: str | Path | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> tuple[int, float]:
    """Write ``slim`` as a Hugging Face folder ``out`` (replacing one that compressdrop wrote),
    with the tokenizer files of ``source`` (the model's folder, if it came from one) or those
    the model carries (read when its folder was loaded, kept in its checkpoints), so that
    ``AutoTokenizer.from_pretrained(out)`` works too; :data:`MARKER` records the prune report
    and the ``recipe`` (its data: what ``eval`` of the folder scores by default).

    Returns:
        The bytes written, and the largest relative error of the reloaded model's logits against
        ``slim``'s on ``example_input``.

    Raises:
        InputError: ``slim`` is not a transformers model, or its config cannot describe its shape
            (nothing is written; the message says what to do).
        CheckpointError: the reloaded folder does not reproduce the model.
    """
    out = Path(out)
    config = getattr(slim, "config", None)
    if config is None or not hasattr(slim, "save_pretrained"):
        raise InputError(
            f"{out}: a folder is written for Hugging Face transformers models only; use a .pt, "
            ".pt2 or .onnx file name"
        )
    problem = folder_problem(slim)
    if problem is not None:
        raise InputError(f"{out}: cannot write a Hugging Face folder: {problem}")
    check_folder_output(out)
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {out}: directory {parent} is missing or not writable")
    # mkdir, not mkdtemp: the folder gets the mode a mkdir gives (the umask's), not 0700
    tmp = parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
    tmp.mkdir()
    try:
        save: Any = slim.save_pretrained  # a transformers PreTrainedModel's
        with quiet_progress():
            save(tmp, safe_serialization=True)
        hf = source is not None and is_hf_folder(source)
        tokenizer = getattr(slim, "tokenizer_files", None)  # read with its folder or checkpoint
        tokenizer = read_tokenizer(Path(str(source))) if tokenizer is None and hf else tokenizer
        write_tokenizer(tokenizer or {}, tmp)
        if not (hf or tokenizer or source is None):  # a model not from a folder, an older file
            warnings.warn(
                f"compressdrop: {out} gets no tokenizer files: {source} is not a Hugging Face "
                "folder and carries none; copy them (tokenizer.json, ...) from the model's folder",
                UserWarning,
                stacklevel=3,
            )
        report = getattr(slim, "prune_report", None)
        made = {"compressdrop_version": __version__, **(report.metadata() if report else {})}
        (tmp / MARKER).write_text(json.dumps({**made, **({"recipe": recipe} if recipe else {})}))
        err = _check_reload(slim, tmp, example_input)
        if not err <= rtol:
            raise CheckpointError(
                f"{out}: the folder reloads with logits {err:.2e} (relative) away from the "
                f"model's (tolerance {rtol:g}); nothing was written"
            )
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return size, err


def folder_problem(slim: nn.Module) -> str | None:
    """Why no folder can hold ``slim`` (``None``: one can), after its config is brought to its
    shape (:func:`~compressdrop.gating.known.sync_config`): the layers keep different widths, the
    config cannot describe a width it derives, or (a family ``sync_config`` does not know, such
    as OPT) a weight whose shape the config does not give. :func:`save_hf_folder` refuses on it,
    and :func:`compressdrop.hf_plan.check_folder_plan` on the same words before training."""
    from .gating.known import sync_config

    reason = sync_config(slim)
    if reason is not None:
        return reason
    misfit = _config_misfit(slim)
    if misfit is None:
        return None
    return (
        f"compressdrop cannot update the model's {type(slim.config).__name__} to describe the "
        f"pruned model ({misfit}); write .pt2, .onnx or .pt instead"
    )


def _config_misfit(slim: nn.Module) -> str | None:
    """Where ``slim``'s config describes another shape than its weights have: the first weight
    whose shape differs from that of a model built from the config (on the meta device, so
    nothing is allocated), or ``None`` when every weight fits."""
    config = copy.deepcopy(slim.config)
    try:
        with torch.device("meta"):
            fresh = type(slim)(config)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return None  # not buildable on the meta device: the reload check decides
    want = fresh.state_dict()
    for key, value in slim.state_dict().items():
        if key in want and tuple(want[key].shape) != tuple(value.shape):
            return (
                f"{key} is {tuple(value.shape)} in the model, {tuple(want[key].shape)} by the "
                "config"
            )
    return None


@torch.inference_mode()
def _check_reload(slim: nn.Module, folder: Path, x: torch.Tensor) -> float:
    """Load ``folder`` with ``slim``'s own class (already imported: no name the folder gives is
    looked up) and return the largest relative error of its first output against ``slim``'s."""
    cls: Any = type(slim)
    try:
        with quiet_progress():
            back = cls.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False, use_safetensors=True
            ).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"the written folder does not load back as a {cls.__name__} ({e}); nothing was "
            "written: keep this model as .pt2, .onnx or a compressdrop checkpoint (.pt)"
        ) from None
    was = slim.training
    slim.eval()
    try:
        x = x.to(next(slim.parameters()).device)
        want = logits_of(slim(x)).float()
        try:
            got = logits_of(back.to(x.device)(x)).float()
        except RuntimeError as e:
            raise CheckpointError(
                f"the written folder loads back as a {cls.__name__} that does not run on the "
                f"example input ({e}); nothing was written: keep this model as .pt2, .onnx or "
                "a compressdrop checkpoint (.pt)"
            ) from None
    finally:
        slim.train(was)
    if got.shape != want.shape:
        raise CheckpointError(
            f"the written folder loads back as a {cls.__name__} whose output is "
            f"{tuple(got.shape)}, not {tuple(want.shape)}; nothing was written"
        )
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
