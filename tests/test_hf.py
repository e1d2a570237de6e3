"""Hugging Face transformers (the ``hf`` extra), built from small configs with random weights:
the MLP neurons of a LLaMA-style decoder (SwiGLU, grouped-query attention) and of GPT-2 (its
``Conv1D`` layers) and heads, and BERT's heads and MLP neurons, are gated and pruned exactly,
and a pruned decoder generates what the masked one does, with its cache.

The decoders' heads are gated too: GPT-2's (its packed ``c_attn`` cut per head) and LLaMA's
grouped-query heads (every key/value head keeps as many query heads), and the slim models export
to ONNX with dynamic sequence length. Not yet (issue 16): configs that ``from_pretrained``
reloads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import compressdrop as cd
from compressdrop.gates import GATES

from .prewarmed import Prewarmed

transformers = pytest.importorskip("transformers")

VOCAB = 64


# Small configs: 2 layers of width 32, 4 heads (LLaMA: 2 key/value heads), MLPs of 48 (GPT-2: 4 × 32)
TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# the decoders share one shape (Gemma's head size is its own field); the encoders another
DECODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}  # fmt: skip
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "max_position_embeddings": 64, "num_labels": 3}  # fmt: skip
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 8}),
    # Gemma 2: eager attention (soft-capped scores), which returns its per-head weights
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DECODER, "head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**DECODER, "head_dim": 8, "sliding_window": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {
        "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
    }),
    "bert": ("BertConfig", "BertForSequenceClassification", ENCODER),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", ENCODER),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification",
                {**ENCODER, "embedding_size": 16}),
}  # fmt: skip


def _build(name: str):
    """The model ``name`` of :data:`MODELS`, random weights, in eval mode."""
    config_cls, model_cls, sizes = MODELS[name]
    config = getattr(transformers, config_cls)(**TOKENS, **sizes)
    return getattr(transformers, model_cls)(config).eval()


def _attach_and_prune(model, ids, family: str = "lognormal"):
    """Gate ``model``, spread the SNRs, prune at the median; the slim model and the threshold."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the residual stream, the heads
        cd.attach(model, family, example_inputs=ids)
    gates = list(cd.named_gates(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, g in gates:
            for p in g.parameters():  # every family: move each unit's parameters apart
                p.add_(torch.empty_like(p).uniform_(-2, 2))
    thr = float(torch.cat([g.snr().detach() for _, g in gates]).median())
    with warnings.catch_warnings():  # free shapes: the config cannot describe them (tested below)
        warnings.simplefilter("ignore", cd.PruningWarning)
        return cd.prune(model, thr, example_inputs=ids), thr


def _padded_batch():
    """Two prompts of 5 and 8 tokens, left-padded for generation, with their attention mask."""
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def masked_error(slim, model, causal: bool = True) -> float:
    """The largest difference of ``slim``'s logits from ``model``'s (masked), relative to the
    largest of ``model``'s, on :func:`_padded_batch`; a causal model's padded positions attend
    to nothing, so their logits are left out."""
    ids, mask = _padded_batch()
    with torch.no_grad():
        got = slim(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool() if causal else slice(None)
    return float((got - want)[keep].abs().max() / want[keep].abs().max())


def check_against_masked(slim, model, thr: float, causal: bool = True) -> None:
    """Mask ``model`` at ``thr``: ``slim``'s logits match it (:func:`masked_error` ≤ 1e-5) and,
    for a causal LM, greedy generation from left-padded prompts gives the same tokens."""
    with warnings.catch_warnings():  # a layer kept at one unit: prune said so (and was let)
        warnings.simplefilter("ignore", cd.PruningWarning)
        cd.mask_(model, thr)
    assert masked_error(slim, model, causal) <= 1e-5
    if causal:
        ids, mask = _padded_batch()
        kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(slim.generate(ids, **kw), model.generate(ids, **kw))


def _mlp_widths(slim, name: str) -> list[set[int]]:
    """Per layer, the widths that must agree after surgery (one set each)."""
    if name == "llama":
        return [
            {m.gate_proj.out_features, m.up_proj.out_features, m.down_proj.in_features}
            for m in (layer.mlp for layer in slim.model.layers)
        ]
    return [  # GPT-2's Conv1D: weight (in, out), nf/nx its widths
        {m.c_fc.nf, m.c_fc.weight.shape[1], m.c_fc.bias.shape[0], m.c_proj.nx}
        for m in (block.mlp for block in slim.transformer.h)
    ]


def _check_gqa(slim, kv_heads: int) -> None:
    """The slim LLaMA's attentions: widths agree, key/value heads are kept, fewer query heads."""
    queries = []
    for layer in slim.model.layers:
        a = layer.self_attn  # its own record follows (repeat_kv reads num_key_value_groups)
        q, kv = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
        assert (
            a.o_proj.in_features
            == a.q_proj.out_features
            == a.num_key_value_groups * kv * a.head_dim
        )
        assert a.v_proj.out_features == a.k_proj.out_features
        assert kv == kv_heads or a.num_key_value_groups == 1  # heads of their own go with their q
        queries.append(q)
    assert sum(queries) < 8


@pytest.mark.parametrize("family", list(GATES))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoder_mlp_neurons_prune_exactly_and_generate_as_masked(name, family):
    torch.manual_seed(0)
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids, family)
    # LLaMA's SwiGLU: one gate per hidden unit, on up_proj; gate_proj and down_proj are cut with
    # it. GPT-2: on c_fc (a Conv1D), through its tanh GELU
    site = {"llama": "model.layers.{}.mlp.up_proj", "gpt2": "transformer.h.{}.mlp.c_fc"}[name]
    names = [n for n, _ in cd.named_gates(model)]
    assert [n for n in names if ".mlp." in n] == [site.format(i) for i in range(2)]
    for widths in _mlp_widths(slim, name):
        assert len(widths) == 1 and widths.pop() < {"llama": 48, "gpt2": 128}[name]
    if name == "llama":  # grouped-query heads: every key/value head keeps as many query heads
        assert [n for n in names if ".self_attn." in n] == [
            f"model.layers.{i}.self_attn.o_proj" for i in range(2)
        ]
        _check_gqa(slim, kv_heads=2)
    if name == "gpt2":  # and its heads: one gate per head on c_proj's input, the packed c_attn cut
        assert [n for n in names if ".attn." in n] == [
            f"transformer.h.{i}.attn.c_proj" for i in range(2)
        ]
        heads = []
        for block in slim.transformer.h:
            a = block.attn  # the module's own attributes follow: nothing to patch
            width = a.num_heads * a.head_dim
            assert a.split_size == width == a.c_proj.nx == a.c_attn.nf // 3
            assert a.c_attn.weight.shape == (32, 3 * width) and a.c_proj.weight.shape == (width, 32)
            heads.append(a.num_heads)
        assert sum(heads) < 8
    assert slim.prune_report.max_rel_error <= 1e-5
    cd.mask_(model, thr)
    assert masked_error(slim, model) <= 1e-5
    ids, mask = _padded_batch()
    kwargs = {"attention_mask": mask, "max_new_tokens": 32, "do_sample": False}
    kwargs |= {"pad_token_id": 0, "use_cache": True}
    assert torch.equal(slim.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_llama_with_a_key_value_head_per_query_head_loses_them_together():
    config_cls, model_cls, sizes = MODELS["llama"]
    config = getattr(transformers, config_cls)(**TOKENS, **{**sizes, "num_key_value_heads": 4})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids)
    _check_gqa(slim, kv_heads=4)
    assert any(layer.self_attn.k_proj.out_features < 32 for layer in slim.model.layers)
    cd.mask_(model, thr)
    ids, mask = _padded_batch()
    kwargs = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(slim.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize(
    ("name", "family"),
    [*(("bert", f) for f in GATES), ("roberta", "lognormal"), ("electra", "hardconcrete")],
)
def test_bert_heads_and_mlp_neurons_prune_exactly(name, family):
    """BERT, and RoBERTa and ELECTRA, which have its attention and MLP (one registration)."""
    torch.manual_seed(0)
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids, family)
    names = {n for n, _ in cd.named_gates(model)}
    for i in range(2):  # the heads' gate sits on the input of the attention's output projection
        assert {f"{name}.encoder.layer.{i}.attention.output.dense",
                f"{name}.encoder.layer.{i}.intermediate.dense"} <= names  # fmt: skip
    heads = []
    for layer in getattr(slim, name).encoder.layer:
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features < 48
        own = layer.attention.self  # the module's own attributes follow: nothing to patch
        heads.append(own.num_attention_heads)
        assert own.all_head_size == own.num_attention_heads * own.attention_head_size
        assert own.query.out_features == own.value.out_features == own.all_head_size
        assert layer.attention.output.dense.in_features == own.all_head_size
    assert sum(heads) < 8
    cd.mask_(model, thr)
    assert masked_error(slim, model, causal=False) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_slim_models_export_to_onnx_at_two_sequence_lengths(name, tmp_path):
    """Invariant 2: batch and sequence length dynamic; onnxruntime = PyTorch at batches 1 and 3
    (length 8) and at lengths 5 and 13 (batch 2); the cache is off in the graph, on after."""
    from compressdrop.export import export_onnx

    torch.manual_seed(0)
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, _ = _attach_and_prune(model, ids)
    assert slim.num_parameters() < model.num_parameters()
    cache = getattr(slim.config, "use_cache", None)
    rep = export_onnx(
        slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3), check_lengths=(5, 13)
    )
    assert set(rep.max_rel_error) == {1, 3, "length 5", "length 13"}
    assert max(rep.max_rel_error.values()) <= 1e-4
    assert getattr(slim.config, "use_cache", None) == cache
    import onnx

    graph = onnx.load(str(tmp_path / "slim.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]  # as transformers names it


def test_a_bert_program_takes_a_dynamic_length_up_to_its_positions(tmp_path):
    """BERT slices its position ids (a buffer of max_position_embeddings): the length dimension
    of a .pt2 is bounded by it (an unbounded one failed torch.export's range check), and a
    check beyond it is a clear error."""
    from compressdrop.export import ExportError, export_program

    torch.manual_seed(0)
    model = _build("bert")
    ids = torch.randint(3, VOCAB, (2, 8))
    rep = export_program(
        model, ids, tmp_path / "bert.pt2", check_batch_sizes=(1, 3), check_lengths=(5, 13)
    )
    assert set(rep.max_rel_error) == {1, 3, "length 5", "length 13"}
    assert max(rep.max_rel_error.values()) <= 1e-4
    longest = torch.randint(3, VOCAB, (1, 64))
    with torch.no_grad():
        want = model(longest).logits
    got = torch.export.load(tmp_path / "bert.pt2").module()(longest)["logits"]
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ExportError, match="longer than the model takes \\(64"):
        export_program(model, ids, tmp_path / "long.pt2", check_lengths=(65,))
    assert not (tmp_path / "long.pt2").exists()


RELOAD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from torchvision_models import import_torchvision  # the CUDA torchvision build's op schemas
import_torchvision()
import transformers
folder = sys.argv[1]
config = transformers.AutoConfig.from_pretrained(folder)
model = getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()
ids = torch.load(folder + "/ids.pt")
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, folder + "/logits.pt")
assert not any(m.startswith("compressdrop") for m in sys.modules), "compressdrop was imported"
"""


# what RELOAD imports, imported once for the module's reloads (tests/prewarmed.py): each runs in
# a child of an interpreter that ran these imports and nothing else (compressdrop not among them)
_PRELOAD = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from torchvision_models import import_torchvision
import_torchvision()
import transformers
for name in {sorted({cls for _, cls, _ in MODELS.values()})!r}:
    getattr(transformers, name)
"""


@pytest.fixture(scope="module")
def warm():
    with Prewarmed(_PRELOAD) as w:
        yield w


def _reload_elsewhere(slim, ids, folder, warm: Prewarmed) -> torch.Tensor:
    """``save_pretrained``, then ``from_pretrained`` in a process without compressdrop."""
    slim.save_pretrained(folder)
    return logits_elsewhere(folder, ids, warm)


def logits_elsewhere(folder, ids, warm: Prewarmed | None = None) -> torch.Tensor:
    """The logits of the model in ``folder`` on ``ids``, loaded with ``from_pretrained`` in a
    process that does not import compressdrop: a new interpreter, or a child of ``warm``."""
    import subprocess
    import sys

    torch.save(ids, folder / "ids.pt")
    tests = str(Path(__file__).parent)
    if warm is None:
        subprocess.run([sys.executable, "-c", RELOAD, str(folder), tests], check=True, timeout=300)
    else:
        warm.run(RELOAD, str(folder), tests, check=True, timeout=300)
    return torch.load(folder / "logits.pt")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "roberta"])
