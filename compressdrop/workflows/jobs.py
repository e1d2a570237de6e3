"""The jobs behind the CLI's commands that make files: prune a model file, export it (training a
recipe is in :mod:`compressdrop.workflows.train_job`, evaluating and sweeping in
:mod:`compressdrop.workflows.evaluate`). Each returns plain data; :mod:`compressdrop.cli` parses
options and shows the result, :mod:`compressdrop.reporting` draws the tables.

Errors a user can fix are :class:`~compressdrop.CompressDropError` subclasses with a message that
names the file and the problem.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import Factory
from ..data import absolute_spec, check_trainable, load_dataset, with_model_tokenizer
from ..errors import InputError
from ..hf_folder import check_folder_output, save_hf_folder, why_no_folder
from ..hf_plan import check_folder_plan
from ..recipes import Recipe, load_recipe
from ..runtime import run_on_examples
from ..training.finish import SLIM_FORMATS, SlimFiles, finish, prune_summary, slim_paths, write_slim
from . import sparsify
from .memory import check_model_memory
from .precision import load_float32
from .sparsify import adopt, default_recipe_for, fit_data_shape, fit_outputs, sparsify_and_prune

__all__ = ["PruneResult", "check_writable", "export_file", "prune_file"]

Progress = Callable[[dict[str, Any]], None]


def _quiet(event: dict[str, Any]) -> None:
    """The progress callback that shows nothing."""


def check_writable(path: str | Path, source: str | Path | None = None) -> None:
    """Fail before any work if ``path`` cannot be written: a non-empty name, not an existing
    folder when it names a file (it has a suffix), in a folder that exists and is writable, not
    the file ``source`` that the command reads (the model it prunes or exports).

    Raises:
        InputError: naming the file and the folder.
    """
    if not str(path).strip():
        raise InputError("cannot write to an empty file name")
    if Path(path).name in ("", ".."):  # "." (Path("") too), "/", ".."
        raise InputError(f"cannot write {path}: name a file, or a folder that is not there yet")
    if Path(path).suffix and Path(path).is_dir():
        raise InputError(f"cannot write {path}: it is a folder; name a file to write")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    try:  # a file made there: os.access says yes to root, in /proc and /sys too
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        why = f"directory {parent} is not writable ({e.strerror})"
        raise InputError(f"cannot write {path}: {why}") from None
    reads = Path(source) if source is not None else None
    # (a folder: check_folder_output says more, a Hugging Face model's own folder included)
    if reads is not None and reads.exists() and Path(path).is_file() and reads.samefile(path):
        raise InputError(f"cannot write {path}: it is the model this reads; write elsewhere")


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_file` made: the slim model, its files and what pruning did.

    ``run`` is the sparsify-and-fine-tune report (dense against slim on the test split) when the
    model came without trained gates, else ``None``.
    """

    slim: nn.Module
    files: SlimFiles
    summary: dict[str, Any]
    run: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (the CLI's ``--json``)."""
        return {
            "files": {k: str(v) for k, v in self.files.paths.items()},
            "max_rel_error_files": self.files.max_rel_error,
            **self.summary,
            "architecture": f"{self.summary['architecture_before']} → "
            f"{self.summary['architecture_after']}",
            "report": self.run,
        }


def prune_file(
    model_path: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    uniform: bool | None = None,
    recipe: str | Recipe | None = None,
    data: str | None = None,
    arch: Factory | str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
    device: str = "auto",
    seed: int | None = None,
    mc_samples: int | None = None,
    keep_gated: bool = False,
    progress: Progress = _quiet,
) -> PruneResult:
    """Prune the model in ``model_path`` and write the slim model to ``out``.

    A model with trained gates is pruned at once; a plain one (a ``.pt2`` program, a state_dict,
    a pickled module) is first sparsified on ``data`` with ``recipe`` (default: one sized to the
    data, announced to ``progress`` as a ``recipe`` event), then pruned and fine-tuned.

    Args:
        model_path: the model file (see :func:`compressdrop.checkpoint.load_model`).
        out: the slim model's file; its suffix picks the format (:data:`SLIM_FORMATS`; none:
            a Hugging Face folder).
        threshold: the SNR threshold (``None``: the recipe's or each gate family's default).
        uniform: every layer of a stack keeps as many units (``None``: the recipe's choice).
        recipe / data: how to sparsify a plain model, and on what. For a model with trained
            gates, ``recipe`` gives only the prune settings that the arguments leave open
            (``None``: the recipe the model trained with, recorded in its checkpoint), and
            ``data``, ``seed`` and ``device`` are refused: nothing is trained.
        arch / arch_kwargs / trust_code: how to rebuild the model, and consent to run code.
        device / seed: where to train, and the seed (default: the recipe's).
        mc_samples: also write the slim model with its learned noise and a sampling ONNX graph
            (``STEM-mc.pt``, ``STEM-mc.onnx``; see :func:`~compressdrop.training.finish.finish`);
            a model with trained gates only.
        keep_gated: also keep the sparsified model with its trained gates as ``STEM-gated.pt``
            (kind ``gated``; for sweep, Monte-Carlo, pruning again); a plain model only.
        progress: called with each event of the sparsify run.

    Raises:
        InputError: an unknown output format, a plain model without ``data``, a model with
            trained gates with ``data``, ``seed`` or a ``device``, or a model too big for the
            memory available (:mod:`compressdrop.workflows.memory`), before it is read.
    """
    from ..gating import example_input_for, is_gated

    for path in [out, *slim_paths(out, mc_samples)[1:]]:  # a .pt2's .onnx too: before training
        check_writable(path, model_path)
    out = Path(out)
    if out.suffix not in SLIM_FORMATS:
        raise InputError(f"{out}: use a .pt, .pt2 or .onnx file name, or a folder name")
    check_model_memory(model_path, "prune" if data is None else "sparsify", device or "auto")
    model = load_float32(model_path, arch, arch_kwargs, trust_code)
    if not out.suffix and (why := why_no_folder(model)):  # before any training
        raise InputError(f"{out}: {why}; use a .pt, .pt2 or .onnx file name")
    if not out.suffix:
        check_folder_output(out)  # not over the model's own folder, nor any other: before training
    recipe_dict = (getattr(model, "compressdrop_meta", {}) or {}).get("recipe")
    if mc_samples is not None and (mc_samples < 1 or not is_gated(model)):
        raise InputError(  # the problem only: N, or a model without gates
            f"--mc-samples needs N ≥ 1, got {mc_samples}"
            if is_gated(model)
            else f"--mc-samples needs a model with trained gates; {model_path} has none (prune it "
            "with --data and --keep-gated, then prune STEM-gated.pt with --mc-samples)"
        )
    if is_gated(model):
        unused = [f for f, v in (("--data", data), ("--seed", seed)) if v is not None]
        unused += ["--device"] if device not in ("auto", None) else []
        unused += ["--keep-gated (the file is the gated model)"] if keep_gated else []
        if unused:
            raise InputError(
                f"{model_path} has trained gates: it is pruned as it is, without training, so "
                f"{', '.join(unused)} would not be used; leave {'it' if len(unused) == 1 else 'them'}"
                f" out"
            )
        # the prune settings: the arguments, else --recipe's, else those the model trained with
        if recipe is not None:
            settings = vars((recipe if isinstance(recipe, Recipe) else load_recipe(recipe)).prune)
        else:
            settings = dict((recipe_dict or {}).get("prune") or {})
        if threshold is None:
            threshold = settings.get("threshold")
        if uniform is None:
            uniform = bool(settings.get("uniform", False))
        slim, files = finish(
            model,
            out,
            threshold=threshold,
            recipe=recipe_dict,
            mc_samples=mc_samples,
            uniform=uniform,
            source=model_path,
        )
        assert files is not None
        return PruneResult(slim, files, prune_summary(slim), None)
    if data is None:
        raise InputError(
            f"{model_path} has no trained gates: pass --data (and --recipe) to sparsify it first"
        )
    given, data = data, with_model_tokenizer(data, model_path)  # a folder's text: its own tokens
    if data != given:
        progress({"event": "tokenizer", "folder": str(model_path)})
    # a folder of the classes the model was trained on is labelled by their names (as eval does)
    ds = load_dataset(data).in_class_order(getattr(model, "class_names", None))
    check_trainable(ds)
    ds = fit_data_shape(model, ds, f"data {ds.name!r}")  # (gray images given as (H, W))
    ds = fit_outputs(model, ds)  # token ids in an .npz become int64 for a token model
    adopt(model, ds)
    if recipe is None:
        r = default_recipe_for(ds)
    else:
        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    r = r.override(
        {"data.name": absolute_spec(data)}
    )  # recorded in the files: eval's and sweep's default data
    if seed is not None:
        r = r.replace(seed=seed)
    if threshold is not None:
        r = r.replace(prune=replace(r.prune, threshold=threshold))
    if uniform is not None:
        r = r.replace(prune=replace(r.prune, uniform=uniform))
    if not out.suffix:  # a folder: a plan whose slim model no config describes, before training
        check_folder_plan(out, model, r.gates.attach_kwargs(), r.prune.uniform, ds.x_train[:2])
    progress(
        {"event": "recipe", "recipe": r, "default": recipe is None, "n_train": len(ds.x_train)}
    )
    gated = out.with_name(f"{out.stem}-gated.pt")
    partial = gated.with_name(f".{gated.name}.partial") if keep_gated else None
    if keep_gated:
        check_writable(gated, model_path)  # (a folder of that name, say) before training
    try:
        slim = sparsify_and_prune(
            model,
            ds,
            r,
            device=device,
            progress=progress,
            factory=arch,
            trust_code=trust_code,
            work_dir=out.resolve().parent,
            keep_gated=partial,
        )
        x = example_input_for(slim, batch=2)
        files = write_slim(slim, out, x, recipe=r.to_dict(), source=model_path)  # (its tokenizer)
        if partial is not None:  # only beside the slim files it made
            os.replace(partial, gated)
            files.paths["gated"], files.bytes["gated"] = gated, gated.stat().st_size
    finally:
        progress({"event": "done"})
        if partial is not None:
            partial.unlink(missing_ok=True)
    return PruneResult(slim, files, prune_summary(slim), getattr(slim, "compressdrop_report", None))


def load_fitting(
    model_path: str | Path,
    shape: tuple[int, ...] | None,
    what: str,
    arch: Factory | str | None,
    arch_kwargs: Mapping[str, Any] | None,
    trust_code: bool,
) -> nn.Module:
    model = load_float32(model_path, arch, arch_kwargs, trust_code)
    if shape is not None:
        sparsify.fit_input_shape(model, shape, what)
    return model


def export_file(
    model_path: str | Path,
    out: str | Path,
    *,
    opset: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    arch: Factory | str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Export the model in ``model_path`` to ``out`` (``.onnx``, checked in onnxruntime;
    ``.pt2``, checked by loading it back; or, a name without a suffix, a Hugging Face folder for a
    transformers model, checked by reloading it with ``from_pretrained``).

    Args:
        input_shape: one example's shape, for a model that records none.
        opset / arch / arch_kwargs / trust_code: as in :func:`prune_file` and
            :func:`~compressdrop.export.export_onnx`.

    Returns:
        ``output``, ``bytes``, ``max_rel_error`` per checked batch size, and for ONNX the
        ``provider`` and ``opset``.
    """
    from ..export import export_onnx
    from ..export._check import with_lengths
    from ..export.program import export_program
    from ..gating import example_input_for

    check_writable(out, model_path)
    out = Path(out)
    if out.suffix not in (".onnx", ".pt2", ""):
        raise InputError(f"{out}: use a .onnx or .pt2 file name, or a folder name")
    check_model_memory(
        model_path, {".onnx": "export onnx", ".pt2": "export pt2"}.get(out.suffix, "export folder")
    )
    model = load_fitting(model_path, input_shape, "--input-shape", arch, arch_kwargs, trust_code)
    if not out.suffix and not hasattr(model, "save_pretrained"):
        raise InputError(
            f"{out}: a folder is written for Hugging Face transformers models only; use a .onnx "
            "or .pt2 file name"
        )
    try:
        x = example_input_for(model, batch=2)
    except InputError:
        raise InputError(
            f"{model_path}: the model records no input shape and none can be inferred from its "
            "first layer: give one example's shape (CLI --input-shape C,H,W; Python "
            "input_shape=(C, H, W))"
        ) from None
    shown = ",".join(map(str, x.shape[1:]))
    where = f"--input-shape {shown}" if input_shape else "the input shape it records or implies"
    # before the exporter, whose own errors are far longer (any output: the exporter takes it)
    run_on_examples(model, x, where, logits=False)
    if out.suffix == "":
        recorded = (getattr(model, "compressdrop_meta", None) or {}).get("recipe")
        size, err = save_hf_folder(model, out, x, source=model_path, recipe=recorded)
        return {"output": str(out), "bytes": size, "max_rel_error": {"reloaded": err}}
    if out.suffix == ".pt2":  # token ids: the sequence length dynamic too, where it exports
        prog = with_lengths(export_program, model, x, out)
        return {"output": str(out), "bytes": prog.bytes, "max_rel_error": prog.max_rel_error}
    meta = {"source": Path(model_path).name}
    rep = with_lengths(export_onnx, model, x, out, metadata=meta, opset=opset)
    return {
        "output": str(out),
        "bytes": rep.bytes,
        "provider": rep.provider,
        "max_rel_error": rep.max_rel_error,
        "opset": rep.opset,
    }
