"""Byte-level text data and next-token training: the ``text:`` data spec splits a corpus by file
into next-byte windows, the loss and metrics score every token, and a recipe trains, gates,
prunes and exports a Hugging Face causal LM (``hf-causal-lm``) on it end to end."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compressdrop.data import load_dataset, load_text
from compressdrop.errors import DataError
from compressdrop.evaluation.metrics import evaluate, logits_of, prediction_loss


def _corpus(root: Path, files: int = 40, size: int = 600) -> Path:
    """Files of code-like text, each starting with its own line (found again in the splits)."""
    gen = torch.Generator().manual_seed(0)
    words = [b"def ", b"return ", b"self", b"(x)", b":\n    ", b" = ", b"import os\n", b"# note\n"]
    for i in range(files):
        idx = torch.randint(len(words), (size // 4,), generator=gen).tolist()
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        head = f"# module {i} of the test corpus, file pkg{i % 3}/m{i}.py\n".encode()
        (sub / f"m{i}.py").write_bytes((head + b"".join(words[j] for j in idx))[:size])
    (root / ".hidden.py").write_bytes(b"never read")
    return root


def test_folder_splits_by_file_into_shifted_windows(tmp_path):
    root = _corpus(tmp_path / "c")
    ds = load_text(root, context=16, glob="**/*.py")
    assert ds.task == "lm" and ds.num_classes == 256 and ds.input_shape == (16,)
    src = ds.source
    assert src is not None and src["files"] == 40
    total = sum(src["bytes"].values())
    assert total == sum(len(p.read_bytes()) for p in root.glob("pkg*/*.py"))
    # the shares of bytes, file by file (each file 600 bytes: within one file of the target)
    assert abs(src["bytes"]["test"] - 0.1 * total) <= 600
    assert abs(src["bytes"]["val"] - 0.1 * total) <= 600
    # y is x shifted by one byte, and windows follow each other without overlap
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    assert torch.equal(ds.y_train[:-1, -1], ds.x_train[1:, 0])
    # each file goes whole to one split: its text is found in exactly one split's byte stream
    # (a split may cut its last file short: the windows stop at a multiple of the context)
    where = {"train": ds.x_train, "val": ds.x_val, "test": ds.x_test}
    streams = [bytes(v.flatten().to(torch.uint8).tolist()) for v in where.values()]
    found = [sum(p.read_bytes()[:64] in s for s in streams) for p in root.glob("pkg*/*.py")]
    assert max(found) == 1 and sum(found) >= len(found) - 3
    # the same corpus gives the same split and digest
    again = load_text(root, context=16, glob="**/*.py")
    assert again.source == src and torch.equal(again.x_test, ds.x_test)
    train, val = ds.split_validation(0.1, seed=5)
    assert train is ds and torch.equal(val.x_test, ds.x_val) and val.name.endswith("/val")


def test_single_file_splits_by_position_and_spec_options(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(bytes(range(256)) * 40)
    ds = load_dataset(f"text:{f},context=32,val_fraction=0.2,test_fraction=0.1")
    assert ds.source["bytes"] == {"train": 7168, "val": 2048, "test": 1024}
    assert ds.x_train[0, :4].tolist() == [0, 1, 2, 3]
    assert ds.x_test[0, 0].item() == (7168 + 2048) % 256
    small = load_dataset(f"text:{f},context=8,max_bytes=1000")
    assert sum(small.source["bytes"].values()) == 1000


@pytest.mark.parametrize(
    "spec, message",
    [
        ("text:{d}/none", "no such file"),
        ("text:{d},context=1", "context must be at least 2"),
        ("text:{d},colour=red", "unknown option"),
        ("text:{d},context=big", "bad option value"),
        ("text:{d},glob=*.rst", "no files match"),
        ("text:{d},glob=/etc/*", "is not a pattern of files in it"),  # a raw NotImplementedError
        ("text:{d},glob=", "is not a pattern of files in it"),  # a raw ValueError
        ("text:{d},context=5000", "less than one window"),
        ("text:{d},test_fraction=0", "must leave some text"),
    ],
)
def test_bad_text_specs_name_the_problem(tmp_path, spec, message):
    root = _corpus(tmp_path / "c", files=12)
    with pytest.raises((DataError, FileNotFoundError), match=message):
        load_dataset(spec.format(d=root))


def test_per_token_loss_and_metrics():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=gen)
    y = torch.randint(7, (3, 5), generator=gen)
    want = F.cross_entropy(logits.reshape(15, 7), y.reshape(15))
    assert torch.allclose(prediction_loss(logits, y), want)
    assert torch.allclose(prediction_loss({"logits": logits}, y, "sum"), want * 15)
    assert logits_of((logits, "cache")) is logits

    class Out:
        def __init__(self, t):
            self.logits = t

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return Out(logits[: len(x)] + self.w)

    m = evaluate(Model(), torch.zeros(3, 5), y)
    assert m.n == 15 and math.isclose(m.nll, float(want), rel_tol=1e-6)
    assert math.isclose(m.bits, float(want) / math.log(2), rel_tol=1e-6)
    assert m.accuracy == int((logits.argmax(-1) == y).sum()) / 15
    with pytest.raises(TypeError, match="cannot find the logits"):
        logits_of("text")


def test_a_recipe_trains_gates_prunes_and_exports_a_causal_lm(tmp_path, capsys):
    pytest.importorskip("transformers")
    from compressdrop.checkpoint import load_model
    from compressdrop.recipes import load_recipe
    from compressdrop.training.runner import run_recipe

    root = _corpus(tmp_path / "c", files=30, size=800)
    recipe = load_recipe("gpt-lognormal").override(
        {
            "data.name": f"text:{root},context=16,glob=**/*.py",
            "data.batch_size": 16,
            "model.kwargs": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4},
            "stages.pretrain.epochs": 2,
            "stages.sparsify.epochs": 3,
            "stages.sparsify.gate_lr": 0.1,
            "stages.finetune.epochs": 1,
            # pressure on a tiny corpus (1,300 windows) that removes some heads and neurons
            # (here 2 of 4 heads and half the neurons; β = 20 leaves one head, 3: three)
            "kl.beta": 8.0,
            "kl.warmup": 0,
            "gates.kl_cost": "flops",
            "gates.kl_scale": {},  # the counts above are without the shipped heads' factor
        }
    )
    ds = load_dataset(recipe.data.name)
    with pytest.warns(Warning) as record:
        result = run_recipe(recipe, ds, tmp_path / "run")
    said = " ".join(str(w.message) for w in record)
    assert "LayerNorm" in said  # the residual stream is left ungated, and the user told why
    assert "GPT2Config cannot describe heads" in said  # a free shape: kept as .pt/.pt2/ONNX
    rep = result.report
    assert rep["dense"]["test_bits_per_byte"] == pytest.approx(
        rep["dense"]["test_nll"] / math.log(2)
    )
    assert 0 < rep["slim"]["test_bits_per_byte"] < 8  # below a uniform guess over bytes
    kinds = {r["name"].rsplit(".", 2)[-2] for r in rep["layers"]}
    assert kinds == {"attn", "mlp"}  # the heads and the MLP neurons were gated
    assert rep["slim"]["params"] < rep["dense"]["params"]
    for name in ("gated.pt", "slim.pt", "slim.onnx", "slim.pt2", "report.json"):
        assert (tmp_path / "run" / name).is_file(), name
    slim = load_model(tmp_path / "run" / "slim.pt").eval()
    x = ds.x_test[:2]
    assert slim.arch["name"] == "hf-causal-lm"
    assert evaluate(slim, ds.x_test, ds.y_test).nll == pytest.approx(rep["slim"]["test_nll"])
    assert logits_of(slim(x)).shape == (2, 16, 256)
    from compressdrop.errors import InputError
    from compressdrop.workflows import evaluate_file, export_file  # what the CLI runs

    with pytest.raises(InputError, match="cannot write a Hugging Face folder"):  # GPT-2 heads
        export_file(tmp_path / "run" / "slim.pt", tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    res = evaluate_file(tmp_path / "run" / "slim.pt", recipe.data.name)
    assert res["bits_per_byte"] == pytest.approx(rep["slim"]["test_bits_per_byte"])
    assert res["n"] == ds.y_test.numel()
    # the ONNX file takes token ids as integers, scored per token as in PyTorch (it cast them to
    # float32 and scored sequences as classes); Monte-Carlo of the gated LM, per token
    res = evaluate_file(tmp_path / "run" / "slim.onnx", recipe.data.name)
    assert res["bits_per_byte"] == pytest.approx(rep["slim"]["test_bits_per_byte"], rel=1e-4)
    assert res["n"] == ds.y_test.numel()
    mc = evaluate_file(tmp_path / "run" / "gated.pt", recipe.data.name, mc_samples=3)["mc"]
    assert mc["samples"] == 3 and 0 < mc["nll"] < math.log(256)
    # a sampling graph of it (GPT-2's dropout layers sampled too: the exporter had written them
    # as the identity, and the graph failed its check), scored per token like the rest
    from compressdrop.workflows import prune_file

    with pytest.warns(Warning, match="cannot describe heads"):
        prune_file(tmp_path / "run" / "gated.pt", tmp_path / "mc.onnx", mc_samples=4)
    res = evaluate_file(tmp_path / "mc-mc.onnx", recipe.data.name)
    assert res["mc"]["samples"] == 4 and res["n"] == ds.y_test.numel()
    assert res["bits_per_byte"] == pytest.approx(res["nll"] / math.log(2))
    assert res["bits_per_byte"] == pytest.approx(rep["slim"]["test_bits_per_byte"], rel=0.2)
    # the files a run writes take any sequence length (they were fixed at the data's 16), and the
    # .pt2 loads where transformers is not imported (its ModelOutput is written as a dict)
    import onnx

    (inp,) = onnx.load(str(tmp_path / "run" / "slim.onnx")).graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim][1] != 16
    code = (
        "import sys, torch\n"
        f"m = torch.export.load({str(tmp_path / 'run' / 'slim.pt2')!r}).module()\n"
        "out = m(torch.full((3, 9), 7))\n"
        "assert type(out) is dict and out['logits'].shape == (3, 9, 256), out\n"
        "assert 'transformers' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    res = evaluate_file(tmp_path / "run" / "slim.onnx", f"text:{root},context=8,glob=**/*.py")
    assert 0 < res["bits_per_byte"] < 8  # another context than the export's
    # a threshold sweep of the gated LM speaks in bits per byte: its rows, Pareto front, table
    # and dense reference (issue 18 noticed it reporting accuracy and nats only)
    from compressdrop.gating import named_gates
    from compressdrop.reporting import sweep_text
    from compressdrop.workflows import sweep_file

    gated = load_model(tmp_path / "run" / "gated.pt")  # the plan's warnings are not said again
    snr = torch.cat([g.snr().detach() for _, g in named_gates(gated)])
    thr = [float(snr.quantile(q)) for q in (0.3, 0.7)]
    res = sweep_file(
        tmp_path / "run" / "gated.pt",
        recipe.data.name,
        thresholds=thr,
        out=tmp_path / "sw",
        batch=4,
        threads=1,
    )
    rows = res["rows"]
    assert len(rows) == 3 and all(
        r["bits_per_byte"] == pytest.approx(r["nll"] / math.log(2)) for r in rows
    )
    front = [r for r in rows if r["pareto"]]
    assert front and all(  # no row beside the front is as small and has fewer bits per byte
        not (o["flops"] <= r["flops"] and o["bits_per_byte"] < r["bits_per_byte"])
        for r in front
        for o in rows
    )
    assert res["dense"]["test_bits_per_byte"] == pytest.approx(rep["dense"]["test_bits_per_byte"])
    sweep_text(res, 4, 1)
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "test acc" not in printed
    assert f"test bits/byte {rep['dense']['test_bits_per_byte']:.4f}" in printed
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bytes_for_a_model_with_a_bigger_vocabulary_are_warned_about(tmp_path):
    """`text:` data are bytes; a model with a tokenizer's vocabulary was trained on them as its
    own ids without a word (a pretrained model's knowledge overwritten)."""
    from compressdrop.data import DataWarning, load_dataset
    from compressdrop.workflows.sparsify import fit_outputs

    class Lm(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

        def forward(self, x):
            return self.out(self.emb(x))

    ds = load_dataset(f"text:{_corpus(tmp_path / 'corpus')},context=16")
    with pytest.warns(DataWarning, match="bytes .ids 0-255. as tokens, not your tokenizer's"):
        fit_outputs(Lm(1000), ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_outputs(Lm(256), ds)  # a byte-level model: nothing to say


def test_the_default_recipe_for_text_takes_the_language_models_gates(tmp_path):
    """`prune my-llama/ --data text:...` without --recipe used LeNet-300-100's gate settings
    (β = 1, a uniform KL over units, per-example): it pruned little in many epochs."""
    from compressdrop.recipes import load_recipe
    from compressdrop.workflows import default_recipe_for

    gpt = load_recipe("gpt-lognormal")
    r = default_recipe_for(load_dataset(f"text:{_corpus(tmp_path / 'corpus')},context=16"))
    assert (r.gates, r.kl.beta, r.data.batch_size) == (gpt.gates, gpt.kl.beta, gpt.data.batch_size)
    assert r.stages.pretrain.epochs == 0 and "language model (the gates of gpt-lognormal)" in (
        r.description
    )
    digits = default_recipe_for(load_dataset("digits"))
    assert digits.gates == load_recipe("lenet300-lognormal").gates


def test_the_vocabulary_is_the_embedding_of_the_ids_not_the_first_one(tmp_path):
    """A model that registers its position table (16) before its token embedding (256) was
    refused on byte data: "token ids up to 122 but the model's vocabulary has 16" (a review)."""
    from compressdrop.workflows.sparsify import fit_ids

    class PositionsFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.tok = torch.nn.Embedding(16, 8), torch.nn.Embedding(256, 8)
            self.head = torch.nn.Linear(8, 256)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    ds = load_dataset(f"text:{_corpus(tmp_path / 'corpus')},context=16")
    assert fit_ids(PositionsFirst(), ds) is ds


def test_text_too_big_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Text becomes int64 tokens, up to 8 bytes a byte: a corpus past the memory was read and
    windowed until the system killed the process. The files' sizes are checked first (here
    against a memory made small), and ``max_bytes`` reads less; a single file is read only up
    to ``max_bytes`` now (it was read whole, then cut), and a FIFO is named as what it is."""
    import os

    import compressdrop.data.dataset as dataset

    root = _corpus(tmp_path / "corpus")  # 40 files of 600 bytes (and a hidden one)
    monkeypatch.setattr(dataset, "available_memory", lambda: 8 * 24_000 * 2)  # 40 % of it: 19 KB
    with pytest.raises(
        DataError, match=r"24,010 bytes of text take 0\.0 GB as int64 tokens, more "
    ):
        load_text(root)
    assert (load_text(root, max_bytes=12_000).source or {})["files"] == 20
    one = root / "pkg0" / "m0.py"
    one.write_bytes(one.read_bytes() * 40)  # 24,000 bytes
    with pytest.raises(DataError, match=r"m0\.py: 24,000 bytes of text .*\(max_bytes=N\)"):
        load_text(one)
    assert sum((load_text(one, max_bytes=9_000).source or {})["bytes"].values()) == 9_000
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DataError, match=r"fifo\.txt: not a file or a folder of text"):
        load_text(tmp_path / "fifo.txt")