def test_uniform_shape_saves_a_standard_config_that_reloads_without_compressdrop(
    name, tmp_path, warm
):
    """uniform=True: every layer keeps as many heads and neurons; the config follows, and
    from_pretrained in a fresh process (no compressdrop) gives the slim model's outputs. GPT-2's
    and BERT's configs derive the head size from the head count, so there the MLP neurons only."""
    torch.manual_seed(0)
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    # GPT-2's and BERT's heads, and BERT's pooler width, are not config fields
    attn = {"llama": None, "gpt2": ["GPT2Attention"], "bert": ["BertAttention", "*pooler*"],
            "roberta": ["RobertaAttention", "*classifier*"]}[name]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", exclude=attn, example_inputs=ids)
    torch.manual_seed(1)
    with torch.no_grad():
        for gate_name, g in cd.named_gates(model):
            g.mu.add_(torch.empty_like(g.mu).uniform_(-2, 2))
            if gate_name.endswith("o_proj"):  # LLaMA: heads 1 and 3 (one per key/value head)
                g.log_sigma[[1, 3]] = 3.0  # noisy: low SNR
    thr = float(torch.cat([g.snr().detach() for _, g in cd.named_gates(model)]).median())
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)  # the config describes the slim model
        slim = cd.prune(model, thr, example_inputs=ids, uniform=True)
    inner = "n_inner" if name == "gpt2" else "intermediate_size"
    assert getattr(slim.config, inner) < (getattr(model.config, inner) or 4 * 32)  # GPT-2: None
    if name == "llama":  # heads too: the same number in every layer, per key/value head
        assert slim.config.num_attention_heads < 4
        assert slim.config.head_dim == 8 and slim.config.num_key_value_heads == 2
    with torch.no_grad():
        want = slim(input_ids=ids).logits
    got = _reload_elsewhere(slim, ids, tmp_path / "slim", warm)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_free_shape_warns_that_the_config_cannot_describe_it():
    torch.manual_seed(0)
    model = _build("llama")
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    with torch.no_grad():  # layer 0 keeps half its MLP, layer 1 all of it
        gates = dict(cd.named_gates(model))
        gates["model.layers.0.mlp.up_proj"].log_sigma[:24] = 3.0  # noisy: low SNR
    with pytest.warns(cd.PruningWarning, match="cannot describe"):
        slim = cd.prune(model, example_inputs=ids)
    assert slim.config.intermediate_size == 48  # left describing the dense model
    widths = [layer.mlp.intermediate_size for layer in slim.model.layers]
    assert widths == [layer.mlp.up_proj.out_features for layer in slim.model.layers]
    assert widths[0] < widths[1] == 48  # the modules' own record follows each layer


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma", "gemma2", "gemma3"])
def test_other_llama_style_decoders_take_the_same_registration(name, tmp_path, warm):
    """Qwen2, Mistral and the Gemmas have LLaMA's attention and MLP: heads and neurons prune
    exactly, the slim decoder generates the masked one's tokens, and a uniform one reloads
    without us. Gemma 2's eager attention returns its per-head weights beside its output: the
    slim one returns the kept heads'."""
    torch.manual_seed(0)
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids)
    names = [n for n, _ in cd.named_gates(model)]
    assert {f"model.layers.{i}.self_attn.o_proj" for i in range(2)} <= set(names)
    assert {f"model.layers.{i}.mlp.up_proj" for i in range(2)} <= set(names)
    _check_gqa(slim, kv_heads=2)
    cd.mask_(model, thr)
    ids, mask = _padded_batch()
    kwargs = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(slim.generate(ids, **kwargs), model.generate(ids, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)
        uniform = cd.prune(model, thr, example_inputs=ids, uniform=True)
    with torch.no_grad():
        want = uniform(input_ids=ids).logits
    got = _reload_elsewhere(uniform, ids, tmp_path / "slim", warm)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


LOAD_SLIM = """
import sys, torch
sys.path.insert(0, sys.argv[4])
from torchvision_models import import_torchvision  # the CUDA torchvision build's op schemas
import_torchvision()
from compressdrop.checkpoint import load_model
slim = load_model(sys.argv[1])  # a fresh process: nothing was gated here, nothing registered
torch.save(slim(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_a_slim_checkpoint_with_fewer_heads_loads_in_a_fresh_process(tmp_path, warm):
    """In a process that never gated or registered anything: compressdrop is not imported
    before LOAD_SLIM imports it (the module's preloaded interpreter has torch and transformers)."""
    from compressdrop.checkpoint import save_model
    from compressdrop.models import build_model

    model = build_model("hf-causal-lm", (16,), VOCAB, model_type="gpt2", n_layer=2, n_embd=32,
                        n_head=4, n_positions=64).eval()  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 16))
    slim, _ = _attach_and_prune(model, ids)
    assert [b.attn.num_heads for b in slim.transformer.h] != [4, 4]  # heads were removed
    save_model(slim, tmp_path / "slim.pt")
    torch.save(ids, tmp_path / "ids.pt")
    args = [str(tmp_path / n) for n in ("slim.pt", "ids.pt", "logits.pt")]
    args.append(str(Path(__file__).parent))
    warm.run(LOAD_SLIM, *args, check=True, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), slim(ids).logits)


