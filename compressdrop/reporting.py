"""How the CLI shows its results: progress lines, tables (rich) and one-line summaries.

Every function takes the plain data a :mod:`compressdrop.workflows` job returned; none computes
anything. Progress and tables go to stderr and stdout as noted, so ``--json`` output stays clean.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "console",
    "eval_text",
    "one_line_warnings",
    "printable",
    "progress_printer",
    "prune_text",
    "run_summary",
    "sweep_line",
    "sweep_text",
    "written_text",
]


def console(stderr: bool = True) -> Any:
    """A rich console on stderr (progress) or stdout (tables); where it is not a terminal (a
    pipe, a file), 200 columns wide, so that tables are not cut to 80."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=200)


# control characters a terminal acts on (C0 but newline and tab, DEL, C1) and the bidirectional
# marks and overrides that reorder what is shown
_UNPRINTABLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def printable(text: str) -> str:
    """``text`` with the characters a terminal would act on written as escapes (``\\x1b``):
    messages quote names from users' files (a state_dict key, a class name), and one holding
    ``ESC ] 52`` had set the terminal's title and clipboard through an error message."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """While open, a warning Python shows is one line on stderr, ``warning (DataWarning):
    message``, without the file, line number and source line of the code that warned (a CLI user
    did not write it). Only the default ``warnings.showwarning`` calls ``warnings.formatwarning``,
    so warnings that are recorded or raised (``catch_warnings(record=True)``, ``pytest.warns``,
    ``-W error``) are untouched; the previous formatter comes back on exit."""
    import warnings

    before = warnings.formatwarning

    def one_line(message: Any, category: type, filename: str, lineno: int, line: Any = None) -> str:
        text = printable(" ".join(str(message).split()).removeprefix("compressdrop: "))
        return f"warning ({category.__name__}): {text}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = before


def progress_printer(out: Any, as_json: bool) -> Callable[[dict[str, Any]], None]:
    """A progress callback for a run's events: a live bar on a terminal, one line per epoch
    elsewhere, nothing under ``--json``.

    Args:
        out: the rich console to draw on.
        as_json: the command prints JSON on stdout (then only the bar may show, on a terminal).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=out,
        disable=as_json or not out.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def say(text: str) -> None:
        if not as_json:
            out.print(text, highlight=False, soft_wrap=True)

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "recipe" and ev["default"] and ev.get("job") == "train":
            r, st = ev["recipe"], ev["recipe"].stages
            say(
                f"recipe: {r.name}, the default ({r.model.arch}, {r.gates.family} gates, KL "
                f"weight β = {r.kl.beta:g}, epochs: pretrain {st.pretrain.epochs}, sparsify "
                f"{st.sparsify.epochs}, fine-tune {st.finetune.epochs}; data {r.data.name}); "
                "choose another with --recipe"
            )
        elif kind == "recipe" and ev["default"]:
            r, st = ev["recipe"], ev["recipe"].stages
            say(
                f"recipe: default for your model ({r.gates.family} gates, KL weight β = "
                f"{r.kl.beta:g}, sparsify {st.sparsify.epochs} epochs, fine-tune "
                f"{st.finetune.epochs}, for {ev['n_train']:,} training examples); "
                "choose another with --recipe"
            )
        elif kind == "tokenizer":
            say(
                f"data: the text in the tokens of {ev['folder']}'s tokenizer.json (the model's "
                "own; add tokenizer=bytes to the data for bytes)"
            )
        elif kind == "checkpoint_replaced":
            say(
                f"an earlier run's checkpoint.pt in {ev['folder']} is replaced at this run's first "
                "epoch (Ctrl-C, then the earlier command with --resume, to continue that run)"
            )
        elif kind == "replaced":
            say(
                f"removed an earlier run's {', '.join(ev['files'])} from {ev['folder']} "
                "(this run wrote no such file)"
            )
        elif kind == "stage":
            if not progress.live.is_started:
                progress.start()
            if ev["epochs"]:
                tasks[ev["stage"]] = progress.add_task(ev["stage"], total=ev["epochs"], info="")
        elif kind == "epoch":
            info = f"loss {ev['loss']:.4f} val acc {ev['val_accuracy']:.4f}"
            if "units_kept" in ev:
                info += f" kl {ev['kl']:.4f} units {ev['units_kept']}/{ev['units_total']}"
            task = tasks.get(ev["stage"])
            if task is not None:
                progress.update(task, completed=ev["epoch"], info=info)
            if not out.is_terminal and not as_json:
                out.print(f"{ev['stage']} {ev['epoch']}/{ev['epochs']}: {info}", highlight=False)
        elif kind == "pruned" and not as_json:
            out.print(f"pruned: {ev['architecture']} (val acc {ev['val_accuracy']:.4f})")
        elif kind == "done" and progress.live.is_started:
            progress.stop()

    return on_event


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    # the title names the data, a file's or folder's name (one a model file records): rich read
    # "[/x]" in it as markup (a raw MarkupError) and passed its control characters on
    t = Table(title=escape(printable(title)))
    for col in columns:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*row)
    console(stderr=False).print(t)


