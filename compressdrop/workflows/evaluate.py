"""The jobs behind ``compressdrop eval`` and ``compressdrop sweep``: measure a model file on a
data set's test split, and accuracy against size over a gated checkpoint's SNR thresholds."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import Factory
from ..data import load_dataset, spec_paths, with_model_tokenizer
from ..errors import DataError, InputError
from ..evaluation.metrics import bits_per_byte
from ..runtime import check_labels, run_on_examples
from .jobs import load_fitting
from .memory import check_model_memory
from .sparsify import fit_data_shape, fit_ids

__all__ = ["evaluate_file", "sweep_file"]


def evaluate_file(
    model_path: str | Path,
    data: str | None = None,
    *,
    mc_samples: int | None = None,
    ood: str | None = None,
    arch: Factory | str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
    device: str = "auto",
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy, NLL and size of a model file (PyTorch or ``.onnx``) on ``data``'s test split.

    Args:
        data: a data spec; ``None``: the data a compressdrop checkpoint's recipe records (what
            it was trained on), said to ``announce``, else ``digits`` (and for ``.onnx`` files,
            whose metadata records no data).
        mc_samples: Monte-Carlo passes for uncertainty (PyTorch models with dropout or gates,
            or an ONNX graph written by :func:`~compressdrop.uncertainty.export_mc_onnx`).
        ood: an out-of-distribution data set for the AUROC of the uncertainty measures.

    Returns:
        The metrics as plain data; ``mc`` holds the Monte-Carlo ones. ``params`` counts the
        model's own parameters; a gated model's (or a noisy slim one's) gates are counted apart,
        in ``gate_params``: they are training state that pruning folds into the weights, so
        ``params`` compares with the dense and the slim model.

    Raises:
        InputError: ``mc_samples`` with a deterministic ONNX file, or a model without stochastic
            layers.
    """
    if str(model_path).endswith(".onnx"):
        ds = load_dataset(data or "digits")
        from ..evaluation.onnx_eval import evaluate_onnx
        from ..uncertainty import mc_evaluate_onnx, onnx_mc_samples

        if mc_samples is None and Path(model_path).is_file():
            # a graph that draws Monte-Carlo samples: scored with the samples of one call (a
            # file onnx cannot read gets evaluate_onnx's error instead)
            with contextlib.suppress(Exception):
                per_call = onnx_mc_samples(model_path)
                mc_samples = None if per_call is None else max(2, per_call)
        lm = getattr(ds, "task", "classify") == "lm"  # text: bits per byte
        ds = ds.in_class_order(_onnx_classes(model_path))
        if mc_samples is None:
            with _digits_said(model_path, data is None):
                scored = evaluate_onnx(model_path, ds.x_test, ds.y_test, device=device)
            scored = {"model": scored.pop("model"), "data": ds.name, **scored}
            if lm:
                scored["bits_per_byte"] = bits_per_byte(scored["nll"], ds)
            return scored

        x_ood = _ood_inputs(ood, tuple(ds.input_shape)) if ood is not None else None
        mc = mc_evaluate_onnx(model_path, ds.x_test, ds.y_test, mc_samples, x_ood, device=device)
        if ood is not None:
            mc["ood_data"] = ood
        out: dict[str, Any] = {
            "model": str(model_path),
            "data": ds.name,
            "n": ds.y_test.numel(),  # examples, or predicted tokens
            "accuracy": mc["accuracy"],
            "nll": mc["nll"],
            "mc": mc,
        }
        if lm:
            out["bits_per_byte"] = bits_per_byte(mc["nll"], ds)
        return out
    from ..evaluation.metrics import evaluate
    from ..evaluation.model_size import count_flops, count_gate_params, count_params
    from ..gating import example_input_for
    from ..runtime import resolve_device

    check_model_memory(model_path, "eval")
    model = load_fitting(model_path, None, "", arch, arch_kwargs, trust_code)
    ds = _fitted_data(model_path, model, data, announce)
    shape = tuple(ds.input_shape)
    dev = resolve_device(device)
    model.to(dev)
    m = evaluate(model, ds.x_test, ds.y_test)
    res: dict[str, Any] = {
        "model": str(model_path),
        "data": ds.name,
        "n": m.n,
        **m.record(data=ds),
        # the model's own parameters; a gated file's gates apart: pruning folds them away
        "params": count_params(model) - (gate_params := count_gate_params(model)),
        "flops": count_flops(model, example_input_for(model, batch=1)),
        "device": str(dev),
    }
    if gate_params:
        res["gate_params"] = gate_params
    if mc_samples is not None:
        from ..uncertainty import mc_evaluate

        x_ood = _ood_inputs(ood, shape) if ood is not None else None
        try:
            res["mc"] = mc_evaluate(model, ds.x_test, ds.y_test, mc_samples, x_ood)
        except ValueError as e:
            raise InputError(f"{model_path}: {e}") from None
        if ood is not None:
            res["mc"]["ood_data"] = ood
    return res