def test_a_fresh_process_builds_a_hf_model_whatever_torchvision_build_is_installed():
    """transformers imports torchvision when installed; a build for another torch (the CUDA
    torchvision pip puts beside this project's CPU torch) failed that import, and with it every
    model class ("Could not import module 'GPT2LMHeadModel'"), in the CLI too. The tests' own
    process imports torchvision first (conftest.py), so this runs in a fresh one."""
    import subprocess
    import sys

    code = (
        "from compressdrop.models import build_model; "
        "m = build_model('hf-causal-lm', (8,), 32, model_type='gpt2', n_layer=1, n_embd=8, "
        "n_head=2); print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "GPT2LMHeadModel"


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3"])
def test_gqa_key_value_projections_are_left_to_their_heads_without_a_false_warning(name):
    """A tiny LLaMA warned that k_proj and v_proj were "left ungated: its Torch-Pruning group
    grows past 1,000,000 channel indices (... as in window attention)": their groups never close
    (Torch-Pruning's index mapping shifts by 16 on every round through the rotary embedding and
    attention), and took seconds to find. Their units belong to the heads gated at o_proj."""
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, example_inputs=ids)
    said = [str(w.message) for w in seen if issubclass(w.category, cd.GatingWarning)]
    assert not [s for s in said if "_proj'" in s and "self_attn" in s], said
    assert not [s for s in said if "channel indices" in s], said
    gated = [n for n, _ in cd.named_gates(model)]
    assert gated == [
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.up_proj")
    ]


