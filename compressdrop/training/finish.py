"""The one way a model is finished: prune its gates, write the slim model in the formats asked for,
check every file against the model before it appears, and summarise what pruning did.

The recipe runner, the Lightning callback and ``compressdrop prune`` all end here, so their files
and reports read the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import save_model
from ..errors import InputError
from ..hf_folder import save_hf_folder

__all__ = [
    "SLIM_FORMATS",
    "SlimFiles",
    "drop_stale",
    "finish",
    "prune_summary",
    "resume_error",
    "say_replaced_checkpoint",
    "write_slim",
]

SLIM_FORMATS = {
    ".pt": "compressdrop checkpoint",
    ".pt2": "torch.export program (+ ONNX beside it)",
    ".onnx": "ONNX",
    "": "a name without a suffix: a Hugging Face folder (transformers models)",
}
# what a file name's suffix writes when no formats are given
_BY_SUFFIX = {".pt": (".pt",), ".pt2": (".pt2", ".onnx"), ".onnx": (".onnx",), "": ("",)}
_KINDS = {".pt": "checkpoint", ".pt2": "pt2", ".onnx": "onnx", "": "hf_folder"}


def slim_paths(out: str | Path, mc_samples: int | None = None) -> list[Path]:
    """Every file a prune to ``out`` writes with the default formats (``.pt2``: its ``.onnx``
    too; with ``mc_samples``: ``STEM-mc.pt`` and ``STEM-mc.onnx``), to check before training."""
    out = Path(out)  # first: its own check names a name that is no file name
    paths = [out, *(out.with_suffix(s) for s in _BY_SUFFIX.get(out.suffix, ()) if s != out.suffix)]
    if mc_samples is not None and out.suffix:
        paths += [out.with_name(f"{out.stem}-mc{s}") for s in (".pt", ".onnx")]
    return paths


@dataclass(frozen=True)
class SlimFiles:
    """What :func:`write_slim` wrote: paths, sizes and the check of each file, by kind
    (``"checkpoint"``, ``"pt2"``, ``"onnx"``)."""

    paths: dict[str, Path]
    bytes: dict[str, int]
    max_rel_error: dict[str, float]


def write_slim(
    slim: nn.Module,
    out: str | Path,
    example_input: torch.Tensor,
    *,
    formats: Sequence[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    opset: int | None = None,
    source: str | Path | None = None,
) -> SlimFiles:
    """Write ``slim`` as ``out`` and, with ``formats``, beside it under the same stem.

    A ``.pt2`` is checked by loading it back, an ``.onnx`` in onnxruntime, each against the model
    and before the file appears; a ``.pt`` is compressdrop's checkpoint (atomic, no pickled code).

    Args:
        slim: the model to write (a pruned one records its :class:`PruneReport` in every file).
        out: the file name; its suffix is one of :data:`SLIM_FORMATS` (none: a Hugging Face
            folder, checked by reloading it with ``from_pretrained``; see
            :func:`compressdrop.hf_folder.save_hf_folder`).
        example_input: an input batch (its shape without the batch dimension is the input shape).
        formats: suffixes to write under ``out``'s stem (default: ``.pt`` → ``.pt``; ``.pt2`` →
            ``.pt2`` and ``.onnx``; ``.onnx`` → ``.onnx``).
        recipe: the recipe as plain data, recorded in the checkpoint.
        metadata: extra ONNX ``metadata_props``.
        opset: ONNX opset (``None``: the exporter's).
        source: the model's own Hugging Face folder, whose tokenizer files a slim folder gets.

    Returns:
        The files written, their sizes and the largest relative error each check measured.

    Raises:
        InputError: an unknown suffix.
    """
    out = Path(out)
    wanted = tuple(formats) if formats is not None else _BY_SUFFIX.get(out.suffix, ())
    unknown = [s for s in (out.suffix, *wanted) if s not in SLIM_FORMATS]
    if unknown:
        raise InputError(
            f"{out}: unknown output format {unknown[0]!r}; use "
            + ", ".join(f"{k} ({v})" if k else v for k, v in SLIM_FORMATS.items())
        )
    from ..export import export_onnx
    from ..export._check import with_lengths
    from ..export.program import export_program

    paths: dict[str, Path] = {}
    errors: dict[str, float] = {}
    sizes: dict[str, int] = {}
    x = example_input.detach().cpu()
    try:
        for suffix in wanted:
            path, kind = out.with_suffix(suffix), _KINDS[suffix]
            if suffix == ".pt":
                save_model(slim, path, recipe=recipe)
            elif suffix == "":
                sizes[kind], errors[kind] = save_hf_folder(
                    slim, path, x, source=source, recipe=recipe
                )
            elif suffix == ".pt2":  # token ids: the sequence length dynamic too, where it exports
                prog = with_lengths(export_program, slim, x, path)
                errors[kind] = max(prog.max_rel_error.values())
            else:
                rep = with_lengths(export_onnx, slim, x, path, metadata=metadata, opset=opset)
                errors[kind] = max(rep.max_rel_error.values())
            paths[kind] = path
    except BaseException:  # all of them or none: a .pt2 without its .onnx passes for done
        for path in paths.values():
            if path.is_file():
                path.unlink()
        raise
    sizes.update({k: p.stat().st_size for k, p in paths.items() if k not in sizes})
    return SlimFiles(paths, sizes, errors)


def prune_summary(slim: nn.Module) -> dict[str, Any]:
    """What pruning did to ``slim``, as plain data: threshold, gate family, units per group
    before and after (``"20-50-500"`` → ``"5-17-120"``), the layers and the surgery's check.

    Raises:
        InputError: ``slim`` was not made by :func:`compressdrop.prune`.
    """
    rep = getattr(slim, "prune_report", None)
    if rep is None:
        raise InputError("the model has no prune report (was it made by compressdrop.prune?)")
    return {
        "threshold": rep.threshold,
        "family": rep.family,
        "architecture_before": rep.architecture_before,
        "architecture_after": rep.architecture_after,
        "layers": [vars(layer) for layer in rep.layers],
        "max_rel_error": rep.max_rel_error,
    }


def finish(
    model: nn.Module,
    out: str | Path | None,
    *,
    threshold: float | None = None,
    example_input: torch.Tensor | None = None,
    formats: Sequence[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    opset: int | None = None,
    mc_samples: int | None = None,
    uniform: bool = False,
    source: str | Path | None = None,
) -> tuple[nn.Module, SlimFiles | None]:
    """Prune a gated model and write the slim one (see :func:`write_slim`).

    Args:
        model: a model with trained gates (it is left as it is).
        out: the slim model's file name (``None``: write nothing).
        threshold: the SNR threshold (``None``: each gate family's default).
        example_input: an input batch for tracing and the checks (default: inferred).
        formats / recipe / opset: as in :func:`write_slim`.
        mc_samples: also write the slim model with its kept units' learned noise
            (:func:`compressdrop.uncertainty.keep_noise`) as ``STEM-mc.pt`` and an ONNX graph
            that draws this many Monte-Carlo samples per call as ``STEM-mc.onnx``
            (:func:`compressdrop.uncertainty.export_mc_onnx`); kinds ``mc_checkpoint`` and
            ``mc_onnx``.
        uniform: every layer of a stack keeps as many units (see :func:`compressdrop.prune`).
        source: the file the model was read from, as in :func:`write_slim` (a slim Hugging Face
            folder takes its tokenizer files from it when it is a folder).

    Returns:
        The slim model, and what was written (``None`` when ``out`` is ``None``).
    """
    from ..gating import example_input_for
    from ..pruning import prune

    slim = prune(model.eval(), threshold, example_inputs=example_input, uniform=uniform)
    if out is None:
        return slim, None
    x = example_input if example_input is not None else example_input_for(slim, batch=2)
    if mc_samples is not None:  # before any file: a model it cannot sample writes none
        from ..uncertainty import keep_noise

        noisy = keep_noise(model, slim, threshold, uniform=uniform)
    files = write_slim(slim, out, x, formats=formats, recipe=recipe, opset=opset, source=source)
    if mc_samples is not None:
        from ..uncertainty import export_mc_onnx

        out = Path(out)
        mc_pt, mc_onnx = (out.with_name(f"{out.stem}-mc{s}") for s in (".pt", ".onnx"))
        save_model(noisy, mc_pt, recipe=recipe)
        export_mc_onnx(noisy, x, mc_onnx, mc_samples)
        files.paths.update(mc_checkpoint=mc_pt, mc_onnx=mc_onnx)
        files.bytes.update(mc_checkpoint=mc_pt.stat().st_size, mc_onnx=mc_onnx.stat().st_size)
    return slim, files


def say_replaced_checkpoint(out: Path, resume: bool, progress: Any) -> None:
    """Say that an earlier run's ``checkpoint.pt`` is replaced (this run writes its own at its
    first epoch) when this run does not resume it."""
    if not resume and (out / "checkpoint.pt").is_file():
        progress({"event": "checkpoint_replaced", "folder": str(out)})


def resume_error(ckpt: Path) -> Exception:
    """The error for ``--resume`` without ``ckpt``: a completed run (its ``report.json``; a run
    removes its checkpoint when it ends) has nothing to resume, else no run was started here."""
    if (ckpt.parent / "report.json").is_file():
        return InputError(
            f"--resume: {ckpt.parent} holds a completed run (report.json), so there is nothing to "
            "resume (a run removes its checkpoint.pt when it completes); leave out --resume to "
            "train again, which replaces that run's files"
        )
    return FileNotFoundError(f"--resume: no checkpoint at {ckpt}")


def drop_stale(out: Path, names: Sequence[str], written: Sequence[Any], progress: Any) -> None:
    """Remove the files of ``names`` in ``out`` that this run, now complete, did not write (an
    earlier run's ``slim.onnx`` beside this run's ``slim.pt`` would pass for its; also after
    ``--resume``), and say which."""
    mine = {Path(p).name for p in written if p is not None}
    stale = [n for n in names if n not in mine and (out / n).is_file()]
    for n in stale:
        (out / n).unlink(missing_ok=True)
    if stale:
        progress({"event": "replaced", "folder": str(out), "files": stale})
