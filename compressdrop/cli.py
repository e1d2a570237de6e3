"""The ``compressdrop`` command line: train, prune, export, eval, sweep and recipes.

Each command parses its options, calls one job of :mod:`compressdrop.workflows` and shows the
result through :mod:`compressdrop.reporting`. Exit codes: 0 success, 1 failure (bad input,
diverged training, a failed check), 2 usage error. Every reporting command takes ``--json`` for a
machine-readable result on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .cli_options import EVAL, EXPORT, JSON, PRUNE, SWEEP, TRAIN, options
from .reporting import one_line_warnings, printable

__all__ = ["main"]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``) as a KeyboardInterrupt: a command removes its temporary files."""


def _terminate(signum: int, frame: Any) -> None:
    import signal

    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated


class _Group(click.Group):
    """SIGTERM ends a command, cleaned up, with exit code 143 (click: "Aborted!", 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _Terminated:
            click.echo("terminated (SIGTERM)", err=True)
            raise SystemExit(143) from None


class _Failure(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def _guard(fn: Callable) -> Callable:
    """compressdrop's own errors and the file system's become one line and exit code 1; anything
    else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import CompressDropError

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (CompressDropError, OSError) as e:
            raise _Failure(printable(str(e))) from e

    return wrapper


def _need_arch(arch: str | None, arch_args: dict) -> None:
    if arch_args and arch is None:
        raise click.UsageError("--arch-arg needs --arch")


def _emit(as_json: bool, data: Any, text: Callable[[], Any]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        text()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressdrop")
def main() -> None:
    """Make neural networks smaller and faster with Bayesian dropout.

    \b
    Example (trains LeNet-300-100 on scikit-learn's digits, prunes, exports ONNX):
      compressdrop train --recipe lenet300-lognormal --data digits --out runs/demo
      compressdrop eval runs/demo/slim.onnx --data digits
    """
    # warnings as one line each (not the installed file's path and source line), for this command
    ctx = click.get_current_context()
    ctx.with_resource(one_line_warnings())
    import signal
    import threading

    from .training.distributed import launched_by_torchrun

    # not under torchrun, which stops its workers with SIGTERM and has its own teardown
    if threading.current_thread() is threading.main_thread() and not launched_by_torchrun():
        before = signal.signal(signal.SIGTERM, _terminate)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, before))


