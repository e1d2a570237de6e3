"""Where models run: the torch device to use, an onnxruntime session on the matching provider,
and whether the code runs traced (compiled, exported) or as plain Python.

Neutral ground for every layer: training, evaluation and export all ask here, so "CUDA asked for
but absent" is one error with one message.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import opened
from .errors import InputError

__all__ = [
    "ONNX_BYTES",
    "check_labels",
    "correct",
    "is_exporting",
    "is_traced",
    "linear",
    "logits_of",
    "max_length",
    "no_cache",
    "onnx_bytes",
    "ort_feed_dtype",
    "ort_run",
    "ort_session",
    "resolve_device",
    "run_on_examples",
]


def is_exporting() -> bool:
    """Whether ``torch.export`` (and so the ONNX exporter) is tracing the model (always False
    before torch 2.5, which cannot tell)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting and exporting())


_GEMM = [0]  # open compressdrop.export._gemm.gemm_linears() contexts


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; during an ONNX export (inside
    :func:`~compressdrop.export._gemm.gemm_linears`), with a bias and ``x`` of more than two
    dimensions, over ``x``'s rows flattened to two, so that the exporter writes one ``Gemm``
    with the bias in it rather than ``MatMul`` + ``Add``. The same values."""
    if not (_GEMM[0] and bias is not None and x.dim() > 2):
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def is_traced() -> bool:
    """Whether the model runs under a compiler or tracer (``torch.compile``, ``torch.export``,
    TorchScript or FX tracing) rather than as plain Python on real tensors."""
    fx = torch.fx._symbolic_trace
    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing() or fx_tracing()


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device a ``--device`` choice names.

    Args:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Returns:
        The device to put models and data on.

    Raises:
        InputError: CUDA asked for on a machine without it, or an unknown device name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def ort_session(
    path: str | Path, device: str = "auto", threads: int | None = None
) -> tuple[Any, str]:
    """An onnxruntime session on CUDA when asked for (or ``auto`` and a GPU is there), else CPU.

    Args:
        path: the ``.onnx`` file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime's intra-op threads (``None``: its own default).

    Returns:
        ``(session, provider)``, ``provider`` being the execution provider actually in use.

    Raises:
        InputError: ``"cuda"`` asked for and this onnxruntime build has no CUDA provider.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    providers = ["CPUExecutionProvider"]
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device.startswith("cuda"):
        raise InputError("device 'cuda' requested but onnxruntime has no usable CUDA provider here")
    data = onnx_bytes(Path(path))  # read once: the check and onnxruntime see these bytes
    _check_loops(data, path)
    # external data files (weights past protobuf's 2 GB) are read from the model's folder
    opts.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(Path(path).absolute().parent)
    )
    # constant folding runs a graph's constant nodes while the session is made, in C++ and
    # outside ort_run, where neither Ctrl-C nor SIGTERM stops it (a 5 KB chain of 2000 x 2000
    # MatMuls of a ConstantOfShape: a minute a hundred nodes); unfolded, they run in ort_run.
    # compressdrop's exports are folded when written: their optimized graphs are the same
    session = ort.InferenceSession(
        data, sess_options=opts, providers=providers, disabled_optimizers=["ConstantFolding"]
    )
    return session, session.get_providers()[0]


#: the most iterations a ``Loop`` may be given as a constant: onnxruntime runs the loop in C++,
#: where neither Ctrl-C nor SIGTERM stops it (2^62 turns of an empty body hung ``eval``);
#: exported recurrent nets loop over a sequence's length, from the data
_MAX_TRIPS = 1_000_000


#: the most bytes an ONNX file holds (protobuf's limit; a larger model keeps its weights in
#: external data files, which onnxruntime reads from the model's folder)
ONNX_BYTES = 2 << 30


def onnx_bytes(path: Path) -> bytes:
    """The bytes of the ONNX file at ``path``, read once through one open file (a link
    followed at that open), so that what is checked is what onnxruntime is given: a file renamed
    over ``path``, or a link retargeted, after the check is not read. onnxruntime keeps them
    while its session lives (at most :data:`ONNX_BYTES`).

    Raises:
        InputError: ``path`` cannot be opened, is no regular file (a FIFO is refused without
            blocking on it) or holds more than :data:`ONNX_BYTES`.
    """
    with opened(path, InputError) as f:
        data = f.read(ONNX_BYTES + 1)
    if len(data) > ONNX_BYTES:
        raise InputError(f"{path}: over {ONNX_BYTES >> 30} GB, more than an ONNX file holds")
    return data