@pytest.mark.parametrize(
    ("config", "granularity"), [("LlamaConfig", "neuron"), ("Olmo2Config", "auto")]
)
def test_projections_of_heads_left_alone_start_no_group_of_their_own(config, granularity):
    """Attach by neurons (a LLaMA) or where the heads must stay (OLMo-2's norms span them) walked
    every k_proj and v_proj as a layer of neurons: 50,000 steps each through the attention, a
    warning each, and past the walks' time budget "the layers after it left ungated", MLPs
    included. Their units are heads, which are not to be gated here."""
    sizes = {**DECODER, "num_hidden_layers": 6}  # 12 walks used to pass the budget
    cfg = getattr(transformers, config)(**TOKENS, **sizes)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, granularity=granularity, example_inputs=ids)
    said = [str(w.message) for w in seen if issubclass(w.category, cd.GatingWarning)]
    assert not [s for s in said if "_proj'" in s and "self_attn" in s], said
    assert not [s for s in said if "steps" in s], said
    gated = [n for n, _ in cd.named_gates(model)]
    assert gated == [f"model.layers.{i}.mlp.up_proj" for i in range(6)]


MLP_LAYER = {"gpt2": "c_fc", **{n: "intermediate.dense" for n in ("bert", "roberta", "electra")}}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_gated_mlp_keeps_no_activation_of_its_own_with_the_same_gradients(name):
    """The gated layer of a Hugging Face MLP (GPT-2's c_fc, BERT's intermediate dense, LLaMA's
    up_proj) has one reader that keeps its output anyway (the activation; the product with
    act(gate_proj(x))): it multiplies in place and keeps that output, not its input too, with
    the gradients of keeping its input."""
    from .test_gate_memory import _saved_bytes

    torch.manual_seed(0)
    model = _build(name).train()
    ids = torch.randint(3, VOCAB, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids[:2])
    layers = [m for n, m in model.named_modules() if n.endswith(MLP_LAYER.get(name, "up_proj"))]
    assert layers and all(vars(m).get("inplace_alone") is True for m in layers)
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            g.log_sigma.add_(torch.randn_like(g.log_sigma))

    def step() -> dict:
        torch.manual_seed(3)
        out = model(ids).logits
        (out.float().logsumexp(-1).mean() + cd.kl(model) / 100).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return grads

    a, kept = step(), _saved_bytes(model, ids)
    with cd.gates.hand_overs_off():
        b, apart = step(), _saved_bytes(model, ids)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    # kept for backward: each MLP's (B, T, U) output once; apart, the gate's input besides
    assert apart - kept >= len(layers) * 4 * 16 * layers[0].gate.num_units * 4


