"""Bring a user's plain model in and sparsify it: give it a record compressdrop can rebuild,
size a default recipe to its data, train gates on it, prune and fine-tune it."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._attrs import set_record
from ..arch import Factory
from ..checkpoint import load_model
from ..data import DataWarning
from ..errors import InputError
from ..recipes import Recipe, load_recipe
from ..runtime import check_labels, run_on_examples

__all__ = [
    "adopt",
    "default_recipe_for",
    "fit_data_shape",
    "fit_ids",
    "fit_input_shape",
    "fit_outputs",
    "sparsify_and_prune",
]

# optimiser steps a default recipe aims for in its sparsify stage, whatever the data size
_DEFAULT_SPARSIFY_STEPS = 3000
_MAX_DEFAULT_EPOCHS = 60
# how far (in μ and log σ together) a log-normal gate travels from its init (μ = 0, log σ = −5:
# SNR ≈ 150) to SNR 1; Adam moves a parameter by about the learning rate per step, so it takes
# about this / gate_lr steps at the full KL weight even where the data do not hold the unit
# (measured: 646 steps at gate_lr 1e-2 with the KL alone, μ −0.9 and log σ +0.8 at SNR 1)
_GATE_TRAVEL = 6.5


def adopt(model: nn.Module, dataset: Any) -> nn.Module:
    """Make a user's model something compressdrop can gate, save and export, on ``dataset``.

    Its ``arch`` record gets the data's input shape, and a model with no record (a pickled
    module) gets its dense structure as a ``torch.export`` program, so that its checkpoints
    rebuild without pickled code.
    """
    from ..programs import program_record

    shape = list(dataset.input_shape)
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        set_record(model, "arch", program_record(model, dataset.x_train[:2]))
    elif "input_shape" not in arch:
        set_record(model, "arch", {**arch, "input_shape": shape})
    return model


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The embedding that reads the model's token ids: a Hugging Face model's
    ``get_input_embeddings()``, else the largest (a position table is smaller than most
    vocabularies; where it is not, running the model says what does not fit)."""
    get = getattr(model, "get_input_embeddings", None)
    found = get() if callable(get) else None
    if isinstance(found, nn.Embedding):
        return found
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embeddings, key=lambda m: m.num_embeddings, default=None)


def fit_ids(model: nn.Module, dataset: Any) -> Any:
    """``dataset``, its inputs as token ids (int64) where ``model`` reads ids and the data hold
    whole numbers as floats (an ``.npz``'s integer ``x`` loads as float32); else as it is.

    Raises:
        InputError: a model that reads ids, and data of other numbers or ids past its vocabulary.
    """
    from ..gating import example_input_for

    where = f"data {dataset.name!r}"
    xs = (dataset.x_train, dataset.x_test)
    if example_input_for(model, batch=1).is_floating_point():
        return dataset
    if xs[0].is_floating_point():
        if not all(bool((x == x.round()).all() and (x >= 0).all()) for x in xs):
            raise InputError(
                f"the model reads token ids (integers) but {where} holds other numbers"
            )
        dataset = replace(dataset, x_train=xs[0].long(), x_test=xs[1].long())
    emb = _input_embedding(model)
    top = max(int(x.max()) for x in (dataset.x_train, dataset.x_test))
    if emb is not None and top >= emb.num_embeddings:
        tok = (getattr(dataset, "source", None) or {}).get("tokenizer")
        raise InputError(
            f"{where} has token ids up to {top} but the model's vocabulary (its embedding) has "
            f"{emb.num_embeddings}: use a model of vocab_size ≥ {top + 1} "
            + (
                f"(the ids of tokenizer {tok['path']}: is it the model's own?)"
                if tok
                else "(text: data are bytes, 256 ids, unless tokenizer= names the model's own)"
            )
        )
    return dataset


@torch.no_grad()
def fit_outputs(model: nn.Module, dataset: Any) -> Any:
    """Check, on two training examples, that ``model`` runs on ``dataset``'s inputs and gives an
    output for every class (or token) of its labels, before any training.

    Returns:
        ``dataset``, its inputs as token ids (int64) where the model reads ids and the data hold
        whole numbers as floats (an ``.npz``'s integer ``x`` loads as float32).

    Raises:
        InputError: inputs the model cannot take (floats or ids out of its vocabulary for a model
            that starts with an embedding, anything the model fails on), or a label at or above
            the model's number of outputs.
    """
    where = f"data {dataset.name!r}"
    dataset = fit_ids(model, dataset)
    emb = _input_embedding(model)
    bytes_ = "tokenizer" not in (getattr(dataset, "source", None) or {})
    if (
        emb is not None
        and emb.num_embeddings > 256
        and getattr(dataset, "task", "") == "lm"
        and bytes_
    ):
        warnings.warn(
            f"compressdrop: {where} gives bytes (ids 0-255) as tokens, not your tokenizer's: the "
            f"model (a vocabulary of {emb.num_embeddings}) is trained on them as its token ids, "
            "which overwrites what a pretrained model knows; add tokenizer=PATH to the text: "
            "data (the model's tokenizer.json, or the folder that holds it)",
            DataWarning,
            stacklevel=2,
        )
    logits = run_on_examples(model, dataset.x_train, where)
    per_label = tuple(dataset.y_train.shape[1:])  # () for a class per example
    if tuple(logits.shape[1:-1]) != per_label:
        raise InputError(
            f"the model gives outputs of shape {tuple(logits.shape[1:])} per example, but {where} "
            f"has labels of shape {per_label or '()'} per example"
            + (
                " (a language model gives one per position: use text: data)"
                if not per_label
                else ""
            )
        )
    for y in (dataset.y_train, dataset.y_test):
        check_labels(logits.shape[-1], y, where, setting="CLI --arch-arg ")
    return dataset