@main.command()
@options(*TRAIN)
@_guard
def train(
    recipe,
    data,
    out,
    resume,
    nproc,
    precision,
    compile_backend,
    arch,
    trust_code,
    device,
    seed,
    as_json,
):
    """Run a recipe end to end: train, sparsify, prune, fine-tune, export.

    Under torchrun (or with --nproc N) every process trains on its share of each global batch
    (the recipe's batch_size) and only rank 0 writes files and prints.

    \b
    Examples:
      compressdrop train --recipe lenet300-lognormal --data digits --out runs/demo
      compressdrop train --recipe lenet5-lognormal --nproc 2 --out runs/ddp
      torchrun --nproc-per-node 8 -m compressdrop train --recipe lenet5-lognormal --device cuda
    """
    from .reporting import console, progress_printer, run_summary
    from .training.distributed import launched_by_torchrun
    from .workflows import train as run_train

    if nproc > 1 and not launched_by_torchrun():
        return _launch_torchrun(nproc)
    try:
        result = run_train(
            recipe,
            data=data,
            out=out,
            resume=resume,
            seed=seed,
            precision=precision,
            compile=compile_backend,
            device=device,
            factory=arch,
            trust_code=trust_code,
            progress=progress_printer(console(), as_json),
        )
    except KeyboardInterrupt as e:  # Ctrl-C, kill: say how to go on (click said "Aborted!")
        from pathlib import Path

        if Path(out, "checkpoint.pt").is_file():
            said = "continue with the same command and --resume"
        else:
            said = "no epoch ended, so there is no checkpoint to resume from"
        console().print(f"interrupted; {said} ({out})", highlight=False)
        raise SystemExit(143 if isinstance(e, _Terminated) else 130) from None
    if result is None:  # not rank 0
        return
    files = {"gated": result.gated_path, "slim": result.slim_path, "onnx": result.onnx_path}
    files["pt2"] = result.out_dir / "slim.pt2" if "pt2_bytes" in result.report else None
    files["report"] = result.out_dir / "report.json"
    data_out = {**result.report, "files": {k: str(v) if v else None for k, v in files.items()}}
    _emit(as_json, data_out, lambda: (run_summary(result.report), print(f"files in {out}/")))


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under ``torchrun --standalone --nproc-per-node N``."""
    import subprocess

    args = list(sys.argv[1:])
    for i, a in enumerate(args):  # drop --nproc N / --nproc=N
        if a == "--nproc" or a.startswith("--nproc="):
            del args[i : i + (2 if a == "--nproc" else 1)]
            break
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as before: torchrun goes on with its workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    code = subprocess.call([*cmd, f"--nproc-per-node={nproc}", "-m", "compressdrop.cli", *args])
    if code:
        raise _Failure(f"torchrun exited with code {code} (see the messages above)")


@main.command()
@options(*PRUNE)
@_guard
def prune(
    model_path,
    output,
    threshold,
    uniform,
    recipe,
    data,
    mc_samples,
    keep_gated,
    arch,
    arch_args,
    trust_code,
    device,
    seed,
    as_json,
):
    """Prune a model: directly if it has trained gates, else sparsify it on data first.

    MODEL is a compressdrop checkpoint, a torch.export program (.pt2), a Hugging Face
    causal-LM folder (config.json + safetensors), a state_dict (torch.save or safetensors; with
    --arch and --arch-arg) or, with --trust-pickle, a whole pickled module. OUTPUT's suffix picks the format: .pt
    (compressdrop checkpoint), .pt2 (torch.export program, plus .onnx beside it), .onnx, or none:
    a Hugging Face folder (checked by reloading it with from_pretrained).

    \b
    Examples:
      compressdrop prune runs/demo/gated.pt -o slim.pt --threshold 1.0
      compressdrop prune runs/demo/gated.pt -o slim.pt --mc-samples 30
      compressdrop prune model.pt2 --data my.npz -o slim.pt2 --keep-gated
      compressdrop prune model.pt --trust-pickle --data images:photos,size=32 -o slim.pt2
      compressdrop prune my-llama/ --data text:corpus/,context=256 --recipe gpt-lognormal \\
          --uniform -o my-llama-slim
      compressdrop prune weights.pt --arch torchvision.models:resnet18 \\
          --arch-arg num_classes=10 --data my.npz -o slim.pt2
    """
    from .reporting import console, progress_printer, prune_text
    from .workflows import prune_file

    _need_arch(arch, arch_args)
    res = prune_file(
        model_path,
        output,
        threshold=threshold,
        uniform=uniform,
        recipe=recipe,
        data=data,
        arch=arch,
        arch_kwargs=arch_args,
        trust_code=trust_code,
        device=device,
        seed=seed,
        mc_samples=mc_samples,
        keep_gated=keep_gated,
        progress=progress_printer(console(), as_json),
    )
    _emit(as_json, {"output": output, **res.to_dict()}, lambda: prune_text(res, model_path, output))


@main.command()
@options(*EXPORT)
@_guard
def export(model_path, output, opset, input_shape, arch, arch_args, trust_code, as_json):
    """Export a model to ONNX (checked in onnxruntime against PyTorch) or, with an OUTPUT ending
    in .pt2, to a torch.export program (checked by loading it back) that loads with
    torch.export.load alone; a Hugging Face model, with an OUTPUT without a suffix, to a folder
    that from_pretrained loads (checked by reloading it).

    \b
    Examples:
      compressdrop export runs/demo/slim.pt -o slim.onnx
      compressdrop export runs/demo/slim.pt -o slim.pt2
      compressdrop export runs/gpt/slim.pt -o gpt-slim
    """
    from .workflows import export_file

    _need_arch(arch, arch_args)
    res = export_file(
        model_path,
        output,
        opset=opset,
        input_shape=input_shape,
        arch=arch,
        arch_kwargs=arch_args,
        trust_code=trust_code,
    )
    check = (
        "reloaded, it matches"
        if "provider" not in res
        else f"onnxruntime ({res['provider']}) matches"
    )  # a folder: reloaded with from_pretrained
    err = max(res["max_rel_error"].values())
    text = f"wrote {output} ({res['bytes']:,} bytes); {check} PyTorch, max relative error {err:.2e}"
    _emit(as_json, res, lambda: click.echo(text))


@main.command(name="eval")
@options(*EVAL)
@_guard
def eval_cmd(model_path, data, mc_samples, ood, arch, arch_args, trust_code, device, as_json):
    """Evaluate a model (.pt, .pt2, .onnx, a Hugging Face folder) on a data set's test split:
    accuracy, NLL, size (a gated file's gates counted apart, as gate_params). Without --data:
    what a checkpoint was trained on, else digits.

    With --mc N: Monte-Carlo uncertainty (a checkpoint with dropout or gates, a slim one that
    kept its noise, or the sampling graph STEM-mc.onnx that prune --mc-samples writes), and
    with --ood DATA its out-of-distribution AUROC.

    \b
    Examples:
      compressdrop eval runs/demo/slim.onnx --data digits
      compressdrop eval runs/fm/gated.pt --data fashion-mnist --mc 30 --ood digits
      compressdrop eval runs/fm/slim-mc.onnx --data fashion-mnist --mc 30
    """
    from .reporting import eval_text
    from .workflows import evaluate_file

    _need_arch(arch, arch_args)
    if ood is not None and mc_samples is None:
        raise click.UsageError("--ood needs --mc N")
    res = evaluate_file(
        model_path,
        data,
        mc_samples=mc_samples,
        ood=ood,
        arch=arch,
        arch_kwargs=arch_args,
        trust_code=trust_code,
        device=device,
        announce=None if as_json else lambda s: click.echo(printable(s), err=True),
    )
    _emit(as_json, res, lambda: click.echo(printable(eval_text(res))))


@main.command()
@options(*SWEEP)
@_guard
def sweep(
    model_path, data, thresholds, out, batch, threads, uniform, arch, trust_code, device, as_json
):
    """Accuracy against size over SNR thresholds, from one trained gated checkpoint.

    Each threshold gives a slim model; its accuracy and NLL (PyTorch on DEVICE; on byte-level
    text, bits per byte), parameters, FLOPs, ONNX bytes and onnxruntime latency at --batch are
    measured. Writes a table, CSV, JSON and a PNG plot with the Pareto front.

    \b
    Example:
      compressdrop sweep runs/demo/gated.pt --data digits --out runs/demo/sweep
    """
    from .reporting import console, sweep_line, sweep_text
    from .workflows import sweep_file

    err = console()
    res = sweep_file(
        model_path,
        data,
        thresholds=thresholds,
        out=out,
        batch=batch,
        threads=threads,
        uniform=uniform,
        arch=arch,
        trust_code=trust_code,
        device=device,
        announce=None if as_json else lambda s: click.echo(printable(s), err=True),
        progress=None
        if as_json
        else lambda r, label: err.print(sweep_line(r, label), markup=False),
    )
    _emit(
        as_json,
        {k: res[k] for k in ("rows", "dense", "files", "data")},
        lambda: sweep_text(res, batch, threads),
    )


@main.group()
def recipes() -> None:
    """List and show the shipped recipes."""


@recipes.command(name="list")
@JSON
@_guard
def recipes_list(as_json: bool) -> None:
    """List the shipped recipes with their descriptions."""
    from .recipes import list_recipes, load_recipe

    items = {n: load_recipe(n).description for n in list_recipes()}
    _emit(as_json, items, lambda: click.echo("\n".join(f"{n:24s} {d}" for n, d in items.items())))


@recipes.command(name="show")
@click.argument("name")
@_guard
def recipes_show(name: str) -> None:
    """Print a recipe as YAML (a shipped name or a file)."""
    from .recipes import dump_recipe, load_recipe

    click.echo(dump_recipe(load_recipe(name)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
