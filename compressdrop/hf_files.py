"""What compressdrop reads from a Hugging Face model folder besides the model, and copies out of it:
the shard index (safetensors shards of the folder only) and the tokenizer files (regular files in
the folder or the cache's blobs, never what a link elsewhere points at)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

from ._io import read_within
from .errors import CheckpointError

__all__ = [
    "TOKENIZER_BYTES",
    "TOKENIZER_FILES",
    "WEIGHTS",
    "check_shards",
    "read_tokenizer",
    "write_tokenizer",
]

#: a folder's weights: one file, or an index of shards
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_shards(path: Path) -> None:
    """Without ``model.safetensors``, the index must name safetensors shards in the folder: one
    that names a pickled ``.bin`` shard made transformers try to unpickle it (refused by its
    weights-only unpickler, as a raw traceback advising to turn that off)."""
    index = path / WEIGHTS[1]
    if (path / WEIGHTS[0]).is_file():
        return
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{index}: unreadable ({e or 'not a JSON object'})") from None
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
