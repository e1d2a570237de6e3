"""The heads of Hugging Face families whose layout ties heads to something outside their own
rows: BLOOM's and MPT's ALiBi, Falcon's (folded into the attention mask) and MPNet's relative position
bias, built once for the config's head count and handed to every layer, and CodeGen's
``qkv_proj`` packed in ``mp_num`` blocks. Each layer removes its own heads exactly (the slim
model equals the masked one, a decoder generates the same), the slim model keeps the library's
classes, and it exports to ``.pt2`` and ONNX.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gating.gated import HeadGated

from .test_hf import TOKENS, VOCAB, _attach_and_prune, _padded_batch, check_against_masked

transformers = pytest.importorskip("transformers")

CODEGEN = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4}
FALCON = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "alibi": True,
    "multi_query": False,
}
MODELS = {
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", CODEGEN),
    # two heads in each of the four blocks: a prune may leave the blocks even or not
    "codegen_8": ("CodeGenConfig", "CodeGenForCausalLM", {**CODEGEN, "n_embd": 64, "n_head": 8}),
    # Falcon's ALiBi, folded into the mask: multi-head, and grouped (two query heads a key/value
    # head)
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM", FALCON),
    "falcon_alibi_grouped": ("FalconConfig", "FalconForCausalLM",
                             {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),
    # MPT: ALiBi (heads, 1, keys) built by MptModel, a packed Wqkv [q; k; v]
    "mpt": ("MptConfig", "MptForCausalLM", {"d_model": 32, "n_layers": 2, "n_heads": 4,
                                             "expansion_ratio": 2, "max_seq_len": 64}),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification",
              {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 48, "max_position_embeddings": 64, "num_labels": 3}),
}  # fmt: skip
# per family: its layers, their attention, its head count, its output projection
LAYOUT = {
    "bloom": ("transformer.h", "self_attention", "num_heads", "dense"),
    "falcon": ("transformer.h", "self_attention", "num_heads", "dense"),
    "codegen": ("transformer.h", "attn", "num_attention_heads", "out_proj"),
    "mpnet": ("mpnet.encoder.layer", "attention.attn", "num_attention_heads", "o"),
    "mpt": ("transformer.blocks", "attn", "n_heads", "out_proj"),
}


def _build(name: str):
    config_cls, model_cls, sizes = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TOKENS, **sizes)
    return getattr(transformers, model_cls)(config).eval()


def _names(model, name: str) -> list[str]:
    """The attentions' module names, layer by layer."""
    layers, path, _, _ = LAYOUT[name.split("_")[0]]
    return [f"{layers}.{i}.{path}" for i in range(len(model.get_submodule(layers)))]


def _attentions(model, name: str) -> list:
    return [model.get_submodule(n) for n in _names(model, name)]


def _heads(model, name: str) -> list[int]:
    count = LAYOUT[name.split("_")[0]][2]
    return [int(getattr(a, count)) for a in _attentions(model, name)]


def _zero_heads(model, name: str, per_layer: list[list[int]]):
    """A copy of ``model`` with heads ``per_layer[i]`` of layer ``i`` zeroed (their columns of
    the output projection): what a masked model computes."""
    out = copy.deepcopy(model)
    o = LAYOUT[name.split("_")[0]][3]
    with torch.no_grad():
        for a, heads in zip(_attentions(out, name), per_layer, strict=True):
            layer = a.get_submodule(o)
            D = layer.in_features // int(getattr(a, LAYOUT[name.split("_")[0]][2]))
            for h in heads:
                layer.weight[:, h * D : (h + 1) * D] = 0
    return out


