"""What compressdrop reads from a Hugging Face model folder besides the model, and copies out of it:
the shard index (safetensors shards of the folder only) and the tokenizer files (regular files in
the folder or the cache's blobs, never what a link elsewhere points at)."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._io import read_json_object, read_within
from .errors import CheckpointError, InputError

__all__ = [
    "CONFIG_BYTES",
    "LAYER_FIELDS",
    "LAYER_SPARE",
    "MARKER",
    "SPARE_WEIGHTS",
    "TOKENIZER_BYTES",
    "TOKENIZER_FILES",
    "WEIGHTS",
    "check_shards",
    "check_sizes",
    "import_transformers",
    "numbered_layers",
    "quiet_progress",
    "read_config",
    "read_made",
    "read_tokenizer",
    "write_tokenizer",
]

#: a folder's weights: one file, or an index of shards
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: the file a slim folder that compressdrop wrote holds (what made it); only such a folder is
#: replaced by a later run
MARKER = "compressdrop.json"


#: the most bytes a folder's config.json may hold (a config is kilobytes; a label map of
#: 100,000 classes a few megabytes)
CONFIG_BYTES = 64 << 20


def read_config(folder: Path) -> dict[str, Any]:
    """``folder``'s ``config.json``, read once through one open file: what it held when it was
    checked is what transformers is given (as a config object), never the file again, which a
    file renamed over it, or a link retargeted, after the checks would change.

    Raises:
        CheckpointError: no regular file, more than :data:`CONFIG_BYTES`, not a JSON object.
    """
    return _read_object(folder / "config.json")


def read_made(folder: Path) -> dict[str, Any]:
    """What made ``folder`` (its :data:`MARKER`, written with a slim folder: compressdrop's
    version, the prune report, the recipe and its data), or ``{}`` for a folder without one.

    Raises:
        CheckpointError: the file is no regular file, too big, or not a JSON object.
    """
    return _read_object(folder / MARKER) if (folder / MARKER).exists() else {}


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, read once, at most :data:`CONFIG_BYTES`."""
    return read_json_object(path, CONFIG_BYTES, beyond="no model's settings")


def import_transformers(needed_by: str = "a Hugging Face model folder") -> Any:
    """The transformers module (torchvision's missing ops declared first).

    Raises:
        InputError: transformers is not installed; the message names ``needed_by``.
    """
    from ._torchvision import import_torchvision

    import_torchvision()  # transformers imports it when installed: a mismatched build must load
    try:
        import transformers
    except ImportError:
        raise InputError(
            f"{needed_by} needs Hugging Face transformers: pip install 'compressdrop[hf]'"
        ) from None
    return transformers


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off while it loads or writes a folder (they drew "Loading
    weights: 100%|████|" between the CLI's own lines), and as they were afterwards."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


def check_shards(path: Path) -> list[Path]:
    """Without ``model.safetensors``, the index must name safetensors shards in the folder: one
    that names a pickled ``.bin`` shard made transformers try to unpickle it (refused by its
    weights-only unpickler, as a raw traceback advising to turn that off). Returns the files
    of weights transformers reads."""
    index = path / WEIGHTS[1]
    if (path / WEIGHTS[0]).is_file():
        return [path / WEIGHTS[0]]
    weight_map = _read_object(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map of shard files")
    bad = sorted(
        {
            str(s)
            for s in weight_map.values()
            if not (isinstance(s, str) and s.endswith(".safetensors") and Path(s).name == s)
        }
    )
    if bad:
        raise CheckpointError(
            f"{index}: names shards that are not safetensors files of the folder ({bad[:3]}); "
            "pickled weights could run code when loaded: convert them to safetensors where you "
            "trust them"
        )
    # a FIFO (or what a link names that is none) blocked the load without end, unopened
    odd = sorted({s for s in weight_map.values() if not (path / s).is_file()})
    if odd:
        raise CheckpointError(f"{index}: names shards that are not files of the folder ({odd[:3]})")
    return [path / s for s in sorted(set(weight_map.values()))]


#: the parameters a config may describe beyond the values its files hold (a family may make
#: some of its parameters from others)
SPARE_WEIGHTS = 1 << 20


def check_sizes(path: Path, files: list[Path], config: Any, tf: Any) -> None:
    """Refuse a folder whose config describes more than its safetensors ``files`` hold, before
    anything is built or any memory taken for it: transformers makes up the weights the files
    lack, at the config's sizes (a 100 KB folder whose config said ``vocab_size: 20000000`` and
    held no embedding took 5.3 GB), and builds the ``config``'s (the checked values of
    :func:`read_config`, as transformers' config object) layers one by one
    (``num_hidden_layers: 1e30`` never ended). The layers a config gives (its fields
    :data:`LAYER_FIELDS`, in sub-configs too) may be at most :data:`LAYER_SPARE` times those the
    files' names number, plus as many again; then the model is built from the config on the
    ``meta`` device (``tf``: the transformers module) and its parameters counted against the
    files' headers. A config or file that cannot be read so is left to transformers, which says
    what is wrong with it.

    Raises:
        CheckpointError: too many layers, or more than :data:`SPARE_WEIGHTS` parameters more
            than the files hold.
    """
    import torch
    from safetensors import safe_open

    have, names = 0, []
    try:
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open is no mapping)
                    have += math.prod(f.get_slice(key).get_shape())
                    names.append(key)
        numbered = numbered_layers(names)
        layers = max((n for n in _layer_counts(config.to_dict()) if n >= 0), default=0)
    except Exception:  # transformers' load names the problem
        return
    if layers > LAYER_SPARE * numbered + LAYER_SPARE:
        raise CheckpointError(
            f"{path}: its config describes {layers:,} layers, its safetensors files number "
            f"{numbered:,}: transformers would build and make up the rest; refused"
        )
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (its load says them)
            want = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
    except Exception:  # transformers' load names the problem
        return
    if want > have + SPARE_WEIGHTS:
        raise CheckpointError(
            f"{path}: its config describes a model of {want:,} parameters, its safetensors files "
            f"hold {have:,} values: transformers would make up the rest, memory the files do not "
            "justify; refused"
        )


#: the config fields that give a model's (or a sub-model's) number of layers
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers")
#: how many times the layers the weights' names number a config may give (a family may reuse
#: a layer's weights), plus as many again
LAYER_SPARE = 4
_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.)")  # a module list's index in a weight's name


