"""Text as a model's own tokens: the ``tokenizer=`` option of ``text:`` data.

A pretrained language model reads its tokenizer's ids, not bytes. ``tokenizer=PATH`` names a
``tokenizer.json`` (or a folder that holds one: a Hugging Face model's own folder) whose
tokenizer encodes each split; ``prune`` and ``eval`` of a Hugging Face folder that carries one
add it themselves (:func:`compressdrop.data.with_model_tokenizer`), and ``tokenizer=bytes``
keeps bytes. The file
is JSON, read once (at most :data:`TOKENIZER_BYTES`) and parsed by the ``tokenizers`` library's
Rust code: nothing in it runs. Only that fast-tokenizer file is read; a folder with only a
SentencePiece model or ``vocab.json`` + ``merges.txt`` is refused with what to do.

Documents stay apart: the files of a split are encoded one by one and joined by the tokenizer's
end-of-text token (``sep=``, :meth:`Tokenizer.separator`), as GPT-2-style pretraining joins its
documents, so a window that crosses from one file into the next sees the boundary. The token is
the one the folder's ``tokenizer_config.json`` names (``eos_token``: the tokenizer's own, what
transformers' ``tokenizer.eos_token_id`` gives), else ``config.json``'s or
``generation_config.json``'s ``eos_token_id`` (the first of a list), else, and for a bare
``tokenizer.json``, one of its special tokens that by its name ends a text (:data:`EOS_NAMES`).

Bits per byte stay the measure across tokenizers: a split's NLL in bits per token divided by its
bytes per token (the split's bytes over its tokens, both counted whole; a separator is a token of
no bytes, so the bits that predict a boundary are charged to the text's bytes).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import opened, read_json_object
from ..errors import DataError
from .dataset import DataWarning

__all__ = [
    "BYTES",
    "EOS",
    "EOS_NAMES",
    "NO_SEP",
    "TEXT",
    "TOKEN",
    "TOKENIZER_BYTES",
    "TOKENIZER_JSON",
    "Separator",
    "Tokenizer",
    "load_tokenizer",
]

TOKENIZER_JSON = "tokenizer.json"
#: ``tokenizer=bytes``: the text's bytes are its tokens (a vocabulary of 256)
BYTES = "bytes"
#: the largest tokenizer.json read (the largest seen, Gemma 3's, is about 33 MB)
TOKENIZER_BYTES = 64 << 20
_OTHERS = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
#: ``sep=eos``: the tokenizer's end-of-text token between files (the default with a tokenizer)
EOS = "eos"
#: ``sep=none``: nothing between files (bytes' only choice)
NO_SEP = "none"
#: ``special=``: text that spells a special token is that token (the tokenizer's default), or text
TOKEN, TEXT = "token", "text"
#: special tokens of a bare tokenizer.json read as its end of text, first found first (GPT-2's
#: and Qwen's, Llama 3's, Llama 2's and Mistral's, Gemma's)
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# where a folder names its end-of-text token, in the order they are asked
_EOS_KEYS = (
    ("tokenizer_config.json", "eos_token"),
    ("config.json", "eos_token_id"),
    ("generation_config.json", "eos_token_id"),
)


@dataclass(frozen=True)
class Separator:
    """The token put between files: its text, its id and where it was found (for the data's
    ``source`` and messages)."""

    token: str
    id: int
    origin: str


@dataclass(frozen=True)
class Tokenizer:
    """A loaded ``tokenizer.json``: ``vocab`` ids (added tokens included), the file's path and
    SHA-256 (recorded in the data's ``source``)."""

    inner: Any
    vocab: int
    path: str
    sha256: str
    #: the end-of-text token the files name (None: none found)
    eos: Separator | None = None
    #: where no end-of-text token was found, for the warning
    looked: str = ""

    def encode(
        self, chunks: list[bytes], sep: int | None = None, special: str = TOKEN
    ) -> tuple[list[int], dict[str, int]]:
        """The ids of ``chunks`` (a split's files, each decoded as UTF-8, a byte that is not
        replaced by U+FFFD), one file after the other, no special tokens added, ``sep`` between
        two files (not after the last: a split's stream ends with its text, and one file's split
        is as it was). An empty file is no document: it adds no separator.

        Text that spells a special token (``</s>`` in an HTML file, ``<|endoftext|>`` in a
        prepared dump) is that token where ``special`` is :data:`TOKEN`, as the tokenizer reads
        it by default, and text where it is :data:`TEXT`. Returns the ids, and how often the
        text spelled each special token that became one (a separator is not counted)."""
        ids: list[int] = []
        added = self.inner.get_added_tokens_decoder()
        specials = {i: t.content for i, t in added.items() if t.special}
        spelled: dict[str, int] = {}
        documents = [chunk for chunk in chunks if chunk]
        before = self.inner.encode_special_tokens
        self.inner.encode_special_tokens = special == TEXT
        try:
            for i, chunk in enumerate(documents):  # one call each: encode_batch's pool warns
                if i and sep is not None:
                    ids.append(sep)
                text = chunk.decode("utf-8", errors="replace")
                encoding = self.inner.encode(text, add_special_tokens=False)
                ids += encoding.ids
                for token in _spelled(text, encoding, specials):
                    spelled[token] = spelled.get(token, 0) + 1
        finally:
            self.inner.encode_special_tokens = before
        return ids, spelled

    def separator(self, sep: str | None) -> Separator | None:
        """The token ``sep=`` puts between files: ``None`` (not given) the end-of-text token
        if one is found, else none with a :class:`DataWarning` that names the tokenizer;
        ``"eos"`` that token or an error; ``"none"`` none; any other string that token.

        Raises:
            DataError: ``sep=eos`` and no end-of-text token found, or ``sep=TOKEN`` not a token
                of this tokenizer.
        """
        if sep == NO_SEP:
            return None
        if sep is not None and sep != EOS:
            found = self.inner.token_to_id(sep)
            if found is None:
                raise DataError(f"sep={sep}: not a token of tokenizer {self.path}")
            return Separator(sep, int(found), "sep=")
        if self.eos is not None:
            return self.eos
        where = self.looked
        if sep == EOS:
            raise DataError(
                f"sep=eos: tokenizer {self.path} has no end-of-text token ({where}); name one "
                "with sep=TOKEN, or sep=none"
            )
        warnings.warn(
            f"tokenizer {self.path} has no end-of-text token ({where}): the files of the text "
            "are joined with nothing between them; name one with sep=TOKEN, or sep=none to "
            "say so",
            DataWarning,
            stacklevel=3,
        )
        return None


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


def _spelled(text: str, encoding: Any, specials: dict[int, str]) -> list[str]:
    """The special tokens of ``encoding`` that ``text`` spells where they stand (an unknown
    character's ``[UNK]`` is a special id the text does not spell)."""
    doc = np.asarray(encoding.ids)
    if not specials or len(doc) == 0:
        return []
    at = np.flatnonzero(np.isin(doc, list(specials)))
    if len(at) == 0:
        return []
    offsets = encoding.offsets
    return [
        specials[int(doc[k])]
        for k in at
        if text[offsets[k][0] : offsets[k][1]] == specials[int(doc[k])]
    ]


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
    folder = Path(path) if Path(path).is_dir() else None
    eos, looked = _end_of_text(inner, folder)
    return Tokenizer(
        inner, vocab, str(file.resolve()), hashlib.sha256(data).hexdigest(), eos, looked
    )


def _end_of_text(inner: Any, folder: Path | None) -> tuple[Separator | None, str]:
    """The end-of-text token a tokenizer's ``folder`` names (None: a bare tokenizer.json) or,
    failing that, one of its special tokens; else None and where it was looked for."""
    rejected: list[str] = []
    for name, key in _EOS_KEYS:
        value = None if folder is None else _json(folder / name).get(key)
        if value is None:
            continue
        found = _token_of(inner, value)
        if found is not None:
            return Separator(*found, f"{name}'s {key}"), ""
        rejected.append(f"{name}'s {key} {value!r:.60} is not one of its tokens")
    specials = {t.content: i for i, t in inner.get_added_tokens_decoder().items() if t.special}
    for token in EOS_NAMES:
        if token in specials:
            return Separator(token, specials[token], "tokenizer.json's special tokens"), ""
    names = ", ".join(f"{a}'s {b}" for a, b in _EOS_KEYS)
    looked = [f"the folder names none ({names})"] if folder is not None and not rejected else []
    looked += rejected + [f"no special token of it is one of {', '.join(EOS_NAMES)}"]
    return None, "; ".join(looked)


def _token_of(inner: Any, value: Any) -> tuple[str, int] | None:
    """``(token, id)`` of an ``eos_token`` (a string, or ``{"content": ...}``) or an
    ``eos_token_id`` (an int, or a list whose first is the text's end); None if the tokenizer
    has no such token."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        found = inner.token_to_id(value)
        return None if found is None else (value, int(found))
    if isinstance(value, int) and not isinstance(value, bool):
        # (checked first: the library takes a 32-bit id, and overflows on a larger one)
        token = inner.id_to_token(value) if 0 <= value < inner.get_vocab_size(True) else None
        return None if token is None else (token, value)
    return None


def _json(file: Path) -> dict:
    """A tokenizer folder's JSON file as a dict (``{}`` where there is none): read once, at
    most :data:`TOKENIZER_BYTES`, parsed as data.

    Raises:
        DataError: not a regular file, too large, or not a JSON object.
    """
    if not file.exists():
        return {}
    return read_json_object(file, TOKENIZER_BYTES, DataError, "not a model's settings")
