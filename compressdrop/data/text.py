"""Text for language models: a file or a folder of files, split into train, validation and
test by file, cut into fixed windows of next-token prediction.

Tokens are bytes (a vocabulary of 256), so a model's NLL per token in bits *is* its bits per byte,
the tokenizer-free measure that compares language models across vocabularies; or, with
``tokenizer=``, a pretrained model's own tokens (:mod:`compressdrop.data.tokens`), whose bits per
byte divide by the split's bytes per token. Each file goes whole to one split: taken in the order
of a hash of their path relative to the root (a fixed, content-blind shuffle), each file joins the
split furthest below its share of the bytes. A single file is split by position instead (its
first, middle and last parts). A split's files are then joined, in tokens by the tokenizer's
end-of-text token (``sep=``), in bytes by nothing. Text that spells one of the tokenizer's
special tokens is that token, as the tokenizer reads it, with a warning that names them, or
text (``special=text``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .._io import opened
from ..errors import DataError
from .dataset import Dataset, DataWarning, beyond_memory, spec_options
from .tokens import BYTES, NO_SEP, TEXT, TOKEN, load_tokenizer

__all__ = ["TEXT_SPEC", "TextDataset", "load_text"]

TEXT_SPEC = (
    "text:PATH[,context=N][,glob=PATTERN][,max_bytes=N][,tokenizer=PATH][,sep=eos|none|TOKEN]"
    "[,special=token|text]"
)
VOCAB = 256


@dataclass(frozen=True)
class TextDataset(Dataset):
    """Next-token windows: ``x`` ``(N, context)`` int64 tokens (bytes, or a tokenizer's ids),
    ``y`` the same shifted by one.

    The validation split is fixed when the text loads (by file), so :meth:`split_validation`
    returns it instead of carving one from the training windows. ``source`` describes the files:
    counts, bytes (and tokens) per split, a SHA-256 of the file list and contents, the tokenizer.
    ``bytes_per_token`` is the test split's (1 for bytes), ``val_bytes_per_token`` the
    validation split's: bits per byte are bits per token over it.
    """

    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    source: dict | None = None
    bytes_per_token: float = 1.0
    val_bytes_per_token: float = 1.0
    task: ClassVar[str] = "lm"

    def subset(self, n_train: int, n_test: int) -> TextDataset:
        """The first ``n_train`` training windows and ``n_test`` test and validation windows."""
        cut = super().subset(n_train, n_test)
        assert isinstance(cut, TextDataset)
        if cut.x_val is None or cut.y_val is None:
            return cut
        return replace(cut, x_val=cut.x_val[:n_test], y_val=cut.y_val[:n_test])

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
        """``(self, validation view)``: the validation files chosen at load time."""
        if self.x_val is None or self.y_val is None:
            raise DataError(f"{self.name}: no validation files (load with val_fraction > 0)")
        val = replace(self, name=f"{self.name}/val", x_test=self.x_val, y_test=self.y_val)
        return self, replace(val, bytes_per_token=self.val_bytes_per_token)


def _by_share(
    files: list[tuple[str, bytes]], val_fraction: float, test_fraction: float
) -> dict[str, list[bytes]]:
    """Files in hash order of their paths, each to the split furthest below its share of the
    bytes (relatively; ties: test, validation, training)."""
    total = sum(len(data) for _, data in files)
    share = {"test": test_fraction, "val": val_fraction}
    share["train"] = 1 - test_fraction - val_fraction
    order = sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).digest())
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    held = dict.fromkeys(share, 0)
    for _, data in order:
        open_ = [k for k in share if share[k] > 0]
        split = max(open_, key=lambda k: 1 - held[k] / (share[k] * total))
        parts[split].append(data)
        held[split] += len(data)
    return parts


def _windows(tokens: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` (1-D) cut into windows of ``context`` inputs and their next tokens."""
    n = (len(tokens) - 1) // context
    if n < 1:
        return torch.empty(0, context, dtype=torch.int64), torch.empty(
            0, context, dtype=torch.int64
        )
    a = torch.from_numpy(tokens[: n * context + 1].astype(np.int64))
    return a[:-1].view(n, context), a[1:].view(n, context)


def _to_read(files: list[Path], max_bytes: int | None) -> int:
    """The bytes that reading ``files`` will take in: whole files until ``max_bytes`` are in
    (hidden ones counted too: the walk skips them later)."""
    total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        total += f.stat().st_size
    return total


def _check_memory(root: Path, total: int) -> None:
    """Refuse ``total`` bytes of text whose int64 tokens would take more than the memory allows
    (8 bytes a byte at most: a token is a byte or more), before any is read."""
    too_big = beyond_memory(8 * total, f"{total:,} bytes of text", "as int64 tokens")
    if too_big:
        raise DataError(f"{root}: {too_big}; read less of it (max_bytes=N)")


def load_text(
    path: str | Path,
    *,
    context: int = 128,
    glob: str = "**/*",
    max_bytes: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    tokenizer: str | Path | None = None,
    sep: str | None = None,
    special: str | None = None,
) -> TextDataset:
    """A text corpus as next-token windows of ``context`` tokens (bytes, or ``tokenizer``'s).

    Args:
        path: a text file, or a folder whose files matching ``glob`` are read (sorted by path).
        context: tokens per window (the model's sequence length).
        glob: which files of a folder (``"**/*.py"``, say); hidden files are skipped.
        max_bytes: stop adding files (in path order) once this many bytes are read.
        val_fraction / test_fraction: the share of files (of a single file: of its bytes) held out
            for validation and for testing.
        tokenizer: a ``tokenizer.json``, or a folder holding one (a Hugging Face model's),
            whose ids the windows hold (:mod:`compressdrop.data.tokens`); None or ``"bytes"``:
            bytes. The files are split by bytes either way, then each split is encoded.
        sep: with a tokenizer, what goes between two files of a split (never across splits:
            each is encoded alone): ``"eos"`` its end-of-text token, ``"none"`` nothing, any
            other string that token; None (not given) the end-of-text token where the tokenizer
            has one, else nothing, with a warning (``Tokenizer.separator``).
            Bytes take ``"none"`` only, and are joined by nothing either way, as they always
            were (BENCHMARKS §10's numbers stay as recorded). A separator counts as a token of
            no bytes in a split's bytes per token.
        special: with a tokenizer, how text that spells one of its special tokens is read:
            ``"token"`` as that token (the tokenizer's own default), ``"text"`` as the text it
            is; None (not given) as the token, with a :class:`DataWarning` that names the
            tokens spelled and how often.

    Raises:
        FileNotFoundError: no such path.
        DataError: no files match, a split gets too little text for one window, an argument is
            out of range, the tokenizer cannot be read, ``sep`` names no token of it (or any
            with bytes), or ``special`` is neither ``"token"`` nor ``"text"`` (or any with
            bytes).

    Example:
        >>> ds = load_text("/usr/lib/python3.11", glob="**/*.py", max_bytes=2_000_000)  # doctest: +SKIP
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if not (root.is_file() or root.is_dir()):
        raise DataError(f"{root}: not a file or a folder of text (a FIFO or a device?)")
    if context < 2:
        raise DataError(f"context must be at least 2 bytes, got {context}")
    if glob.count("**") > 2:  # (a model file's recorded spec gives it too)
        raise DataError(
            f"{root}: glob={glob!r} has more than two '**': each walks the folder again from "
            "every folder the one before found (eight, in twelve nested folders: 3 s; twenty: "
            "hours)"
        )
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave some text "
            "for training (each in [0, 1), test > 0)"
        )
    tok = None if tokenizer in (None, BYTES) else load_tokenizer(tokenizer)  # (before the text)
    if tok is None and sep not in (None, NO_SEP):
        raise DataError(
            f"sep={sep} needs tokenizer=: bytes have no end-of-text token (all 256 ids are "
            "bytes), and files of bytes are joined by nothing"
        )
    if special not in (None, TOKEN, TEXT) or (tok is None and special is not None):
        why = "needs tokenizer=: bytes have no special tokens" if tok is None else ""
        raise DataError(f"special={special}: " + (why or f"use special={TOKEN} or special={TEXT}"))
    separator = None if tok is None else tok.separator(sep)  # (warned once, not per split)
    sep_id = None if separator is None else separator.id
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    digest = hashlib.sha256()
    files = 0
    if root.is_file():
        with opened(root, DataError) as handle:  # (a FIFO is refused, not waited on)
            size = os.fstat(handle.fileno()).st_size
            _check_memory(root, size if max_bytes is None else min(size, max_bytes))
            data = handle.read() if max_bytes is None else handle.read(max_bytes)
        digest.update(data)
        files = 1
        a = round(len(data) * (1 - val_fraction - test_fraction))
        b = round(len(data) * (1 - test_fraction))
        parts = {"train": [data[:a]], "val": [data[a:b]], "test": [data[b:]]}
    else:
        total = 0
        found: list[tuple[str, bytes]] = []
        try:  # pathlib refuses an empty or absolute pattern when the walk starts
            matched = sorted(p for p in root.glob(glob) if p.is_file())
        except (ValueError, NotImplementedError) as e:
            raise DataError(
                f"{root}: glob={glob!r} is not a pattern of files in it ({e})"
            ) from None
        _check_memory(root, _to_read(matched, max_bytes))
        for f in matched:
            rel = f.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            if max_bytes is not None and total >= max_bytes:
                break
            data = f.read_bytes()
            total += len(data)
            digest.update(rel.encode() + b"\0" + data)
            found.append((rel, data))
        if not found:
            raise DataError(f"{root}: no files match {glob!r}")
        files = len(found)
        parts = _by_share(found, val_fraction, test_fraction)
    tensors, sizes, counts = {}, {}, {}
    spelled: dict[str, int] = {}
    for split, chunks in parts.items():
        sizes[split] = sum(map(len, chunks))
        if tok is None:
            tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        else:
            ids, spelt_here = tok.encode(chunks, sep_id, special or TOKEN)
            tokens = np.asarray(ids, dtype=np.int64)
            for t, n in spelt_here.items():
                spelled[t] = spelled.get(t, 0) + n
        counts[split] = len(tokens)
        tensors[split] = _windows(tokens, context)
        if (split != "val" or val_fraction > 0) and len(tensors[split][0]) == 0:
            unit = "bytes" if tok is None else f"tokens ({sizes[split]} bytes)"
            raise DataError(
                f"{root}: the {split} split holds {len(tokens)} {unit}, less than one window of "
                f"{context + 1}; use more text or a shorter context"
            )
    source: dict[str, Any] = {
        "path": str(root),
        "glob": glob if root.is_dir() else None,
        "files": files,
        "bytes": sizes,
        "sha256": digest.hexdigest(),
        "context": context,
    }
    if tok is not None:
        source["tokens"] = counts
        source["tokenizer"] = {"path": tok.path, "sha256": tok.sha256, "vocab": tok.vocab}
        source["sep"] = None if separator is None else asdict(separator)
        source["special"] = special or TOKEN
        if spelled and special is None:
            said = ", ".join(f"{t!r} {n}×" for t, n in sorted(spelled.items()))
            warnings.warn(
                f"{root}: the text spells special tokens of tokenizer {tok.path} ({said}), read "
                f"as those tokens, as the tokenizer reads them; special={TEXT} reads them as "
                f"text, special={TOKEN} keeps them tokens without this warning",
                DataWarning,
                stacklevel=2,
            )
    per_token = {k: sizes[k] / counts[k] if counts[k] else 1.0 for k in sizes}
    val = tensors["val"] if val_fraction > 0 else (None, None)
    return TextDataset(
        f"text:{root.name}",
        *tensors["train"],
        *tensors["test"],
        VOCAB if tok is None else tok.vocab,
        x_val=val[0],
        y_val=val[1],
        source=source,
        bytes_per_token=per_token["test"],
        val_bytes_per_token=per_token["val"],
    )


def text_spec(spec: str) -> TextDataset:
    """``text:PATH[,context=N][,glob=PATTERN][,max_bytes=N][,val_fraction=F][,test_fraction=F]
    [,tokenizer=PATH][,sep=eos|none|TOKEN][,special=token|text]``."""
    kinds = {"context": int, "max_bytes": int, "glob": str, "val_fraction": float}
    kinds |= {"test_fraction": float, "tokenizer": str, "sep": str, "special": str}
    path, options = spec_options(spec, "text:", tuple(kinds), TEXT_SPEC)
    try:
        kwargs = {k: kinds[k](v) for k, v in options.items()}
    except ValueError:
        raise DataError(f"data {spec!r}: bad option value in {options}") from None
    return load_text(path, **kwargs)