def _check_loops(data: bytes, path: str | Path) -> None:
    """Refuse a graph (the ONNX file's ``data``) with a ``Loop`` whose trip count is a constant
    over :data:`_MAX_TRIPS` (an initializer or a ``Constant`` node, in any subgraph), before
    onnxruntime runs it."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # onnxruntime names what is wrong with the file
        return
    graphs, consts, loops = [proto.graph], {}, []
    while graphs:
        g = graphs.pop()
        consts.update({t.name: t for t in g.initializer})
        for node in g.node:
            value = [a.t for a in node.attribute if a.name == "value"]
            if node.op_type == "Constant" and node.output and value:
                consts[node.output[0]] = value[0]
            if node.op_type == "Loop" and node.input and node.input[0]:
                loops.append(node.input[0])
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += [g2 for a in node.attribute for g2 in a.graphs]
    for name in loops:
        if name in consts and uses_external_data(consts[name]):  # (to_array read it by cwd)
            raise InputError(
                f"{path}: a Loop's trip count {name!r} is stored outside the file, where it is "
                "not checked before onnxruntime runs the loop; refused (a count is one number)"
            )
        if name in consts:
            trips = numpy_helper.to_array(consts[name]).reshape(-1)
            if trips.size == 1 and int(trips[0]) > _MAX_TRIPS:
                raise InputError(
                    f"{path}: a Loop of the graph runs {int(trips[0]):,} times (its trip count "
                    f"{name!r} is a constant), more than the {_MAX_TRIPS:,} allowed: onnxruntime "
                    "could not be stopped while it ran"
                )


def ort_run(session: Any, feeds: Mapping[str, Any], where: str | Path) -> Any:
    """The first output of ``session.run(None, feeds)``, run so that Ctrl-C stops it.

    onnxruntime runs a graph in C++, where Python's Ctrl-C handler never runs: a ``Loop`` whose
    trip count the graph computes (``2^61 + 2^61``, which :func:`_check_loops` cannot read), or a
    ``Scan`` over a huge tensor, could not be stopped. The run goes on in a thread while this
    one waits; a Ctrl-C sets the run's ``terminate`` flag, which onnxruntime reads before each
    node it runs (inside loops too), and is raised again once the run has stopped.

    Raises:
        InputError: onnxruntime fails running the graph (a node that asks for more memory than
            there is, a shape the graph does not take), with its message.
        KeyboardInterrupt: Ctrl-C, after onnxruntime stopped.
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # its failure is raised below, not logged on the terminal too
    got: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            got["out"] = session.run(None, dict(feeds), options)[0]
        except Exception as e:  # onnxruntime's own types (Fail, InvalidArgument, RuntimeException)
            got["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="onnxruntime", daemon=True).start()
    try:
        while not done.wait(0.1):  # (Thread.join interrupted by Ctrl-C loses the thread's state)
            pass
    except KeyboardInterrupt:
        options.terminate = True
        done.wait()
        raise
    if "error" in got:
        e = got["error"]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{where}: onnxruntime failed running it: {first[:500]}") from None
    return got["out"]


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, a Hugging Face output's ``logits``, a mapping's
    ``"logits"`` (or its only tensor), or a tuple's first element.

    Raises:
        TypeError: none of these.
    """
    if isinstance(out, torch.Tensor):
        return out
    found = getattr(out, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


@torch.no_grad()
def run_on_examples(
    model: torch.nn.Module, x: torch.Tensor, where: str, logits: bool = True
) -> Any:
    """The logits of ``model`` (in eval mode) on the first two examples of ``x`` (``logits``
    false: its output, whatever it holds).

    Raises:
        InputError: naming ``where`` and the examples' shape and dtype, if the model fails on
            them (a shape or dtype it cannot take), instead of the layer's own traceback.
    """
    was = model.training
    model.eval()
    try:
        out = model(x[:2])
        return logits_of(out) if logits else out
    except torch.OutOfMemoryError:  # not the inputs' fault
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, AssertionError) as e:
        # AssertionError: torch._assert, a model's own shape check (torchvision's ViT: "Wrong
        # image height! Expected 224 but got 64!")
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(
            f"the model cannot run on {where} (examples of shape {tuple(x.shape[1:])}, "
            f"{str(x.dtype).removeprefix('torch.')}): {said}"
        ) from e  # chained: where the inputs are not the cause, the model's own error shows it
    finally:
        model.train(was)


def correct(scores: torch.Tensor, y: torch.Tensor) -> int:
    """How many predictions (the argmax of ``scores``' last dimension) equal ``y``. Scores that
    hold a NaN make no prediction and count as wrong: ``argmax`` takes a NaN for the largest
    value, so a model that gives NaN everywhere scored as if it always said class 0."""
    return int(((scores.argmax(-1) == y) & ~scores.isnan().any(-1)).sum())


def check_labels(
    outputs: int, y: torch.Tensor, what: str = "the data", setting: str | None = None
) -> None:
    """Check that a model with ``outputs`` logits (classes, or a vocabulary) can score the labels
    ``y``: each must be below ``outputs``. ``setting`` says where the factory's ``num_classes``
    is set for a model about to be trained (``"CLI --arch-arg "``; a recipe's ``model.kwargs.``
    for ``train``); ``None``: a trained model is scored, and only other data can fit it.

    Raises:
        InputError: a label at or above ``outputs``, naming both counts.
    """
    if y.numel() == 0 or y.is_floating_point():
        return
    top = int(y.max())
    if top >= outputs:
        fix = (
            f"use a model with {top + 1} outputs (a factory's num_classes, "
            f"{setting}num_classes={top + 1}), or data that fits it"
            if setting is not None
            else f"the model was trained for {outputs}: score it on data of those"
        )
        raise InputError(
            f"the model gives {outputs} outputs but {what} has labels up to {top} "
            f"({top + 1} classes or tokens): {fix}"
        )


def ort_feed_dtype(inp: Any) -> type:
    """The numpy dtype to feed an onnxruntime session input (``session.get_inputs()[i]``): int64
    for a graph that takes token ids, float32 otherwise."""
    import numpy as np

    return np.int64 if inp.type == "tensor(int64)" else np.float32


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's ``config.use_cache`` off for an export: the graph maps token ids to
    logits, without the key/value cache object (no ONNX form; a ``torch.export`` output torch
    cannot flatten). Every config in the model is switched, not only the root's: T5's decoder
    stack holds a copy of its own, and made a cache from it (``EncoderDecoderCache`` in the
    output stopped ``torch.export`` of ``T5ForSequenceClassification``)."""
    configs: dict[int, Any] = {
        id(c): c
        for m in model.modules()
        if getattr(c := getattr(m, "config", None), "use_cache", None)
    }
    switched = [(c, c.use_cache) for c in configs.values()]
    for c, _ in switched:
        c.use_cache = False
    try:
        yield
    finally:
        for c, was in switched:
            c.use_cache = was


# config fields that bound a model's sequence length (BERT, LLaMA; GPT-2; MPT, whose ALiBi bias
# is built for that many positions)
_POSITIONS = ("max_position_embeddings", "n_positions", "max_seq_len")


def max_length(model: nn.Module, default: int = 1 << 16) -> int:
    """The longest sequence ``model`` takes: its (or a submodule's Hugging Face) config's
    ``max_position_embeddings``, ``n_positions`` or ``max_seq_len``, or the bound a program
    rebuilt as a module records (``program_max_length``: the range its exported length was
    given), else ``default``. A dynamic length beyond it fails ``torch.export``'s range check:
    BERT slices its position ids, a buffer of that length."""
    for module in model.modules():  # a wrapper's (an MC sampler's) inner model's too
        config = getattr(module, "config", None)
        for value in (
            *(getattr(config, f, None) for f in _POSITIONS),
            vars(module).get("program_max_length"),
        ):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return min(value, default)
    return default
