"""Document boundaries in ``text:`` data read in a model's tokens (``sep=``): a corpus of many
files was one stream of tokens with nothing between the files, so a window that crossed from one
file into the next saw one file's end glued to the next one's start. The files of a split are
now joined by the tokenizer's end-of-text token, never across splits; bytes are as they were."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from compressdrop.data import DataWarning, load_dataset, load_text
from compressdrop.errors import DataError

from .test_text_tokens import _texts, corpus, trained_tokenizer

tokenizers = pytest.importorskip("tokenizers")


def _stream(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """The tokens a split's windows were cut from (all but the tail no window holds)."""
    return x.flatten().tolist() + y[-1:, -1].tolist()


def _between(stream: list[int], sep: int) -> list[list[int]]:
    """``stream`` cut at each ``sep``."""
    parts: list[list[int]] = [[]]
    for t in stream:
        parts.append([]) if t == sep else parts[-1].append(t)
    return parts


def _encodings(text, tok_file) -> dict[tuple[int, ...], str]:
    """Each file's tokens (encoded alone) → its name."""
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    return {
        tuple(tok.encode(p.read_text(), add_special_tokens=False).ids): p.name
        for p in sorted(text.iterdir())
    }


def test_the_files_of_a_split_are_joined_by_the_end_of_text_token_and_no_split_shares_one(
    tmp_path,
):
    text = corpus(tmp_path / "corpus")
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    eos = tokenizers.Tokenizer.from_file(str(tok_file)).token_to_id("</s>")
    files = _encodings(text, tok_file)
    assert len(files) == 24 and not any(eos in ids for ids in files)  # (no file holds one)
    ds = load_text(text, context=8, tokenizer=tok_file)
    src = ds.source or {}
    assert src["sep"] == {"token": "</s>", "id": eos, "origin": "tokenizer.json's special tokens"}
    seen: list[str] = []
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert x is not None and y is not None
        *whole, tail = _between(_stream(x, y), eos)
        assert len(whole) >= 1  # (each split holds several files: there are separators)
        # between two separators (or before the first) lies exactly one file, never part of one
        assert all(tuple(part) in files for part in whole)
        assert any(ids[: len(tail)] == tuple(tail) for ids in files)  # the last, cut off
        seen += [files[tuple(part)] for part in whole]
    assert len(seen) == len(set(seen))  # no file in two splits
    # a split of k files holds k - 1 separators: none after its last file, none across splits
    tokens = src["tokens"]
    assert sum(tokens.values()) == sum(map(len, files)) + 24 - 3
    # a separator is a token of no bytes: bits per byte charge its bits to the text's bytes
    assert ds.bytes_per_token == src["bytes"]["test"] / tokens["test"]
    plain = load_text(text, context=8, tokenizer=tok_file, sep="none")
    assert ds.bytes_per_token < plain.bytes_per_token
    assert (plain.source or {})["bytes"] == src["bytes"]  # the same files in the same splits


def test_the_sep_option_switches_the_separator(tmp_path):
    text = corpus(tmp_path / "corpus", files=12)
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    eos, unk = tok.token_to_id("</s>"), tok.token_to_id("[UNK]")
    spec = f"text:{text},context=8,tokenizer={tok_file}"

    def stream(ds):
        return _stream(ds.x_train, ds.y_train)

    default, as_eos = load_dataset(spec), load_dataset(f"{spec},sep=eos")
    assert torch.equal(default.x_train, as_eos.x_train) and eos in stream(default)
    none = load_dataset(f"{spec},sep=none")
    assert eos not in stream(none) and (none.source or {})["sep"] is None
    # sep=none: a split is its files' tokens and nothing else; eos: one more between two files
    files = _encodings(text, tok_file)
    counts = [(ds.source or {})["tokens"] for ds in (none, default)]
    assert sum(counts[0].values()) == sum(map(len, files))
    assert sum(counts[1].values()) - sum(counts[0].values()) == 12 - 3  # (12 files, 3 splits)
    other = load_dataset(f"{spec},sep=[UNK]")  # any token of the tokenizer, by its text
    assert unk in stream(other) and eos not in stream(other)
    assert (other.source or {})["sep"] == {"token": "[UNK]", "id": unk, "origin": "sep="}
    assert [t for t in stream(other) if t != unk] == [t for t in stream(default) if t != eos]
    with pytest.raises(DataError, match=r"sep=<\|endoftext\|>: not a token of tokenizer .*"):
        load_dataset(f"{spec},sep=<|endoftext|>")