def _remove_heads(model, name: str, per_layer: list[list[int]]):
    """A copy of ``model`` without heads ``per_layer[i]`` of layer ``i``, as surgery removes them."""
    from compressdrop.gating.heads import remove_heads_
    from compressdrop.gating.known import register_for

    out = copy.deepcopy(model)
    register_for(out)  # (attach does this first)
    for attention, heads in zip(_names(out, name), per_layer, strict=True):
        if heads:
            remove_heads_(out, attention, heads)
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_prune_exactly_per_layer(name):
    """Gated and pruned at the median SNR: every layer loses its own pruned heads (counted
    against the gates), the slim model equals the masked one, and a decoder generates the same
    tokens with its cache."""
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids)
    gates = [m.gate for m in model.modules() if isinstance(m, HeadGated)]
    assert len(gates) == 2
    blocks = 2 if name.endswith("grouped") else 1  # every key/value head keeps as many
    kept = [
        blocks * int((g.snr() >= thr).view(blocks, -1).sum(1).max().clamp(min=1)) for g in gates
    ]
    assert _heads(slim, name) == kept
    assert sum(kept) < sum(_heads(model, name))
    check_against_masked(slim, model, thr, causal="CausalLM" in MODELS[name][1])


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "mpnet", "mpt"])
def test_each_layer_takes_its_own_heads_of_the_shared_bias(name, with_mask):
    """Different heads out of each layer (BLOOM builds its ALiBi bias with a mask or without
    one): equal to zeroing them; the shared bias and the library's classes stay, and a second
    removal composes with the first."""
    model = _build(name)
    cut = [[0, 2], [3]]
    slim = _remove_heads(model, name, cut)
    assert _heads(slim, name) == [2, 3]
    for a, base in zip(_attentions(slim, name), _attentions(model, name), strict=True):
        assert isinstance(a, type(base))
    if name == "mpnet":  # the embedding keeps a column per head of the config
        assert slim.mpnet.encoder.relative_attention_bias.weight.shape[1] == 4
    again = _remove_heads(slim, name, [[1], [0, 2]])  # heads 3 of layer 0, 0 and 2 of layer 1
    assert _heads(again, name) == [1, 1]
    ids, mask = _padded_batch()
    kw = {"attention_mask": mask} if with_mask else {}
    with torch.no_grad():
        want = _zero_heads(model, name, cut)(input_ids=ids, **kw).logits
        got = slim(input_ids=ids, **kw).logits
        want2 = _zero_heads(model, name, [[0, 2, 3], [0, 2, 3]])(input_ids=ids, **kw).logits
        got2 = again(input_ids=ids, **kw).logits
    keep = mask.bool() if "CausalLM" in MODELS[name][1] else slice(None)
    assert _rel(got[keep], want[keep]) <= 1e-5
    assert _rel(got2[keep], want2[keep]) <= 1e-5


@pytest.mark.parametrize(
    ("cut", "blocks"), [([[0, 2, 4, 6], [1]], [4, 1]), ([[0, 1], [5, 6, 7]], [1, 1])]
)
def test_codegen_heads_leave_its_blocks_exactly(cut, blocks):
    """CodeGen's qkv_proj holds [q; v; k] of two heads in each of four blocks: heads that leave
    every block evenly keep the blocks; others become one block; either is exact."""
    model = _build("codegen_8")
    slim = _remove_heads(model, "codegen_8", cut)
    attns = _attentions(slim, "codegen_8")
    assert [a.mp_num for a in attns] == blocks
    assert [a.qkv_proj.out_features for a in attns] == [3 * 8 * (8 - len(c)) for c in cut]
    ids, mask = _padded_batch()
    with torch.no_grad():
        want = _zero_heads(model, "codegen_8", cut)(input_ids=ids, attention_mask=mask).logits
        got = slim(input_ids=ids, attention_mask=mask).logits
    assert _rel(got[mask.bool()], want[mask.bool()]) <= 1e-5


