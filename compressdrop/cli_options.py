"""The options of the ``compressdrop`` commands, declared once (see :mod:`compressdrop.cli`).

Each command's options are a tuple of click decorators applied in order with :func:`options`;
callbacks turn option text into values (``--arch-arg``'s pairs, ``--input-shape``, thresholds)
so that the commands receive data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .data import IMAGES_SPEC, TEXT_SPEC

__all__ = ["EVAL", "EXPORT", "PRUNE", "SWEEP", "TRAIN", "options"]

DATA_HELP = f"digits | fashion-mnist[:DIR] | FILE.npz | {IMAGES_SPEC} | {TEXT_SPEC}"

TRAINED_ON = " (default: the data a compressdrop checkpoint was trained on, else digits)"


def options(*decorators: Callable) -> Callable:
    """Apply click decorators in the order given (the first is the first ``--help`` line)."""

    def apply(fn: Callable) -> Callable:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


def _arch_args(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> dict:
    """``--arch-arg NAME=VALUE`` pairs; VALUE is JSON (``10``, ``true``, ``[1, 2]``) or a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.isidentifier():
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _shape(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{text!r} is not a shape like 3,32,32")
    return shape


def _floats(ctx: click.Context, param: click.Parameter, text: str | None) -> list | None:
    try:
        return [float(t) for t in text.split(",")] if text else None
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {text!r}") from None


def _data(default: str | None, help: str = DATA_HELP) -> Callable:
    return click.option("--data", "-d", default=default, show_default=bool(default), help=help)


def _output(help: str, suffixes: tuple[str, ...], folder: bool = False) -> Callable:
    """``--output FILE``; a suffix other than ``suffixes`` is a usage error (exit code 2).
    ``folder``: a name without a suffix is a folder to write (a Hugging Face model folder)."""

    def check(ctx: click.Context, param: click.Parameter, path: str) -> str:
        if not path.strip():
            raise click.BadParameter("an empty file name")
        if Path(path).suffix and Path(path).is_dir():
            raise click.BadParameter(f"{path} is a folder; name a file to write")
        if folder and not Path(path).suffix:
            return path.rstrip("/") or path
        if not path.endswith(suffixes):
            also = " or a folder name without a suffix" if folder else ""
            raise click.BadParameter(f"{path}: use a {', '.join(suffixes)} file name{also}")
        return path

    return click.option(
        "--output",
        "-o",
        required=True,
        type=click.Path(dir_okay=folder),
        callback=check,
        help=help,
    )


def _recipe(help: str) -> Callable:
    return click.option("--recipe", "-r", default=None, help=help)


SEED = click.option("--seed", type=int, default=None, help="Random seed (default: the recipe's).")
DEVICE = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train and evaluate.",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
MODEL = click.argument("model_path", metavar="MODEL", type=click.Path())
ARCH = click.option(
    "--arch",
    default=None,
    metavar="PKG.MODULE:FACTORY",
    help="The architecture's factory: needed for a bare state_dict, and your consent to call "
    "a factory that a checkpoint names (files may not choose code to run). A reference net's "
    "name (lenet300, lenet5, vgg, resnet, vit, ...) builds it, e.g. with "
    "--arch-arg input_shape=[1,8,8].",
)
ARCH_ARG = click.option(
    "--arch-arg",
    "arch_args",
    multiple=True,
    metavar="NAME=VALUE",
    callback=_arch_args,
    help="Keyword argument of the --arch factory, VALUE as JSON or a string (repeatable), "
    "e.g. --arch-arg num_classes=10.",
)
TRUST = click.option(
    "--trust-code",
    "--trust-pickle",
    "trust_code",
    is_flag=True,
    help="Trust the model file: unpickle a whole pickled module, call the factory it names, "
    "run any operator its .pt2 program calls (runs code from the file: trusted files only).",
)

TRAIN = (
    _recipe(
        "Recipe name (see `compressdrop recipes list`) or YAML file (default: "
        "lenet300-lognormal, said when used)."
    ),
    _data(None, DATA_HELP + " (default: the recipe's)"),
    click.option(
        "--out",
        "-o",
        type=click.Path(file_okay=False),
        default="runs/latest",
        show_default=True,
        help="Output folder: gated.pt, slim.pt, slim.onnx, slim.pt2, report.json.",
    ),
    click.option(
        "--resume", is_flag=True, help="Continue an interrupted run from OUT/checkpoint.pt."
    ),
    click.option(
        "--nproc",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Train with N processes on this machine (DistributedDataParallel; launches torchrun). "
        "Several machines: run `torchrun ... -m compressdrop train` on each.",
    ),
    click.option(
        "--precision",
        type=click.Choice(["fp32", "bf16"]),
        default=None,
        help="bf16: forward pass under torch.autocast(bfloat16); gate KL/SNR stay float32 "
        "(default: the recipe's, fp32).",
    ),
    click.option(
        "--compile",
        "compile_backend",
        is_flag=False,
        flag_value="inductor",
        default=None,
        metavar="[BACKEND]",
        help="Compile each training stage's forward pass with torch.compile (default backend: "
        "inductor; the recipe's `compile` key otherwise).",
    ),
    click.option(
        "--arch",
        default=None,
        metavar="PKG.MODULE:FACTORY",
        help="Your consent to the factory a recipe's model.arch names (or a factory to call "
        "instead); reference nets need none.",
    ),
    click.option(
        "--trust-code",
        is_flag=True,
        help="Trust the recipe: call whatever factory its model.arch names.",
    ),
    DEVICE,
    SEED,
    JSON,
)
PRUNE = (
    MODEL,
    _output(
        "Slim model to write: .pt, .pt2 (+ .onnx), .onnx, or a folder name without a suffix "
        "(a Hugging Face model's slim folder, which from_pretrained loads).",
        (".pt", ".pt2", ".onnx"),
        folder=True,
    ),
    click.option(
        "--threshold",
        "-t",
        type=float,
        default=None,
        help="SNR threshold (default: recipe / family default).",
    ),
    click.option(
        "--uniform/--free",
        default=None,
        help="Every layer of a stack keeps as many units: a standard config (Hugging Face "
        "folders need it wherever the layers would differ); or each its own (default: the "
        "recipe's prune.uniform).",
    ),
    _recipe(
        "Recipe: for a plain model how to sparsify, prune and fine-tune it; for a model with "
        "trained gates its prune settings (default: those it trained with)."
    ),
    _data(None, "Data for sparsifying a plain model: " + DATA_HELP),
    click.option(
        "--mc-samples",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Also write STEM-mc.pt (the slim model, its kept units keeping their learned "
        "noise) and STEM-mc.onnx (draws N Monte-Carlo samples per call); trained gates only.",
    ),
    click.option(
        "--keep-gated",
        is_flag=True,
        default=False,
        help="Also keep the model with its trained gates as STEM-gated.pt (for sweep, eval --mc, "
        "--mc-samples, pruning again at another threshold); a plain model with --data only.",
    ),
    ARCH,
    ARCH_ARG,
    TRUST,
    DEVICE,
    SEED,
    JSON,
)
EXPORT = (
    MODEL,
    _output(
        "File to write: .onnx or .pt2, or a folder name without a suffix (a Hugging Face "
        "model's folder, which from_pretrained loads).",
        (".onnx", ".pt2"),
        folder=True,
    ),
    click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)."),
    click.option(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        callback=_shape,
        help="One example's shape, for a model that does not record it (a state_dict, a pickle).",
    ),
    ARCH,
    ARCH_ARG,
    TRUST,
    JSON,
)
EVAL = (
    MODEL,
    _data(None, DATA_HELP + TRAINED_ON),
    click.option(
        "--mc",
        "mc_samples",
        type=click.IntRange(min=2),
        default=None,
        metavar="N",
        help="Monte-Carlo dropout: average N noisy passes (dropout and gates on, BatchNorm in eval) "
        "and report NLL, ECE, entropy and mutual information beside the deterministic net.",
    ),
    click.option(
        "--ood",
        default=None,
        metavar="DATA",
        help="With --mc: an out-of-distribution data set (its test split, resized to the model's "
        "input) for the AUROC of entropy and mutual information, e.g. digits for a Fashion-MNIST net.",
    ),
    ARCH,
    ARCH_ARG,
    TRUST,
    DEVICE,
    JSON,
)
SWEEP = (
    click.argument("model_path", metavar="CHECKPOINT", type=click.Path(dir_okay=False)),
    _data(None, DATA_HELP + TRAINED_ON),
    click.option(
        "--thresholds",
        "-t",
        default=None,
        metavar="T1,T2,...",
        callback=_floats,
        help="SNR thresholds (default: 10 quantiles of the model's SNRs plus the family "
        "default); a row at threshold 0, every unit kept, comes first as the reference.",
    ),
    click.option(
        "--out",
        "-o",
        type=click.Path(file_okay=False),
        default="runs/sweep",
        show_default=True,
        help="Folder for sweep.csv, sweep.json and sweep.png.",
    ),
    click.option(
        "--batch",
        type=click.IntRange(min=1),
        default=256,
        show_default=True,
        help="Batch size of the latency runs.",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="onnxruntime intra-op threads (default: its own).",
    ),
    click.option(
        "--uniform/--free",
        default=None,
        help="Every layer of a stack keeps as many units, or each its own (default: as the "
        "recipe the model trained with, as prune of it does).",
    ),
    ARCH,
    TRUST,
    DEVICE,
    JSON,
)