def test_bytes_are_joined_by_nothing_and_take_no_separator(tmp_path):
    text = corpus(tmp_path / "corpus", files=12)
    spec = f"text:{text},context=8"
    ds = load_dataset(spec)
    assert (ds.source or {}).get("sep") is None and "tokens" not in (ds.source or {})
    # each file begins "# file N": cut there, the stream is whole files with nothing between
    files = {p.read_text() for p in text.iterdir()}
    *whole, tail = bytes(_stream(ds.x_train, ds.y_train)).decode().split("# file ")[1:]
    assert len(whole) >= 2 and all(f"# file {part}" in files for part in whole)
    assert any(f.startswith(f"# file {tail}") for f in files)
    assert torch.equal(load_dataset(f"{spec},sep=none").x_train, ds.x_train)
    for sep in ("eos", "</s>"):
        with pytest.raises(DataError, match=rf"sep={sep} needs tokenizer=: bytes have no"):
            load_dataset(f"{spec},sep={sep}")


def test_a_tokenizer_without_an_end_of_text_token_warns_once_and_joins_nothing(tmp_path):
    text = corpus(tmp_path / "corpus", files=12)
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json", eos=None)
    with pytest.warns(DataWarning) as seen:
        ds = load_text(text, context=8, tokenizer=tok_file)
    assert len(seen) == 1, [str(w.message) for w in seen]  # once, not once a split
    message = str(seen[0].message)
    assert f"tokenizer {tok_file.resolve()} has no end-of-text token" in message
    assert "sep=TOKEN" in message and "</s>" in message  # what it looked for, what to do
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said: no warning
        quiet = load_text(text, context=8, tokenizer=tok_file, sep="none")
    assert torch.equal(quiet.x_train, ds.x_train) and (ds.source or {})["sep"] is None
    with pytest.raises(DataError, match=r"sep=eos: tokenizer .* has no end-of-text token"):
        load_text(text, context=8, tokenizer=tok_file, sep="eos")


def test_a_models_folder_names_its_end_of_text_token(tmp_path):
    """The folder's files come before the tokenizer's special tokens: tokenizer_config.json's
    ``eos_token`` (a string or ``{"content": ...}``), then config.json's and
    generation_config.json's ``eos_token_id`` (the first of a list); one that names no token of
    the tokenizer is passed over, and said where none is found."""
    text = corpus(tmp_path / "corpus", files=6)
    folder = tmp_path / "model"
    folder.mkdir()
    trained_tokenizer(_texts(text), folder / "tokenizer.json", eos=None)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    some = 7  # (an ordinary token: whatever the folder names is taken)
    token = tok.id_to_token(some)

    def origin(**files):
        for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
            (folder / name).unlink(missing_ok=True)
            if name in files:
                (folder / name).write_text(json.dumps(files[name]))
        return (load_text(text, context=8, tokenizer=folder).source or {})["sep"]

    configs = {"config.json": {"eos_token_id": [some, 0]}}
    want = {"token": token, "id": some, "origin": "config.json's eos_token_id"}
    assert origin(**configs) == want
    generation = {"generation_config.json": {"eos_token_id": some}}
    assert origin(**generation)["origin"] == "generation_config.json's eos_token_id"
    named = {"tokenizer_config.json": {"eos_token": {"content": "[UNK]"}}}
    assert origin(**named, **configs)["token"] == "[UNK]"
    # an id past the vocabulary (GPT-2's 50256 in a config of another tokenizer) is passed over
    gpt2 = {"config.json": {"eos_token_id": 50256}}
    assert origin(**gpt2, **generation)["id"] == some
    with pytest.warns(DataWarning, match=r"config\.json's eos_token_id 50256 is not one of its"):
        assert origin(**gpt2) is None
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"config\.json: not JSON"):
        load_text(text, context=8, tokenizer=folder)
    (folder / "config.json").write_text("[1]")
    with pytest.raises(DataError, match=r"config\.json: not a JSON object"):
        load_text(text, context=8, tokenizer=folder)


