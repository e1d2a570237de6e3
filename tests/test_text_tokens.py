"""``text:`` data in a model's own tokens (``tokenizer=``, :mod:`compressdrop.data.tokens`): a
pretrained Hugging Face model was trained on byte ids by ``prune my-llama/ --data text:...``,
overwriting what it knew; its folder's ``tokenizer.json`` now encodes the text, and bits per byte
stay comparable across tokenizers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from compressdrop.data import absolute_spec, load_dataset, load_text, with_model_tokenizer
from compressdrop.errors import DataError
from compressdrop.evaluation.metrics import Metrics

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["def ", "return ", "self", "(x)", ":\n    ", " = ", "import os\n", "élan "]


def corpus(path, files: int = 24, words: int = 120):
    """``files`` small Python-like files (one word outside ASCII: bytes per token differ from
    characters per token)."""
    gen = torch.Generator().manual_seed(0)
    path.mkdir()
    for i in range(files):
        idx = torch.randint(len(WORDS), (words,), generator=gen).tolist()
        (path / f"m{i}.py").write_text(f"# file {i}\n" + "".join(WORDS[j] for j in idx))
    return path


def trained_tokenizer(texts, path, vocab: int = 120, eos: str | None = "</s>"):
    """A BPE tokenizer trained on ``texts`` (whitespace split), saved as ``path``; its special
    tokens ``[UNK]`` and ``eos`` (None: no end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["[UNK]"] + ([eos] if eos else [])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials))
    tok.save(str(path))
    return path


def _texts(folder):
    return [p.read_text() for p in sorted(folder.iterdir())]


def test_text_in_a_tokenizers_ids_reads_back_and_counts_its_bytes_per_token(tmp_path):
    text = corpus(tmp_path / "corpus")
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    plain = load_text(text, context=8)
    ds = load_text(text, context=8, tokenizer=tok_file)
    assert ds.num_classes == tok.get_vocab_size(with_added_tokens=True) < 256
    src = ds.source or {}
    assert int(ds.x_train.max()) < ds.num_classes == src["tokenizer"]["vocab"]
    assert src["bytes"] == (plain.source or {})["bytes"]  # the same files in the same splits
    assert ds.bytes_per_token == src["bytes"]["test"] / src["tokens"]["test"] > 1.5
    assert ds.val_bytes_per_token == src["bytes"]["val"] / src["tokens"]["val"] > 1.5
    # a window is the tokenizer's encoding of the text: decoded, it is text of the corpus
    window = ds.x_train[3].tolist() + [int(ds.y_train[3, -1])]
    assert ds.y_train[3, :-1].tolist() == window[1:-1]
    decoded = tok.decode(window)
    assert len(decoded) > 8 and decoded.strip() in "".join(_texts(text))
    # the validation view scores its own split, by its own bytes per token
    _, val = ds.split_validation()
    assert val.bytes_per_token == ds.val_bytes_per_token and val.x_test is ds.x_val


def test_bits_per_byte_are_bits_per_token_over_bytes_per_token(tmp_path):
    text = corpus(tmp_path / "corpus")
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    ds = load_text(text, context=8, tokenizer=tok_file)
    m = Metrics(accuracy=0.5, nll=2.0, n=10)
    got = m.record("test_", ds)["test_bits_per_byte"]
    assert got == pytest.approx(2.0 / math.log(2) / ds.bytes_per_token)
    assert got < m.bits  # several bytes a token: fewer bits a byte than a token
    byte_level = load_text(text, context=8)
    assert m.record("", byte_level)["bits_per_byte"] == pytest.approx(m.bits)


def test_a_spec_names_the_tokenizer_and_a_models_folder_adds_its_own(tmp_path):
    text = corpus(tmp_path / "corpus")
    folder = tmp_path / "model"
    folder.mkdir()
    trained_tokenizer(_texts(text), folder / "tokenizer.json")
    spec = f"text:{text},context=8"
    with_tok = with_model_tokenizer(spec, folder)
    assert with_tok == f"{spec},tokenizer={folder.resolve()}"
    ds = load_dataset(with_tok)
    assert (ds.source or {})["tokenizer"]["path"] == str((folder / "tokenizer.json").resolve())
    # what the user says is kept: bytes, another tokenizer, other data, a model file
    assert with_model_tokenizer(f"{spec},tokenizer=bytes", folder).endswith(",tokenizer=bytes")
    assert load_dataset(f"{spec},tokenizer=bytes").num_classes == 256
    assert with_model_tokenizer("digits", folder) == "digits"
    assert with_model_tokenizer(spec, tmp_path / "model.pt") == spec
    assert with_model_tokenizer(spec, text) == spec  # a folder without a tokenizer.json
    # a recorded spec names the tokenizer by an absolute path, as it does the text
    os.chdir(tmp_path)
    recorded = absolute_spec("text:corpus,context=8,tokenizer=model")
    assert recorded == f"text:{text.resolve()},context=8,tokenizer={folder.resolve()}"
    assert absolute_spec("text:corpus,tokenizer=bytes").endswith(",tokenizer=bytes")


def test_tokenizers_that_cannot_be_read_are_refused_by_name(tmp_path):
    text = corpus(tmp_path / "corpus", files=6)
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    with pytest.raises(DataError, match=r"no tokenizer.json \(its tokenizer is vocab.json, "):
        load_text(text, tokenizer=slow)
    (tmp_path / "bad.json").write_text('{"version": "1.0"}')
    with pytest.raises(DataError, match=r"bad\.json: not a tokenizer\.json"):
        load_text(text, tokenizer=tmp_path / "bad.json")
    with pytest.raises(DataError, match=r"missing\.json: no such file"):
        load_text(text, tokenizer=tmp_path / "missing.json")
    os.mkfifo(tmp_path / "fifo.json")  # refused at once, not waited on
    with pytest.raises(DataError, match=r"fifo\.json: not a file"):
        load_text(text, tokenizer=tmp_path / "fifo.json")
    # too little text for one window of tokens: the count is in tokens, the bytes beside it
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokens \(\d+ bytes\), less than one window"):
        load_text(text, tokenizer=tok_file, context=4000)


def test_a_tokenizer_with_more_ids_than_the_model_reads_is_named(tmp_path):
    from torch import nn

    from compressdrop.errors import InputError
    from compressdrop.workflows.sparsify import fit_ids

    text = corpus(tmp_path / "corpus")
    tok_file = trained_tokenizer(_texts(text), tmp_path / "tokenizer.json", vocab=120)
    model = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64))
    ds = load_text(text, context=8, tokenizer=tok_file)
    assert int(ds.x_train.max()) >= 64
    with pytest.raises(InputError, match=r"ids of tokenizer .*tokenizer\.json: is it the model's"):
        fit_ids(model, ds)
    with pytest.raises(InputError, match=r"bytes, 256 ids, unless tokenizer= names the model's"):
        fit_ids(model, load_text(text, context=8))
