"""The ``compressdrop`` command line: train, prune, export, eval and recipes.

Exit codes: 0 success, 1 failure (bad input, diverged training, a failed check), 2 usage error.
Every reporting command takes ``--json`` for a machine-readable result on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

__all__ = ["main"]


class _Failure(click.ClickException):
    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def _errors() -> tuple[type[BaseException], ...]:
    """What the CLI reports in one line: compressdrop's own errors and the file system's. Anything
    else is a bug and keeps its traceback."""
    from .errors import CompressDropError

    return (CompressDropError, OSError)


def _guard(fn: Callable) -> Callable:
    """Turn the library's errors into a one-line message and exit code 1 (no stack trace)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except _errors() as e:
            raise _Failure(str(e)) from e

    return wrapper


def _emit(as_json: bool, data: dict[str, Any], text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        text()


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise _Failure(f"cannot write {path}: directory {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK):
        raise _Failure(f"cannot write {path}: directory {parent} is not writable")


def _data(spec: str):
    from .data import load_dataset

    return load_dataset(spec)


def _arch_kwargs(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--arch-arg NAME=VALUE`` pairs; VALUE is JSON (``10``, ``true``, ``[1, 2]``) or a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.isidentifier():
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--arch-arg")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _load(path: str, arch: str | None, trust_code: bool, arch_args: tuple[str, ...] = ()):
    from .checkpoint import load_model

    if arch_args and arch is None:
        raise click.UsageError("--arch-arg needs --arch")
    return load_model(path, arch=arch, arch_kwargs=_arch_kwargs(arch_args), trust_code=trust_code)


def _dense_reference(path: str, dataset: str) -> dict | None:
    """The dense model's test metrics that ``train`` recorded in a gated checkpoint, if they were
    measured on ``dataset``."""
    from .checkpoint import load_checkpoint

    meta = load_checkpoint(path).get("meta") or {}
    dense = meta.get("dense")
    return dense if isinstance(dense, dict) and dense.get("dataset") == dataset else None


def _check_shape(model, dataset) -> None:
    """The data must fit the model's recorded input shape; a model without one takes the data's."""
    _give_shape(model, tuple(dataset.input_shape), f"data {dataset.name!r}")


def _give_shape(model, shape: tuple[int, ...], what: str) -> None:
    arch = getattr(model, "arch", None)
    known = (
        arch.get("input_shape") if isinstance(arch, dict) else getattr(model, "input_shape", None)
    )
    if known is not None and tuple(known) != tuple(shape):
        raise _Failure(
            f"{what} has inputs of shape {tuple(shape)} but the model expects {tuple(known)}"
        )
    if known is None and isinstance(arch, dict):
        model.arch = {**arch, "input_shape": list(shape)}
    elif known is None:
        model.input_shape = tuple(shape)


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(
            f"{text!r} is not a shape like 3,32,32", param_hint="--input-shape"
        )
    return shape


SEED = click.option("--seed", type=int, default=None, help="Random seed (default: the recipe's).")
DEVICE = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train and evaluate.",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
ARCH = click.option(
    "--arch",
    default=None,
    metavar="PKG.MODULE:FACTORY",
    help="The architecture's factory: needed for a bare state_dict, and your consent to call "
    "a factory that a checkpoint names (files may not choose code to run).",
)
ARCH_ARG = click.option(
    "--arch-arg",
    "arch_args",
    multiple=True,
    metavar="NAME=VALUE",
    help="Keyword argument of the --arch factory, VALUE as JSON or a string (repeatable), "
    "e.g. --arch-arg num_classes=10.",
)
TRUST = click.option(
    "--trust-code",
    "--trust-pickle",
    "trust_code",
    is_flag=True,
    help="Trust the model file: unpickle a whole pickled module, call the factory it names "
    "(runs code from the file: trusted files only).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressdrop")
def main() -> None:
    """Make neural networks smaller and faster with Bayesian dropout.

    \b
    Example (trains LeNet-300-100 on scikit-learn's digits, prunes, exports ONNX):
      compressdrop train --recipe lenet300-lognormal --data digits --out runs/demo
      compressdrop eval runs/demo/slim.onnx --data digits
    """


def _progress_printer(console, as_json: bool) -> Callable[[dict], None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=as_json or not console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def on_event(ev: dict) -> None:
        if ev["event"] == "stage":
            if not progress.live.is_started:
                progress.start()
            if ev["epochs"]:
                tasks[ev["stage"]] = progress.add_task(ev["stage"], total=ev["epochs"], info="")
        elif ev["event"] == "epoch":
            info = f"loss {ev['loss']:.4f} val acc {ev['val_accuracy']:.4f}"
            if "units_kept" in ev:
                info += f" kl {ev['kl']:.4f} units {ev['units_kept']}/{ev['units_total']}"
            task = tasks.get(ev["stage"])
            if task is not None:
                progress.update(task, completed=ev["epoch"], info=info)
            if not console.is_terminal and not as_json:
                console.print(f"{ev['stage']} {ev['epoch']}/{ev['epochs']}: {info}")
        elif ev["event"] == "pruned" and not as_json:
            console.print(f"pruned: {ev['architecture']} (val acc {ev['val_accuracy']:.4f})")
        elif ev["event"] == "done" and progress.live.is_started:
            progress.stop()

    return on_event


def _summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{report['recipe']} on {report['dataset']} ({report['device']})")
    for col in ("model", "test acc", "test NLL", "params", "FLOPs", "units"):
        t.add_column(col, justify="right")
    d, s = report["dense"], report["slim"]
    acc = f"{d['test_accuracy']:.4f}" if "test_accuracy" in d else "—"
    nll = f"{d['test_nll']:.4f}" if "test_nll" in d else "—"
    t.add_row(
        "dense", acc, nll, f"{d['params']:,}", f"{d['flops']:,}", report["architecture_before"]
    )
    t.add_row(
        "slim",
        f"{s['test_accuracy']:.4f}",
        f"{s['test_nll']:.4f}",
        f"{s['params']:,}",
        f"{s['flops']:,}",
        report["architecture_after"],
    )
    from rich.console import Console

    console = Console()
    console.print(t)
    console.print(
        f"params ×{report['params_reduction']:.2f} fewer, FLOPs ×{report['flops_reduction']:.2f} "
        f"fewer; wall time {report['wall_seconds']:.1f} s"
    )


@main.command()
@click.option(
    "--recipe",
    "-r",
    default=None,
    help="Recipe name (see `compressdrop recipes list`) or YAML file.",
)
@click.option(
    "--data",
    "-d",
    default=None,
    help="digits | fashion-mnist[:DIR] | FILE.npz | images:DIR[,size=HxW] (default: the recipe's).",
)
@click.option(
    "--out",
    "-o",
    "out",
    type=click.Path(file_okay=False),
    default="runs/latest",
    show_default=True,
    help="Output folder: gated.pt, slim.pt, slim.onnx, report.json.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT/checkpoint.pt.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train with N processes on this machine (DistributedDataParallel; launches torchrun). "
    "Several machines: run `torchrun ... -m compressdrop train` on each.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="bf16: forward pass under torch.autocast(bfloat16); gate KL/SNR stay float32 "
    "(default: the recipe's, fp32).",
)
@click.option(
    "--arch",
    default=None,
    metavar="PKG.MODULE:FACTORY",
    help="Your consent to the factory a recipe's model.arch names (or a factory to call "
    "instead); reference nets need none.",
)
@click.option(
    "--trust-code",
    is_flag=True,
    help="Trust the recipe: call whatever factory its model.arch names.",
)
@DEVICE
@SEED
@JSON
@_guard
def train(
    recipe, data, out, resume, nproc, precision, arch, trust_code, device, seed, as_json
) -> None:
    """Run a recipe end to end: train, sparsify, prune, fine-tune, export.

    Under torchrun (or with --nproc N) every process trains on its share of each global batch
    (the recipe's batch_size) and only rank 0 writes files and prints.

    \b
    Examples:
      compressdrop train --recipe lenet300-lognormal --data digits --out runs/demo
      compressdrop train --recipe lenet5-lognormal --nproc 2 --out runs/ddp
      torchrun --nproc-per-node 8 -m compressdrop train --recipe lenet5-lognormal --device cuda
    """
    from .recipes import DEFAULT_RECIPE, load_recipe
    from .training.distributed import from_env, launched_by_torchrun, shutdown
    from .training.runner import TrainingDiverged, run_recipe

    if nproc > 1 and not launched_by_torchrun():
        _launch_torchrun(nproc)
        return
    r = load_recipe(recipe or DEFAULT_RECIPE)
    if seed is not None:
        r = r.replace(seed=seed)
    if precision is not None:
        r = r.replace(precision=precision)
    if data is not None:
        r = r.override({"data.name": data})
    ds = _data(r.data.name)
    console = _console()
    on_event = _progress_printer(console, as_json)
    clean = False  # every rank ends the same way: finished, or diverged at the same agreed step
    try:
        dist, device = from_env(device)
        result = run_recipe(
            r,
            ds,
            out,
            device=device,
            resume=resume,
            progress=on_event,
            dist=dist,
            factory=arch,
            trust_code=trust_code,
        )
        clean = True
    except TrainingDiverged:
        clean = True
        raise
    finally:
        on_event({"event": "done"})
        shutdown(clean=clean)
    if not dist.is_main:
        return
    files = {
        "gated": result.gated_path,
        "slim": result.slim_path,
        "onnx": result.onnx_path,
        "report": result.out_dir / "report.json",
    }
    _emit(
        as_json,
        {**result.report, "files": {k: str(v) if v else None for k, v in files.items()}},
        lambda: (_summary(result.report), click.echo(f"files in {result.out_dir}/")),
    )


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under ``torchrun --standalone --nproc-per-node N``."""
    import subprocess

    args = list(sys.argv[1:])
    for i, a in enumerate(args):  # drop --nproc N / --nproc=N
        if a == "--nproc":
            del args[i : i + 2]
            break
        if a.startswith("--nproc="):
            del args[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "compressdrop.cli", *args]
    code = subprocess.call(cmd)
    if code:
        raise _Failure(f"torchrun exited with code {code} (see the messages above)")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Slim model file to write.",
)
@click.option(
    "--threshold",
    "-t",
    type=float,
    default=None,
    help="SNR threshold (default: recipe / family default).",
)
@click.option(
    "--recipe", "-r", default=None, help="Recipe for a plain model (sparsify, prune, fine-tune)."
)
@click.option(
    "--data",
    "-d",
    default=None,
    help="Data for sparsifying a plain model: digits | FILE.npz | images:DIR[,size=HxW] | ...",
)
@ARCH
@ARCH_ARG
@TRUST
@DEVICE
@SEED
@JSON
@_guard
def prune(
    model_path, output, threshold, recipe, data, arch, arch_args, trust_code, device, seed, as_json
) -> None:
    """Prune a model: directly if it has trained gates, else sparsify it on data first.

    MODEL is a compressdrop checkpoint, a torch.export program (.pt2), a state_dict (with
    --arch and --arch-arg) or, with --trust-pickle, a whole pickled module. OUTPUT's suffix picks
    the format: .pt (compressdrop checkpoint), .pt2 (torch.export program, plus .onnx beside it)
    or .onnx.

    \b
    Examples:
      compressdrop prune runs/demo/gated.pt -o slim.pt --threshold 1.0
      compressdrop prune model.pt2 --data my.npz -o slim.pt2
      compressdrop prune model.pt --trust-pickle --data images:photos,size=32 -o slim.pt2
      compressdrop prune weights.pt --arch torchvision.models:resnet18 \\
          --arch-arg num_classes=10 --data my.npz -o slim.pt2
    """
    from .gating import example_input_for, is_gated
    from .pruning import prune as prune_model
    from .workflows import SLIM_FORMATS, adopt, default_recipe_for, sparsify_and_prune, write_slim

    out = Path(output)
    if out.suffix not in SLIM_FORMATS:
        raise click.BadParameter(
            f"{out}: use a .pt, .pt2 or .onnx file name", param_hint="--output"
        )
    _check_writable(out)
    model = _load(model_path, arch, trust_code, arch_args)
    recipe_dict = (getattr(model, "compressdrop_meta", {}) or {}).get("recipe")
    if is_gated(model):
        slim = prune_model(model, threshold)
    else:
        from .recipes import load_recipe

        if data is None:
            raise _Failure(
                f"{model_path} has no trained gates: pass --data (and --recipe) to sparsify it first"
            )
        ds = _data(data)
        _check_shape(model, ds)
        adopt(model, ds)
        r = load_recipe(recipe) if recipe else default_recipe_for(ds)
        if seed is not None:
            r = r.replace(seed=seed)
        if threshold is not None:
            r = r.replace(prune=replace(r.prune, threshold=threshold))
        if not recipe and not as_json:
            st = r.stages
            click.echo(
                f"recipe: default for your model ({r.gates.family} gates, KL weight β = "
                f"{r.kl.beta:g}, sparsify {st.sparsify.epochs} epochs, fine-tune "
                f"{st.finetune.epochs}, for {len(ds.x_train):,} training examples); "
                "choose another with --recipe",
                err=True,
            )
        on_event = _progress_printer(_console(), as_json)
        try:
            slim = sparsify_and_prune(
                model,
                ds,
                r,
                device=device,
                progress=on_event,
                factory=arch,
                trust_code=trust_code,
                work_dir=out.resolve().parent,
            )
        finally:
            on_event({"event": "done"})
        recipe_dict = r.to_dict()
    files = write_slim(slim, out, example_input_for(slim, batch=2), recipe=recipe_dict)
    rep = slim.prune_report
    data_out = {
        "output": str(out),
        "files": {k: str(v) for k, v in files.paths.items()},
        "report": getattr(slim, "compressdrop_report", None),
        "architecture": rep.architecture(),
        "threshold": rep.threshold,
        "layers": [vars(layer) for layer in rep.layers],
        "max_rel_error": rep.max_rel_error,
    }

    def text() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"pruned {model_path} → {out}")
        for col in ("layer", "units before", "units after", "threshold"):
            t.add_column(col, justify="right")
        for layer in rep.layers:
            t.add_row(layer.name, str(layer.before), str(layer.after), f"{layer.threshold:g}")
        Console().print(t)
        summary = getattr(slim, "compressdrop_report", None)
        if summary is not None:  # sparsified here: the dense and slim model on the test split
            _summary(summary)
        for kind, path in files.paths.items():
            err = files.max_rel_error.get(kind)
            check = f" (checked: max relative error {err:.1e})" if err is not None else ""
            click.echo(f"wrote {path}{check}")

    _emit(as_json, data_out, text)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write: .onnx or .pt2.",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option(
    "--input-shape",
    default=None,
    metavar="C,H,W",
    help="One example's shape, for a model that does not record it (a state_dict, a pickle).",
)
@ARCH
@ARCH_ARG
@TRUST
@JSON
@_guard
def export(model_path, output, opset, input_shape, arch, arch_args, trust_code, as_json) -> None:
    """Export a model to ONNX (checked in onnxruntime against PyTorch) or, with an OUTPUT ending
    in .pt2, to a torch.export program (checked by loading it back) that loads with
    torch.export.load alone.

    \b
    Examples:
      compressdrop export runs/demo/slim.pt -o slim.onnx
      compressdrop export runs/demo/slim.pt -o slim.pt2
    """
    from .export import export_onnx
    from .export.program import export_program
    from .gating import example_input_for

    out = Path(output)
    if out.suffix not in (".onnx", ".pt2"):
        raise click.BadParameter(f"{out}: use a .onnx or .pt2 file name", param_hint="--output")
    _check_writable(out)
    shape = _shape(input_shape)
    model = _load(model_path, arch, trust_code, arch_args)
    if shape is not None:
        _give_shape(model, shape, "--input-shape")
    x = example_input_for(model, batch=2)
    if out.suffix == ".pt2":
        prog = export_program(model, x, out)
        _emit(
            as_json,
            {"output": str(out), "bytes": prog.bytes, "max_rel_error": prog.max_rel_error},
            lambda: click.echo(
                f"wrote {out} ({prog.bytes:,} bytes); reloaded, it matches PyTorch, max relative "
                f"error {max(prog.max_rel_error.values()):.2e}"
            ),
        )
        return
    report = export_onnx(model, x, out, metadata={"source": Path(model_path).name}, opset=opset)
    data = {
        "output": str(out),
        "bytes": report.bytes,
        "provider": report.provider,
        "max_rel_error": report.max_rel_error,
        "opset": report.opset,
    }
    _emit(
        as_json,
        data,
        lambda: click.echo(
            f"wrote {out} ({report.bytes:,} bytes); onnxruntime ({report.provider}) matches PyTorch, "
            f"max relative error {max(report.max_rel_error.values()):.2e}"
        ),
    )


@main.command(name="eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "-d",
    default="digits",
    show_default=True,
    help="digits | fashion-mnist[:DIR] | FILE.npz | images:DIR[,size=HxW][,channels=1|3]",
)
@click.option(
    "--mc",
    "mc_samples",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Monte-Carlo dropout: average N noisy passes (dropout and gates on, BatchNorm in eval) "
    "and report NLL, ECE, entropy and mutual information beside the deterministic net.",
)
@click.option(
    "--ood",
    default=None,
    metavar="DATA",
    help="With --mc: an out-of-distribution data set (its test split, resized to the model's "
    "input) for the AUROC of entropy and mutual information, e.g. digits for a Fashion-MNIST net.",
)
@ARCH
@ARCH_ARG
@TRUST
@DEVICE
@JSON
@_guard
def eval_cmd(
    model_path, data, mc_samples, ood, arch, arch_args, trust_code, device, as_json
) -> None:
    """Evaluate a model (.pt or .onnx) on a data set's test split: accuracy, NLL, size.

    With --mc N (PyTorch checkpoints with dropout or gates): Monte-Carlo uncertainty, and with
    --ood DATA its out-of-distribution AUROC.

    \b
    Examples:
      compressdrop eval runs/demo/slim.onnx --data digits
      compressdrop eval runs/fm/gated.pt --data fashion-mnist --mc 30 --ood digits
    """
    ds = _data(data)
    if ood is not None and mc_samples is None:
        raise click.UsageError("--ood needs --mc N")
    if mc_samples is not None and str(model_path).endswith(".onnx"):
        raise click.UsageError(
            "--mc needs a PyTorch checkpoint: an ONNX export is the deterministic eval-mode graph"
        )
    if str(model_path).endswith(".onnx"):
        from .evaluation.onnx_eval import evaluate_onnx

        res = evaluate_onnx(model_path, ds.x_test, ds.y_test, device=device)
    else:
        from .evaluation.metrics import evaluate
        from .evaluation.model_size import count_flops, count_params
        from .gating import example_input_for
        from .runtime import resolve_device

        model = _load(model_path, arch, trust_code, arch_args)
        _check_shape(model, ds)
        dev = resolve_device(device)
        model.to(dev)
        m = evaluate(model, ds.x_test, ds.y_test)
        x = example_input_for(model, batch=1)
        res = {
            "model": str(model_path),
            "data": ds.name,
            "n": m.n,
            "accuracy": m.accuracy,
            "nll": m.nll,
            "params": count_params(model),
            "flops": count_flops(model, x),
            "device": str(dev),
        }
        if mc_samples is not None:
            from .uncertainty import mc_evaluate, resize_images

            x_ood = None
            if ood is not None:
                x_ood = resize_images(_data(ood).x_test, tuple(ds.input_shape))
            try:
                res["mc"] = mc_evaluate(model, ds.x_test, ds.y_test, mc_samples, x_ood)
            except ValueError as e:
                raise _Failure(f"{model_path}: {e}") from None
            if ood is not None:
                res["mc"]["ood_data"] = ood

    def line(d: dict) -> str:
        return "  ".join(
            f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in d.items()
            if not isinstance(v, dict)
        )

    _emit(
        as_json,
        res,
        lambda: click.echo(
            line(res) + (f"\nMonte-Carlo: {line(res['mc'])}" if "mc" in res else "")
        ),
    )


@main.command()
@click.argument("model_path", metavar="CHECKPOINT", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "-d",
    default="digits",
    show_default=True,
    help="digits | fashion-mnist[:DIR] | FILE.npz | images:DIR[,size=HxW][,channels=1|3]",
)
@click.option(
    "--thresholds",
    "-t",
    default=None,
    metavar="T1,T2,...",
    help="SNR thresholds (default: 10 quantiles of the model's SNRs plus the family default).",
)
@click.option(
    "--out",
    "-o",
    "out",
    type=click.Path(file_okay=False),
    default="runs/sweep",
    show_default=True,
    help="Folder for sweep.csv, sweep.json and sweep.png.",
)
@click.option(
    "--batch", type=int, default=256, show_default=True, help="Batch size of the latency runs."
)
@click.option(
    "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)."
)
@ARCH
@TRUST
@DEVICE
@JSON
@_guard
def sweep(
    model_path, data, thresholds, out, batch, threads, arch, trust_code, device, as_json
) -> None:
    """Accuracy against size over SNR thresholds, from one trained gated checkpoint.

    Each threshold gives a slim model; its accuracy and NLL (PyTorch on DEVICE), parameters,
    FLOPs, ONNX bytes and onnxruntime latency at --batch are measured. Writes a table, CSV, JSON
    and a PNG plot with the Pareto front.

    \b
    Example:
      compressdrop sweep runs/demo/gated.pt --data digits --out runs/demo/sweep
    """
    from .evaluation.sweep import sweep as run_sweep
    from .evaluation.sweep import write_sweep
    from .gating import is_gated

    model = _load(model_path, arch, trust_code)
    if not is_gated(model):
        raise _Failure(
            f"{model_path} has no trained gates; sweep needs a gated checkpoint (train's gated.pt)"
        )
    ds = _data(data)
    _check_shape(model, ds)
    try:
        thr = [float(t) for t in thresholds.split(",")] if thresholds else None
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {thresholds!r}") from None
    console = _console()
    rows = run_sweep(
        model,
        ds.x_test,
        ds.y_test,
        thr,
        device=device,
        latency_batch=batch,
        threads=threads,
        progress=None
        if as_json
        else lambda r: console.print(
            f"threshold {r.threshold:.4g}: {r.architecture} acc {r.accuracy:.4f}"
        ),
    )
    dense = _dense_reference(model_path, ds.name)
    paths = write_sweep(rows, out, title=f"{Path(model_path).name} on {ds.name}", dense=dense)

    def text() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(
            title=f"sweep of {model_path} on {ds.name} ({rows[0].device}, onnxruntime "
            f"{rows[0].provider}, batch {batch}, threads {threads or 'default'})"
        )
        for col in (
            "threshold",
            "units",
            "test acc",
            "NLL",
            "params",
            "FLOPs",
            "ONNX bytes",
            "latency ms",
            "Pareto",
        ):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(
                f"{r.threshold:.4g}",
                r.architecture,
                f"{r.accuracy:.4f}",
                f"{r.nll:.4f}",
                f"{r.params:,}",
                f"{r.flops:,}",
                f"{r.onnx_bytes:,}",
                f"{r.latency_ms:.3f}",
                "*" if r.pareto else "",
            )
        Console().print(t)
        if dense is not None:
            click.echo(
                f"dense model before gating: test acc {dense['test_accuracy']:.4f}, "
                f"{dense['params']:,} params, {dense['flops']:,} FLOPs"
            )
        click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")

    from dataclasses import asdict

    _emit(
        as_json,
        {
            "rows": [asdict(r) for r in rows],
            "dense": dense,
            "files": {k: str(v) for k, v in paths.items()},
        },
        text,
    )


@main.group()
def recipes() -> None:
    """List and show the shipped recipes."""


@recipes.command(name="list")
@JSON
@_guard
def recipes_list(as_json) -> None:
    """List the shipped recipes with their descriptions."""
    from .recipes import list_recipes, load_recipe

    items = {n: load_recipe(n).description for n in list_recipes()}
    _emit(as_json, items, lambda: [click.echo(f"{n:24s} {d}") for n, d in items.items()])


@recipes.command(name="show")
@click.argument("name")
@_guard
def recipes_show(name) -> None:
    """Print a recipe as YAML (a shipped name or a file)."""
    from .recipes import dump_recipe, load_recipe

    click.echo(dump_recipe(load_recipe(name)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
