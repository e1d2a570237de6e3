"""Text as a model's own tokens: the ``tokenizer=`` option of ``text:`` data.

A pretrained language model reads its tokenizer's ids, not bytes. ``tokenizer=PATH`` names a
``tokenizer.json`` (or a folder that holds one: a Hugging Face model's own folder) whose
tokenizer encodes each split; ``prune`` and ``eval`` of a Hugging Face folder that carries one
add it themselves (:func:`compressdrop.data.with_model_tokenizer`), and ``tokenizer=bytes``
keeps bytes. The file
is JSON, read once (at most :data:`TOKENIZER_BYTES`) and parsed by the ``tokenizers`` library's
Rust code: nothing in it runs. Only that fast-tokenizer file is read; a folder with only a
SentencePiece model or ``vocab.json`` + ``merges.txt`` is refused with what to do.

Bits per byte stay the measure across tokenizers: a split's NLL in bits per token divided by its
bytes per token (the split's bytes over its tokens, both counted whole).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import opened
from ..errors import DataError

__all__ = ["BYTES", "TOKENIZER_BYTES", "TOKENIZER_JSON", "Tokenizer", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
#: ``tokenizer=bytes``: the text's bytes are its tokens (a vocabulary of 256)
BYTES = "bytes"
#: the largest tokenizer.json read (the largest seen, Gemma 3's, is about 33 MB)
TOKENIZER_BYTES = 64 << 20
_OTHERS = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


@dataclass(frozen=True)
class Tokenizer:
    """A loaded ``tokenizer.json``: ``vocab`` ids (added tokens included), the file's path and
    SHA-256 (recorded in the data's ``source``)."""

    inner: Any
    vocab: int
    path: str
    sha256: str

    def encode(self, chunks: list[bytes]) -> list[int]:
        """The ids of ``chunks`` (a split's files, each decoded as UTF-8, a byte that is not
        replaced by U+FFFD), one file after the other, no special tokens added."""
        ids: list[int] = []
        for chunk in chunks:  # one call each: encode_batch's thread pool warns in forked workers
            ids += self.inner.encode(
                chunk.decode("utf-8", errors="replace"), add_special_tokens=False
            ).ids
        return ids


def _tokenizer_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    file = path / TOKENIZER_JSON
    if not file.exists():
        others = [n for n in _OTHERS if (path / n).exists()]
        raise DataError(
            f"tokenizer={path}: the folder has no {TOKENIZER_JSON}"
            + (
                f" (its tokenizer is {', '.join(others)}: save it once as a fast tokenizer, "
                "transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder), "
                f"which writes {TOKENIZER_JSON})"
                if others
                else ""
            )
        )
    return file


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of ``path``: a ``tokenizer.json`` or a folder holding one.

    Raises:
        DataError: no such file, no regular file, over :data:`TOKENIZER_BYTES`, not a tokenizer
            the ``tokenizers`` library reads, or that library missing (the ``hf`` extra).
    """
    file = _tokenizer_file(Path(path))
    with opened(file, DataError) as f:
        data = f.read(TOKENIZER_BYTES + 1)
    if len(data) > TOKENIZER_BYTES:
        raise DataError(f"tokenizer={file}: over {TOKENIZER_BYTES >> 20} MB, not a tokenizer.json")
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            f"tokenizer={file} needs the tokenizers library: pip install 'compressdrop[hf]'"
        ) from None
    try:
        inner = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # UnicodeDecodeError, or the library's own parse error
        raise DataError(
            f"tokenizer={file}: not a tokenizer.json the tokenizers library reads ({e})"
        ) from None
    vocab = inner.get_vocab_size(with_added_tokens=True)
    return Tokenizer(inner, vocab, str(file.resolve()), hashlib.sha256(data).hexdigest())