LOAD_PROGRAM = """
import sys, torch
from compressdrop.checkpoint import load_model
out = load_model(sys.argv[1])(torch.load(sys.argv[2]))
print(type(out).__name__, "transformers" in sys.modules)
torch.save(out.logits, sys.argv[3])
"""


def _bert_program(path):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (ids,), dynamic_shapes=({0: batch},)), path)
    return model, ids


def test_a_hugging_face_program_loads_in_a_process_that_never_imported_transformers(tmp_path):
    """A new user's walk: a BERT saved with torch.export (the route compressdrop's own error
    suggests for it) returns a ``SequenceClassifierOutput``, which torch rebuilds only once
    transformers registered it; in a fresh process the load failed (and logged 31 lines of a
    traceback), in the CLI too. The tests' own process imports transformers, hence the fresh one."""
    import subprocess
    import sys

    model, ids = _bert_program(tmp_path / "bert.pt2")
    torch.save(ids, tmp_path / "ids.pt")
    args = [str(tmp_path / n) for n in ("bert.pt2", "ids.pt", "logits.pt")]
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROGRAM, *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SequenceClassifierOutput", "True"]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits)


def test_a_program_whose_outputs_are_an_unknown_type_names_it(tmp_path):
    import zipfile

    from compressdrop.checkpoint import load_model
    from compressdrop.errors import CheckpointError

    _bert_program(tmp_path / "bert.pt2")
    with (
        zipfile.ZipFile(tmp_path / "bert.pt2") as zin,
        zipfile.ZipFile(tmp_path / "other.pt2", "w") as zout,
    ):
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("models/model.json"):
                name = b"transformers.modeling_outputs.SequenceClassifierOutput"
                data = data.replace(name, b"transformers.modeling_outputs.NoSuchOutput")
            zout.writestr(info, data)
    with pytest.raises(CheckpointError, match=r"types this process does not know \(transformers"):
        load_model(tmp_path / "other.pt2")