def test_eval_of_a_slim_folder_replays_the_separator_it_was_trained_with(tmp_path, monkeypatch):
    """A slim folder's ``compressdrop.json`` records the data spec, ``sep=`` with it; ``eval``
    without ``--data`` loads that spec, and so the same stream of tokens."""
    from compressdrop.checkpoint import load_model
    from compressdrop.hf_folder import save_hf_folder
    from compressdrop.workflows import evaluate, evaluate_file

    from .test_hf_folder import _llama_folder, _text

    folder = _llama_folder(tmp_path / "llama")
    text = _text(tmp_path / "corpus")
    trained_tokenizer(_texts(text), folder / "tokenizer.json", vocab=60)
    eos = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("</s>")
    loaded: list = []
    monkeypatch.setattr(
        evaluate, "load_dataset", lambda spec: loaded.append(load_dataset(spec)) or loaded[-1]
    )
    model = load_model(folder)
    for sep in ("", ",sep=none"):
        spec = f"text:{text},context=8,tokenizer={folder}{sep}"
        out = tmp_path / f"slim{sep.replace(',', '_').replace('=', '-')}"
        save_hf_folder(model, out, torch.randint(60, (1, 8)), recipe={"data": {"name": spec}})
        scored = evaluate_file(out, device="cpu")
        replayed = loaded[-1]
        assert torch.equal(replayed.x_test, load_dataset(spec).x_test)
        assert scored["n"] == replayed.y_test.numel()
        assert (eos in _stream(replayed.x_test, replayed.y_test)) == (sep == "")


def test_text_that_spells_a_special_token_is_that_token_with_a_warning_or_text(tmp_path):
    """A review: text that spells a special token (an HTML file's ``</s>`` closing a
    strikethrough) became the end-of-text id with no word, as if the file ended there. It is
    still read so by default (the tokenizer's own reading, which a prepared dump's
    ``<|endoftext|>`` relies on), now with a warning that names the tokens and how often;
    ``special=text`` reads it as the text it is, ``special=token`` keeps the tokens quietly.
    An unknown character's ``[UNK]``, a special id the text does not spell, is not counted."""
    text = corpus(tmp_path / "corpus")
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    eos = tokenizers.Tokenizer.from_file(str(tok_file)).token_to_id("</s>")
    first = sorted(text.iterdir())[0]
    first.write_text(first.read_text() + " <s>é</s> and ü</s>")  # (é, ü: no token of it)

    def eos_count(ds, token: int = eos) -> int:
        splits = ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test))
        return sum(_stream(x, y).count(token) for x, y in splits)

    with pytest.warns(DataWarning, match=r"spells special tokens of tokenizer .*\('</s>' 2×\), "):
        ds = load_text(text, context=8, tokenizer=tok_file, sep="none")
    assert eos_count(ds) == 2  # (sep=none: no separator adds one)
    unk = tokenizers.Tokenizer.from_file(str(tok_file)).token_to_id("[UNK]")
    assert eos_count(ds, unk) >= 2  # é and ü: special ids, not spelled, not in the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = load_text(text, context=8, tokenizer=tok_file, sep="none", special="token")
        spec = f"text:{text},context=8,tokenizer={tok_file},sep=none,special=text"
        as_text = load_dataset(spec)
    assert torch.equal(quiet.x_train, ds.x_train) and torch.equal(quiet.x_test, ds.x_test)
    assert eos_count(as_text) == 0
    assert sum((as_text.source or {})["tokens"].values()) > sum(
        (ds.source or {})["tokens"].values()
    )
    assert ((as_text.source or {})["special"], (ds.source or {})["special"]) == ("text", "token")
    with pytest.raises(DataError, match="special=bogus: use special=token or special=text"):
        load_text(text, context=8, tokenizer=tok_file, special="bogus")
    with pytest.raises(DataError, match="special=text: needs tokenizer="):
        load_text(text, context=8, special="text")