def run_summary(report: dict[str, Any]) -> None:
    """The dense and the slim model of a run's ``report.json``, side by side, on stdout."""
    d, s = report["dense"], report["slim"]

    def metric(m: dict[str, Any], key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "—"

    rows = [
        [name, metric(m, "test_accuracy"), metric(m, "test_nll")]
        + [f"{m['params']:,}", f"{m['flops']:,}", report[f"architecture_{when}"]]
        for name, m, when in (("dense", d, "before"), ("slim", s, "after"))
    ]
    _table(
        f"{report['recipe']} on {report['dataset']} ({report['device']})",
        ("model", "test acc", "test NLL", "params", "FLOPs", "units"),
        rows,
    )
    print(
        f"params ×{report['params_reduction']:.2f} fewer, FLOPs ×{report['flops_reduction']:.2f} "
        f"fewer; wall time {report['wall_seconds']:.1f} s"
    )


def written_text(paths: dict[str, Any], max_rel_error: dict[str, float]) -> str:
    """``wrote FILE (checked: max relative error E)`` per file."""
    lines = []
    for kind, path in paths.items():
        err = max_rel_error.get(kind)
        lines.append(
            f"wrote {path}"
            + (f" (checked: max relative error {err:.1e})" if err is not None else "")
        )
    return "\n".join(lines)


def prune_text(result: Any, source: str, out: str) -> None:
    """What ``compressdrop prune`` did: units per layer, the dense/slim comparison when the model
    was sparsified here, and the files written."""
    layers = result.summary["layers"]
    _table(
        f"pruned {source} → {out}",
        ("layer", "units before", "units after", "threshold"),
        [[x["name"], str(x["before"]), str(x["after"]), f"{x['threshold']:g}"] for x in layers],
    )
    if result.run is not None:
        run_summary(result.run)
    print(written_text(result.files.paths, result.files.max_rel_error))


def sweep_line(row: Any, label: str) -> str:
    """One progress line of a sweep: a :class:`~compressdrop.evaluation.sweep.SweepRow` as it
    is measured, its threshold as ``label`` (the same as in the table), bits per byte on
    byte-level text, accuracy otherwise."""
    if row.bits_per_byte is not None:
        return f"threshold {label}: {row.architecture} bits/byte {row.bits_per_byte:.4f}"
    return f"threshold {label}: {row.architecture} acc {row.accuracy:.4f}"


def sweep_text(res: dict[str, Any], batch: int, threads: int | None) -> None:
    """The table of a threshold sweep, the dense reference and the files, on stdout."""
    from .evaluation.sweep import threshold_labels

    rows = res["rows"]
    thresholds = threshold_labels([r["threshold"] for r in rows])
    text = rows[0].get("bits_per_byte") is not None  # byte-level text: bits per byte, not accuracy
    _table(
        f"sweep of {res['title']} ({rows[0]['device']}, onnxruntime {rows[0]['provider']}, "
        f"batch {batch}, threads {threads or 'default'})",
        ("threshold", "units", "bits/byte" if text else "test acc", "NLL")
        + ("params", "FLOPs", "ONNX bytes", "latency ms")
        + ("Pareto",),
        [
            [label, r["architecture"]]
            + [f"{r['bits_per_byte' if text else 'accuracy']:.4f}", f"{r['nll']:.4f}"]
            + [f"{r['params']:,}", f"{r['flops']:,}", f"{r['onnx_bytes']:,}"]
            + [f"{r['latency_ms']:.3f}", "*" if r["pareto"] else ""]
            for label, r in zip(thresholds, rows, strict=True)
        ],
    )
    dense = res["dense"]
    if dense is not None:
        quality = (
            f"test bits/byte {dense['test_bits_per_byte']:.4f}"
            if text and "test_bits_per_byte" in dense
            else f"test acc {dense['test_accuracy']:.4f}"
        )
        print(
            f"dense model before gating: {quality}, "
            f"{dense['params']:,} params, {dense['flops']:,} FLOPs"
        )
    print(f"wrote {', '.join(res['files'].values())}")


def eval_text(res: dict[str, Any]) -> str:
    """An evaluation's metrics on one line, the Monte-Carlo ones on a second."""

    def line(d: dict[str, Any]) -> str:
        return "  ".join(
            f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in d.items()
            if not isinstance(v, dict)
        )

    return line(res) + (f"\nMonte-Carlo: {line(res['mc'])}" if "mc" in res else "")