def numbered_layers(names: Iterable[str]) -> int:
    """The layers weights' ``names`` number: their module lists' largest index, plus one."""
    return max((int(n) + 1 for k in names for n in _INDEX.findall(f".{k}.")), default=0)


def _layer_counts(config: Mapping[str, Any], depth: int = 0) -> list[int]:
    """The layer counts a config and its sub-configs give (:data:`LAYER_FIELDS`)."""
    counts = [v for k, v in config.items() if k in LAYER_FIELDS and type(v) is int]
    for value in config.values() if depth < 32 else ():
        if isinstance(value, Mapping):
            counts += _layer_counts(value, depth + 1)
    return counts


#: a model folder's tokenizer files, carried into its slim folder (pruning leaves them valid)
TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    *("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model"),
)
#: the most bytes of tokenizer files a model carries (Gemma's, the largest seen, are 38 MB)
TOKENIZER_BYTES = 256 << 20


def read_tokenizer(source: Path) -> dict[str, bytes]:
    """``source``'s tokenizer files by name: each a regular file in the folder or, through a
    link, in the Hugging Face cache's ``blobs`` beside its snapshots, all together at most
    :data:`TOKENIZER_BYTES`; a link elsewhere (``vocab.txt`` → ``/etc/passwd``) is not read, with
    a warning that says so."""
    here = source.resolve()
    blobs = here.parent.parent / "blobs"  # the Hub cache: models--ORG--NAME/snapshots/REV/
    cache = here.parent.name == "snapshots" and here.parent.parent.name.startswith("models--")
    roots = [here, blobs] if cache and blobs.is_dir() and not blobs.is_symlink() else [here]
    files: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            left = TOKENIZER_BYTES - sum(map(len, files.values()))
            got = read_within(source / name, roots, left)
            if isinstance(got, str):
                warnings.warn(f"compressdrop: {source / name} not copied: {got}", stacklevel=4)
            else:
                files[name] = got
    return files


def write_tokenizer(files: Mapping[str, bytes], out: Path) -> None:
    """Write the tokenizer ``files`` (:func:`read_tokenizer`'s) into the folder ``out``."""
    for name, data in files.items():
        if name in TOKENIZER_FILES:  # a plain name of the list: nothing outside ``out``
            (out / name).write_bytes(data)