def _ood_inputs(ood: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The test inputs of the out-of-distribution data ``ood``, resized to one example's
    ``shape``; an error names ``--ood``."""
    from ..uncertainty import resize_images

    try:
        return resize_images(load_dataset(ood).x_test, shape)
    except InputError as e:
        raise InputError(f"--ood {ood}: {e}") from None


def sweep_file(
    model_path: str | Path,
    data: str | None = None,
    *,
    thresholds: list[float] | None = None,
    out: str | Path = "runs/sweep",
    batch: int = 256,
    threads: int | None = None,
    arch: Factory | str | None = None,
    trust_code: bool = False,
    device: str = "auto",
    progress: Callable[[Any, str], None] | None = None,
    announce: Callable[[str], None] | None = None,
    uniform: bool | None = None,
) -> dict[str, Any]:
    """Accuracy against size over SNR thresholds of a gated checkpoint (see
    :func:`compressdrop.evaluation.sweep.sweep`), written as CSV, JSON and a plot into ``out``.
    ``data`` and ``announce``: as in :func:`evaluate_file`; ``uniform``: as ``prune`` would
    (``None``: the recipe the model trained with, as ``prune`` of it does).

    Returns:
        ``rows`` (one per threshold, as data), ``dense`` (the model before gating, when the
        checkpoint records it for this data set), ``files``, ``data`` and ``title``.

    Raises:
        InputError: the model has no trained gates.
    """
    from ..evaluation.sweep import sweep, write_sweep
    from ..gating import is_gated

    check_model_memory(model_path, "sweep")
    model = load_fitting(model_path, None, "", arch, None, trust_code)  # in float32
    if not is_gated(model):
        raise InputError(
            f"{model_path} has no trained gates; sweep needs a gated checkpoint (train's "
            "gated.pt, or the STEM-gated.pt that prune --keep-gated writes)"
        )
    ds = _fitted_data(model_path, model, data, announce)
    rows = sweep(
        model,
        ds.x_test,
        ds.y_test,
        thresholds,
        device=device,
        latency_batch=batch,
        threads=threads,
        progress=progress,
        text=ds.task == "lm",
        uniform=_recipe_uniform(model) if uniform is None else uniform,
        bytes_per_token=getattr(ds, "bytes_per_token", 1.0),
    )
    meta = (getattr(model, "compressdrop_meta", None) or {}).get("meta") or {}
    dense = meta.get("dense")
    if not (isinstance(dense, dict) and dense.get("dataset") == ds.name and _numbers(dense)):
        dense = None  # measured on other data (or a record of other things): no reference
    title = f"{Path(model_path).name} on {ds.name}"
    paths = write_sweep(rows, out, title=title, dense=dense)
    return {
        "rows": [asdict(r) for r in rows],
        "dense": dense,
        "files": {k: str(v) for k, v in paths.items()},
        "data": ds.name,
        "title": title,
    }


def _fitted_data(
    model_path: str | Path,
    model: nn.Module,
    data: str | None,
    announce: Callable[[str], None] | None,
) -> Any:
    """The model's data (:func:`_data_for`), fitted to it: the input shape checked (or
    recorded), a folder labelled by the model's class names, an ``.npz``'s token ids given as
    ids to a model that reads them."""
    ds = _data_for(model_path, model, data, announce)
    where = f"data {ds.name!r}"
    fallback = data is None and not (_recorded_recipe(model).get("data") or {}).get("name")
    with _digits_said(model_path, fallback):
        ds = fit_data_shape(model, ds, where)  # (fit_ids needs it)
        ds = fit_ids(model, ds.in_class_order(getattr(model, "class_names", None)))
        logits = run_on_examples(model, ds.x_test, where)  # a model that records no shape: named
        check_labels(logits.shape[-1], ds.y_test, where)  # before a sweep's prunes and exports
    return ds


@contextlib.contextmanager
def _digits_said(model_path: str | Path, fallback: bool) -> Any:
    """Where digits stood in for data the file does not record, its misfit says so and what
    to do (a new-user walk: the shape error alone did not point at ``--data``)."""
    try:
        yield
    except (InputError, DataError) as e:
        if not fallback:
            raise
        raise type(e)(
            f"{e}; {model_path} records no data of its own, so the built-in digits were used: "
            "name the data to score it on with --data"
        ) from None


def _data_for(
    model_path: str | Path,
    model: nn.Module,
    data: str | None,
    announce: Callable[[str], None] | None,
) -> Any:
    """``data`` loaded; without it, the data the checkpoint's recipe records (the spec it was
    trained on: ``train`` and ``prune --data`` record theirs), said to ``announce``, else digits.
    """
    if data is not None:  # (a Hugging Face folder's text: in its own tokens)
        tokens = with_model_tokenizer(data, model_path)
        if tokens != data and announce is not None:
            announce(f"data: the text in the tokens of {model_path}'s tokenizer.json")
        return load_dataset(tokens)
    spec = (_recorded_recipe(model).get("data") or {}).get("name")
    if not (isinstance(spec, str) and spec):
        return load_dataset("digits")
    _check_recorded_path(model_path, spec)
    if announce is not None:
        announce(f"data: {spec} (what {model_path} was trained on; choose other data with --data)")
    try:
        return load_dataset(spec)
    except (DataError, OSError) as e:
        raise DataError(
            f"{model_path} was trained on data {spec!r}, which cannot be read here ({e}); "
            "name the data to use with --data"
        ) from None


def _numbers(dense: dict) -> bool:
    """Whether a file's record of its dense model holds what the sweep reads: finite numbers (a
    record without them crashed the sweep after it had written half its files)."""
    keys = ("test_accuracy", "params", "flops")
    values = [dense.get(k) for k in keys] + [dense.get("test_bits_per_byte", 0.0)]
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _check_recorded_path(model_path: str | Path, spec: str) -> None:
    """A path the model file records as its data is read without ``--data`` only inside the
    working folder or the model's own: a shared file could name any path (``text:/``, which
    read the whole file system; ``/etc/passwd``, scored as text).

    Raises:
        DataError: the path lies elsewhere; the message gives the ``--data`` to use it.
    """
    for path in spec_paths(spec):  # the data, and a tokenizer it names
        _check_near(model_path, spec, path)


def _check_near(model_path: str | Path, spec: str, path: Path) -> None:
    """:func:`_check_recorded_path` for one ``path`` of ``spec``."""
    import os

    near = (Path.cwd().resolve(), Path(model_path).resolve().parent)
    refused = DataError(
        f"{model_path} records its data as {spec!r}, outside this folder and the model's (or "
        f"linking out of them, or unlisted); compressdrop reads a path a model file names only "
        f"there: to use it, pass --data {spec!r}"
    )

    def unlisted(e: OSError) -> None:  # a folder it cannot list may hide a link out
        raise refused

    inside = lambda p: any(p.resolve().is_relative_to(folder) for folder in near)  # noqa: E731
    links = (  # (os.walk follows no link)
        Path(root, name)
        for root, dirs, files in (os.walk(path, onerror=unlisted) if path.is_dir() else ())
        for name in (*dirs, *files)
        if Path(root, name).is_symlink()
    )
    try:
        ok = inside(path) and all(inside(link) for link in links)
    except RecursionError:  # nested past the limit
        ok = False
    if not ok:
        raise refused


def _onnx_classes(path: str | Path) -> list[str] | None:
    """The class names an ONNX file's metadata records (``classes``, JSON), if any."""
    import json

    from ..export import load_onnx_metadata

    with contextlib.suppress(Exception):  # an unreadable file gets evaluate_onnx's error
        names = json.loads(load_onnx_metadata(path).get("classes", "null"))
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def _recorded_recipe(model: Any) -> dict[str, Any]:
    """The recipe a compressdrop checkpoint records (``{}``: none, or not a mapping)."""
    recipe = (getattr(model, "compressdrop_meta", None) or {}).get("recipe")
    return recipe if isinstance(recipe, dict) else {}


def _recipe_uniform(model: Any) -> bool:
    """The ``prune.uniform`` of the recipe a checkpoint records (``prune`` of it keeps to it)."""
    return bool((_recorded_recipe(model).get("prune") or {}).get("uniform", False))