@pytest.mark.slow  # about 20 s each: the ONNX exporter
@pytest.mark.parametrize("name", ["bloom", "codegen", "falcon_alibi", "mpnet", "mpt"])
def test_slim_models_export_verified(name, tmp_path):
    """The slim model (fewer heads per layer) writes a .pt2 and an ONNX file, each checked
    against it at two batch sizes and another length. Falcon's ALiBi model, dense or slim, has
    no ONNX: transformers builds its slopes in bfloat16, whose Mul onnxruntime's CPU lacks.
    MPT's, dense or slim, has no .pt2 with a dynamic length: ``torch.export`` refuses the
    guard its bias slice (``max(0, positions - length)``) puts on the length."""
    from compressdrop.export import export_program

    slim = _remove_heads(_build(name), name, [[1, 2], [0]])
    ids = torch.randint(3, VOCAB, (2, 8))
    kw = {"check_batch_sizes": (1, 3), "check_lengths": (5,)}
    reps = [export_program(slim, ids, tmp_path / "s.pt2", **kw)] if name != "mpt" else []
    if name != "falcon_alibi":
        reps.append(cd.export_onnx(slim, ids, tmp_path / "s.onnx", **kw))
    for rep in reps:
        assert set(rep.max_rel_error) == {1, 3, "length 5"}
        assert max(rep.max_rel_error.values()) <= 1e-4


def test_a_slim_bloom_reloads_as_checkpoint_and_pickle(tmp_path):
    """A compressdrop checkpoint replays the head removal on a fresh model (the kept heads'
    bias indices are rebuilt, not stored), and a pickled slim model loads whole; a Hugging Face
    folder is refused (the config derives the head size from the head count)."""
    from compressdrop.checkpoint import load_model, save_model
    from compressdrop.gating.known import heads_fixed_by_config
    from compressdrop.models import build_model

    model = build_model("hf-causal-lm", (16,), VOCAB, model_type="bloom", n_layer=2,
                        hidden_size=32, n_head=4).eval()  # fmt: skip
    assert heads_fixed_by_config(model) == ("hidden_size / n_head", "BloomAttention")
    ids = torch.randint(3, VOCAB, (2, 16))
    slim, _ = _attach_and_prune(model, ids)
    assert [b.self_attention.num_heads for b in slim.transformer.h] != [4, 4]
    save_model(slim, tmp_path / "slim.pt")
    buf = io.BytesIO()
    torch.save(slim, buf)
    buf.seek(0)
    with torch.no_grad():
        want = slim(ids).logits
        for back in (load_model(tmp_path / "slim.pt"), torch.load(buf, weights_only=False)):
            assert _heads(back, "bloom") == _heads(slim, "bloom")
            torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)


def test_bloom_heads_stay_where_its_tensor_parallel_path_slices_them():
    """BLOOM's ``slow_but_exact`` path (``pretraining_tp`` > 1) splits the heads' features by
    the hidden size: those attentions keep their heads, with a warning that says why (its MLP
    products are not Linear layers either: nothing is left to gate)."""
    model = transformers.BloomForCausalLM(
        transformers.BloomConfig(**TOKENS, hidden_size=32, n_layer=2, n_head=4,
                                 pretraining_tp=2, slow_but_exact=True)
    ).eval()  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="no gateable layer"):
            cd.attach(model, "lognormal", example_inputs=ids)
    why = "keeps all its heads: its slow_but_exact tensor-parallel path"
    assert sum(why in str(w.message) for w in caught) == 2  # one per layer


def test_a_subclass_of_the_bloom_attention_keeps_its_heads():
    """A user's own subclass of ``BloomAttention`` may read the bias otherwise: its heads stay,
    with a warning that names it, and the model is left as it was."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    model = _build("bloom")
    mine = type("MyBloomAttention", (BloomAttention,), {})
    for block in model.transformer.h:
        block.self_attention.__class__ = mine
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cd.attach(model, "lognormal", example_inputs=ids)
    assert not [m for m in model.modules() if isinstance(m, HeadGated)]
    assert sum("MyBloomAttention derives from" in str(w.message) for w in caught) == 2
    assert {type(b.self_attention) for b in model.transformer.h} == {mine}
