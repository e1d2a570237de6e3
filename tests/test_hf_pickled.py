"""A pickled Hugging Face model (``torch.save(model)``, ``--trust-pickle``) is recorded as a
``torch.export`` program of its dense structure. A new-user walk found two faults: a decoder with
its key/value cache on could not be recorded at all (torch.export cannot flatten a
``DynamicCache`` output), and every token-id model was recorded at its example's length, so its
slim ``.pt2`` and ``.onnx`` took that length alone and a slim decoder could not generate."""

from __future__ import annotations

import warnings

import pytest
import torch

from compressdrop.programs.records import load_program, program_record
from compressdrop.runtime import max_length

from .test_hf_folder import RECIPE, _text

transformers = pytest.importorskip("transformers")

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 48, "max_position_embeddings": 64, "vocab_size": 64}  # fmt: skip


def _bert():
    config = transformers.BertConfig(**SIZES, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _llama(vocab: int = 64):
    config = transformers.LlamaConfig(**{**SIZES, "vocab_size": vocab}, num_key_value_heads=2)
    assert config.use_cache  # the default: generate's cache
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_a_pickled_model_is_recorded_at_any_length_its_positions_allow(build):
    torch.manual_seed(0)
    model = build()
    record = program_record(model, torch.randint(3, 64, (2, 16)))
    rebuilt = load_program(record["program"].numpy().tobytes(), "recorded")
    assert max_length(rebuilt) == 64  # its position table's, for the slim model's exports
    assert model.config.use_cache is True  # put back after the recording
    for length in (5, 16, 40):
        ids = torch.randint(3, 64, (3, length))
        with torch.no_grad():
            got, want = rebuilt(ids), model(ids).logits
        got = got.logits if hasattr(got, "logits") else got
        torch.testing.assert_close(got, want)


def test_a_pickled_decoder_prunes_to_a_program_of_any_length(tmp_path):
    from compressdrop.workflows import prune_file

    torch.manual_seed(0)
    torch.save(_llama(vocab=256), tmp_path / "llama.pt")
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream is left ungated (LayerNorm)
        prune_file(
            tmp_path / "llama.pt",
            tmp_path / "slim.pt2",
            recipe=str(tmp_path / "tiny.yaml"),
            data=f"text:{_text(tmp_path / 'corpus')},context=16",
            trust_code=True,
        )
    slim = torch.export.load(tmp_path / "slim.pt2").module()
    for length in (5, 16, 40):
        out = slim(torch.randint(256, (2, length)))
        assert out["logits"].shape == (2, length, 256)  # a ModelOutput (a dict)