def fit_input_shape(model: nn.Module, shape: tuple[int, ...], what: str) -> None:
    """Check that inputs of ``shape`` fit ``model``'s recorded input shape; a model that records
    none (a pickled module, a bare state_dict) takes ``shape``.

    Args:
        model: the model.
        shape: one example's shape, without the batch dimension.
        what: where the shape comes from, for the error message (``"data 'digits'"``).

    Raises:
        InputError: the model records another shape.
    """
    arch = getattr(model, "arch", None)
    known = _recorded_shape(model)
    if known is not None and tuple(known) != tuple(shape):
        raise InputError(
            f"{what} has inputs of shape {tuple(shape)} but the model expects {tuple(known)}"
        )
    if known is None and isinstance(arch, Mapping):
        set_record(model, "arch", {**arch, "input_shape": list(shape)})
    elif known is None:
        set_record(model, "input_shape", tuple(shape))


def fit_data_shape(model: nn.Module, dataset: Any, what: str) -> Any:
    """:func:`fit_input_shape` for a data set: gray images read as (1, H, W) each (an ``.npz`` of
    (N, H, W), digits) are given without their channel axis to a model that records (H, W) (a
    ``.pt2`` exported on (batch, H, W)). Returns the data set, so changed or as it was."""
    known = _recorded_shape(model)
    shape = tuple(dataset.input_shape)
    if known is not None and len(shape) == 3 and shape[0] == 1 and tuple(known) == shape[1:]:
        dataset = replace(dataset, x_train=dataset.x_train[:, 0], x_test=dataset.x_test[:, 0])
        shape = shape[1:]
    fit_input_shape(model, shape, what)
    return dataset


def _recorded_shape(model: nn.Module) -> Any:
    """The input shape the model records (its ``arch``'s, else its own attribute), or None."""
    arch = getattr(model, "arch", None)
    return (
        arch.get("input_shape")
        if isinstance(arch, Mapping)
        else getattr(model, "input_shape", None)
    )