def test_layers_inside_an_excluded_attention_are_not_warned_about():
    """``exclude=["GPT2Attention"]`` (the README's advice for a standard folder) still warned
    that each ``attn.c_attn`` was left ungated, with Torch-Pruning's TypeError in the text."""
    model = _build("gpt2")
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cd.attach(model, exclude=["GPT2Attention"], example_inputs=ids)
    told = [str(w.message) for w in said if issubclass(w.category, cd.GatingWarning)]
    assert told and not [t for t in told if ".attn." in t]  # the MLP's residual output: said
    assert all(".attn." not in name for name, _ in cd.named_gates(model))


def test_a_bfloat16_attention_keeps_its_heads_gateable_and_its_gated_checkpoint_loads(tmp_path):
    """A bfloat16 LLaMA of 16 heads of 64 kept its heads: the check that removing a head equals
    zeroing it ran in bfloat16, whose rounding put them at a relative error of 8e-5 and more,
    above its 1e-5; and the gated checkpoint did not load back, its reload having planned head
    gates the file did not hold. The check runs in float32 now."""
    from compressdrop.checkpoint import load_model

    cfg = transformers.LlamaConfig(
        **TOKENS, hidden_size=1024, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "folder")
    model = load_model(tmp_path / "folder")  # (its record: the checkpoint is rebuilt from it)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, VOCAB, (2, 32))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, example_inputs=ids)
    assert not [str(w.message) for w in seen if "heads" in str(w.message)]
    assert [n for n, _ in cd.named_gates(model)] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.up_proj",
    ]
    cd.save_model(model, tmp_path / "gated.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        back = load_model(tmp_path / "gated.pt")
    assert [n for n, _ in cd.named_gates(back)] == [n for n, _ in cd.named_gates(model)]