def default_recipe_for(dataset: Any, base: str | None = None) -> Recipe:
    """Log-normal gates with the sparsify stage sized to about 3,000 optimiser steps (between 2
    and 60 epochs), a fine-tune a third as long, no pretraining (the user's model is trained).
    The gates' settings come from ``base``: by default ``gpt-lognormal`` for a language model's
    data (its KL per token weighed by FLOPs, the heads' × 4, β = 64), else
    ``lenet300-lognormal``."""
    lm = getattr(dataset, "task", "classify") == "lm"
    r = load_recipe(base or ("gpt-lognormal" if lm else "lenet300-lognormal"))
    steps_per_epoch = max(1, -(-len(dataset.x_train) // r.data.batch_size))
    epochs = int(min(_MAX_DEFAULT_EPOCHS, max(2, round(_DEFAULT_SPARSIFY_STEPS / steps_per_epoch))))
    _warn_if_too_few_steps(r, len(dataset.x_train), steps_per_epoch, epochs)
    st = r.stages
    return r.replace(
        name="default",
        description=f"default recipe for a user's {'language ' if lm else ''}model "
        f"(the gates of {r.name}): log-normal gates, sparsify then fine-tune",
        stages=replace(
            st,
            pretrain=replace(st.pretrain, epochs=0),
            sparsify=replace(st.sparsify, epochs=epochs),
            finetune=replace(st.finetune, epochs=max(1, epochs // 3)),
        ),
    )


def _warn_if_too_few_steps(r: Recipe, n: int, steps_per_epoch: int, epochs: int) -> None:
    """A :class:`DataWarning` where the default recipe's sparsify stage, capped at 60 epochs,
    leaves fewer optimiser steps at the full KL weight than a gate needs to reach SNR 1 from its
    init (:data:`_GATE_TRAVEL` / ``gate_lr``): 38 images at batch 64 were one step per epoch, 60
    steps, and ResNet-18 ran 282 s to remove nothing."""
    kl, gate_lr = r.kl, r.stages.sparsify.gate_lr
    ramp = kl.delay + kl.warmup / 2  # epochs lost to the delay and the linear warm-up
    need = math.ceil(_GATE_TRAVEL / gate_lr)
    full = int(steps_per_epoch * max(0.0, epochs - ramp))
    if full >= need:
        return
    b = r.data.batch_size
    per_epoch = math.ceil(need / max(_MAX_DEFAULT_EPOCHS - ramp, 1.0))  # steps to fit in 60
    smaller = n // per_epoch
    batch = (
        f"a smaller batch (`data: {{batch_size: {smaller}}}` reaches that in "
        f"{_MAX_DEFAULT_EPOCHS} epochs)"
        if smaller >= 1
        else "a smaller batch"
    )
    warnings.warn(
        f"compressdrop: the default recipe leaves the gates too few optimiser steps to learn: "
        f"{n} training examples at batch size {b} are {steps_per_epoch} step(s) per epoch, and "
        f"its {epochs} sparsify epochs (at most {_MAX_DEFAULT_EPOCHS}) are "
        f"{steps_per_epoch * epochs} steps, about {full} at the full KL weight (its "
        f"{kl.warmup:g}-epoch warm-up counted as half); a log-normal gate needs about {need} such steps at "
        f"gate_lr {gate_lr:g} to fall from its initial SNR to 1, so expect few or no units "
        f"removed. Give more data, or a --recipe YAML with {batch} or more epochs "
        f"(`stages: {{sparsify: {{epochs: {math.ceil(need / steps_per_epoch + ramp)}}}}}`)",
        DataWarning,
        stacklevel=3,
    )


def sparsify_and_prune(
    model: nn.Module,
    dataset: Any,
    recipe: Recipe,
    *,
    device: str = "auto",
    progress: Callable[[dict], None] | None = None,
    factory: Factory | str | None = None,
    trust_code: bool = False,
    work_dir: str | Path | None = None,
    keep_gated: str | Path | None = None,
) -> nn.Module:
    """Train gates on a dense model, prune it, fine-tune it; return the slim model.

    The run's files (checkpoints, gated.pt) go to a temporary folder inside ``work_dir``;
    ``keep_gated`` names a file (on the same file system) that the gated model is moved to.
    """
    from ..training.runner import run_recipe

    adopt(model, dataset)
    program = "program" in cast(Mapping, model.arch)  # a record of a pickled module, or a .pt2's
    if program and keep_gated is not None and not isinstance(model, torch.fx.GraphModule):
        _check_gated_rebuilds(model, recipe, dataset.x_train[:2])
    if factory is None:  # the model in hand was built by its factory: the caller ran it already
        factory = cast(Mapping, model.arch).get("factory")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        result = run_recipe(
            recipe.replace(export=replace(recipe.export, onnx=False)),
            dataset,
            tmp,
            device=device,
            progress=progress,
            model=model,
            factory=factory,
            trust_code=trust_code,
        )
        assert result.slim_path is not None
        slim = load_model(result.slim_path, arch=factory, trust_code=trust_code)
        if keep_gated is not None and result.gated_path is not None:
            os.replace(result.gated_path, keep_gated)  # a whole file, or none
    set_record(slim, "compressdrop_report", result.report)
    return slim


def _check_gated_rebuilds(model: nn.Module, recipe: Recipe, x: Any) -> None:
    """Before training: the gated checkpoint of a pickled module rebuilds from its record (the
    dense program, gated again) with the parameters and buffers of the model trained, or
    ``--keep-gated`` is refused. Where the program's form of a block differs (a torchvision
    ViT's attention, whose heads a program does not show; ShuffleNetV2's shuffle), the file had
    been written and could not be loaded."""
    import copy

    from ..gating import attach
    from ..gating.record import gate_sites
    from ..programs import load_program

    kwargs = recipe.gates.attach_kwargs()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run's own attach says them
        gated = attach(copy.deepcopy(model), **kwargs, example_inputs=x)
        live = gated.state_dict()
        # the program just made of the model in hand: any operator it calls, gated where the
        # file's sites record will put its gates back (compressdrop._reattach)
        data = cast(Mapping, model.arch)["program"].numpy().tobytes()
        rebuilt = load_program(data, "the dense program", any_operator=True)
        layers = [n for gate in gate_sites(gated) for n in gate["layers"]]
        again = attach(rebuilt, **kwargs, example_inputs=x, only_sites=layers).state_dict()
    shapes = {k: tuple(v.shape) for k, v in live.items()}
    if shapes != {k: tuple(v.shape) for k, v in again.items()}:
        odd = (
            sorted(set(shapes).symmetric_difference(again))[:2]
            or [k for k in shapes if shapes[k] != tuple(again[k].shape)][:2]
        )
        raise InputError(
            f"--keep-gated: the gated model of a pickled {type(model).__name__} "
            f"would not load back (its blocks differ in the torch.export form compressdrop "
            f"records it as, e.g. {', '.join(odd)}); save the model with torch.export.save and "
            "prune that .pt2, or leave out --keep-gated"
        )
