"""Mixtures of experts stored as fused 3-D parameters (transformers 5: Mixtral, Qwen2-MoE,
OLMoE): one gate per layer over its experts' neurons, every expert keeping as many of its own
best neurons, removed exactly; the gated experts train; the slim model is a plain transformers
model (a uniform one saves a config that reloads), and it exports to ONNX and ``.pt2``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gating.aligned import align_keep
from compressdrop.gating.experts import ALIGN

from .test_hf import (
    TOKENS,
    VOCAB,
    _attach_and_prune,
    check_against_masked,
    logits_elsewhere,
    masked_error,
)

transformers = pytest.importorskip("transformers")

BASE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
        "num_experts_per_tok": 2}  # fmt: skip
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**BASE, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**BASE, "num_experts": 4, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**BASE, "num_experts": 4}),
    # Qwen3-MoE: Qwen3's attention (a q/k RMSNorm over each head's features) over its experts
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**BASE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8}),
    # GPT-OSS: each expert's gate and up rows interleaved, weights transposed, with biases
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {**BASE, "num_local_experts": 4, "head_dim": 8, "sliding_window": 4,
                 "layer_types": ["sliding_attention", "full_attention"]}),
}  # fmt: skip
# the config field of the experts' neurons
WIDTH = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
         "olmoe": "intermediate_size"}  # fmt: skip


def _build(name: str):
    config_cls, model_cls, sizes = MOE[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TOKENS, **sizes)
    return getattr(transformers, model_cls)(config).eval()


def _experts(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _gate_experts(model, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    return {n: g for n, g in cd.named_gates(model) if n.endswith("experts")}


def test_each_expert_keeps_as_many_of_its_own_best_neurons():
    """Experts 0-3 of layer 0 keep 20, 9, 3 and 0 neurons under the threshold: each keeps 24
    (the most, 20, rounded up to a multiple of ALIGN), its own kept ones first, then its next
    best by SNR; the masked model masks exactly the removed neurons, and the slim one's weights
    are the kept rows and columns (E[θ] folded into the down projection)."""
    model = _build("mixtral")
    ids = torch.randint(3, VOCAB, (2, 8))
    gates = _gate_experts(model, ids)
    g = gates["model.layers.0.mlp.experts"]
    assert g.num_units == 4 * 48 and g.unit_blocks == 4 and g.unit_multiple == ALIGN
    torch.manual_seed(1)
    with torch.no_grad():
        g.log_sigma.fill_(3.0)  # noisy: SNR far below 1
        g.mu.copy_(torch.randn(4 * 48))
        for e, n in enumerate((20, 9, 3, 0)):
            g.log_sigma[e * 48 : e * 48 + n] = -4.0  # quiet: SNR far above 1
    snr = g.snr().detach().reshape(4, 48)
    with pytest.warns(cd.PruningWarning, match="keep different widths"):  # layer 1 keeps 48
        slim = cd.prune(model, 1.0, example_inputs=ids)
    cd.mask_(model, 1.0)
    kept = ~g.pruned.reshape(4, 48)
    assert kept.sum(dim=1).tolist() == [24] * 4
    for e, n in enumerate((20, 9, 3, 0)):
        best = set(torch.topk(snr[e], 24).indices.tolist())
        assert set(kept[e].nonzero().flatten().tolist()) == best
        assert kept[e, :n].all()
    dense = model.model.layers[0].mlp.experts.module
    small = slim.model.layers[0].mlp.experts
    assert small.gate_up_proj.shape == (4, 48, 32) and small.down_proj.shape == (4, 32, 24)
    assert small.intermediate_dim == 24
    factor = g.eval_factor().detach().reshape(4, 48)
    for e in range(4):
        idx = kept[e].nonzero().flatten()
        rows = torch.cat([idx, idx + 48])
        torch.testing.assert_close(small.gate_up_proj[e], dense.gate_up_proj[e][rows])
        want = dense.down_proj[e][:, idx] * factor[e, idx]
        torch.testing.assert_close(small.down_proj[e], want)
    assert masked_error(slim, model) <= 1e-5


@pytest.mark.parametrize("name", list(MOE))
def test_experts_prune_exactly_and_the_slim_model_is_plain_transformers(name):
    """Every family's experts are gated (OLMoE's heads are not, and say why: its q/k norms
    span all heads; GPT-OSS's heads go with their attention sinks); the slim model matches the
    masked one, generates its tokens, holds no
    compressdrop module, and runs transformers' default experts kernel (grouped_mm)."""
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    dense = model.num_parameters()
    if name == "olmoe":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", cd.GatingWarning)
            cd.attach(model, "lognormal", example_inputs=ids)
        cd.detach(model)
        said = [str(w.message) for w in caught if "keeps all its heads" in str(w.message)]
        assert len(said) == 2 and all("q_norm and k_norm are RMSNorms" in s for s in said)
    slim, thr = _attach_and_prune(model, ids)
    names = [n for n, _ in cd.named_gates(model)]
    assert {f"model.layers.{i}.mlp.experts" for i in range(2)} <= set(names)
    assert any(n.endswith("o_proj") for n in names) == (name != "olmoe")
    assert slim.num_parameters() < dense
    widths = [m.down_proj.shape[1 if m.is_transposed else 2] for m in _experts(slim)]
    assert all(w % ALIGN == 0 for w in widths) and min(widths) < MOE[name][2].get(
        "moe_intermediate_size", 48
    )
    assert all(
        type(m).__module__.split(".")[0] in ("torch", "transformers") for m in slim.modules()
    )
    assert slim.config._experts_implementation == "grouped_mm"
    check_against_masked(slim, model, thr)


def test_gated_experts_train():
    """The loss alone (no KL) reaches every experts gate through the experts' forward; a
    training forward draws θ afresh, eval is deterministic."""
    model = _build("qwen2_moe")
    ids = torch.randint(3, VOCAB, (2, 8))
    gates = _gate_experts(model, ids)
    assert len(gates) == 2
    model.train()
    torch.manual_seed(2)
    one = model(input_ids=ids, labels=ids)
    two = model(input_ids=ids, labels=ids)
    assert not torch.equal(one.logits, two.logits)
    one.loss.backward()
    for g in gates.values():
        for p in g.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_dense_layers_beside_experts_prune_like_llama_and_reload(name, tmp_path):
    """Qwen-MoE with a dense MLP in layer 0 (Qwen3-MoE's named in ``mlp_only_layers``,
    Qwen2-MoE's off its ``decoder_sparse_step``) and experts in layer 1: the dense MLP's neurons
    are gated and train as LLaMA's do and prune exactly; the config's ``intermediate_size``
    follows the dense MLP, Qwen2-MoE's shared expert keeps a field of its own
    (``shared_expert_intermediate_size``), so no warning, and the folder reloads with
    from_pretrained (Qwen3-MoE's: in a process without compressdrop)."""
    config_cls, model_cls, sizes = MOE[name]
    torch.manual_seed(0)
    # layer 0 dense: named in mlp_only_layers, or off decoder_sparse_step (layer i is sparse
    # where (i + 1) % step == 0)
    dense_0 = {"mlp_only_layers": [0]} if name == "qwen3_moe" else {"decoder_sparse_step": 2}
    config = getattr(transformers, config_cls)(**TOKENS, **sizes, **dense_0)
    model = getattr(transformers, model_cls)(config).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    gates = dict(cd.named_gates(model))
    dense = gates["model.layers.0.mlp.up_proj"]
    assert dense.num_units == 48 and "model.layers.1.mlp.experts" in gates
    shared = gates.get("model.layers.1.mlp.shared_expert.up_proj")
    assert (shared is not None) == (name == "qwen2_moe")
    model.train()
    before = dense.mu.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (model(input_ids=ids, labels=ids).loss + cd.kl(model) / ids.numel()).backward()
    opt.step()
    model.eval()
    assert not torch.equal(dense.mu.detach(), before)
    with torch.no_grad():  # every gate quiet (SNR far above 1), then some noisy
        for g in gates.values():
            g.log_sigma.fill_(-4.0)
        dense.log_sigma[:20] = 3.0  # the dense MLP keeps 28 of 48
        if shared is not None:
            shared.log_sigma[:8] = 3.0  # the shared expert 40 of 48
        for e in range(4):  # each expert 16 of 32
            gates["model.layers.1.mlp.experts"].log_sigma[e * 32 : e * 32 + 16] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)  # the config describes the slim model
        slim = cd.prune(model, 1.0, example_inputs=ids)
    layer = slim.model.layers[0].mlp
    assert layer.up_proj.out_features == layer.intermediate_size == 28
    assert (slim.config.intermediate_size, slim.config.moe_intermediate_size) == (28, 16)
    if shared is not None:
        assert slim.config.shared_expert_intermediate_size == 40
    check_against_masked(slim, model, 1.0)
    slim.save_pretrained(tmp_path / "slim")
    with torch.no_grad():
        want = slim(input_ids=ids).logits
    if name == "qwen3_moe":  # in a process without compressdrop
        got = logits_elsewhere(tmp_path / "slim", ids)
    else:
        again = getattr(transformers, model_cls).from_pretrained(tmp_path / "slim").eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_uniform_experts_save_a_config_that_reloads(name, tmp_path):
    """uniform=True: every layer's experts keep as many neurons, the config's field follows
    (Mixtral's intermediate_size, Qwen2-MoE's moe_intermediate_size), no warning; the folder
    reloads with from_pretrained (Mixtral's: in a process without compressdrop)."""
    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    gates = _gate_experts(model, ids)
    with torch.no_grad():  # layer 0's experts keep 10 neurons each, layer 1's 3: 16 in both
        for i, g in enumerate(gates.values()):
            width = g.num_units // 4
            g.log_sigma.fill_(3.0)
            for e in range(4):
                g.log_sigma[e * width : e * width + (10 if i == 0 else 3)] = -4.0
    heads = [n for n, _ in cd.named_gates(model) if not n.endswith("experts")]
    with torch.no_grad():  # the other gates keep everything: only the experts change
        for n, g in cd.named_gates(model):
            if n in heads:
                g.log_sigma.fill_(-4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    assert [m.down_proj.shape[2] for m in _experts(slim)] == [16, 16]
    assert getattr(slim.config, WIDTH[name]) == 16
    slim.save_pretrained(tmp_path / "slim")
    with torch.no_grad():
        want = slim(input_ids=ids).logits
    if name == "mixtral":
        got = logits_elsewhere(tmp_path / "slim", ids)
    else:
        again = getattr(transformers, MOE[name][1]).from_pretrained(tmp_path / "slim").eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_slim_experts_export_to_onnx_and_a_program(name, tmp_path):
    """The exporters run the experts as batched_mm (grouped_mm's CPU kernel is a custom op the
    ONNX converter cannot translate): onnxruntime and the loaded program match the slim model,
    and the config's kernel is put back."""
    from compressdrop.export import export_program

    model = _build(name)
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, _ = _attach_and_prune(model, ids)
    rep = cd.export_onnx(slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3),
                         check_lengths=(5, 13))  # fmt: skip
    assert set(rep.max_rel_error) == {1, 3, "length 5", "length 13"}
    assert max(rep.max_rel_error.values()) <= 1e-4
    assert slim.config._experts_implementation == "grouped_mm"
    prog = export_program(slim, ids, tmp_path / "slim.pt2", check_batch_sizes=(1, 3))
    assert max(prog.max_rel_error.values()) <= 1e-4


def test_a_slim_experts_checkpoint_replays(tmp_path):
    """A compressdrop checkpoint of a slim Mixtral: the history's experts step rebuilds the
    shape on a fresh dense model, and the weights load into it."""
    from compressdrop.checkpoint import load_model, save_model
    from compressdrop.models import build_model

    model = build_model("hf-causal-lm", (8,), VOCAB, model_type="mixtral", num_local_experts=4,
                        num_experts_per_tok=2, **{k: v for k, v in BASE.items()
                                                  if k != "num_experts_per_tok"}).eval()  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, _ = _attach_and_prune(model, ids)
    assert any(step[1] == "experts" for step in slim.prune_report.history)
    save_model(slim, tmp_path / "slim.pt")
    again = load_model(tmp_path / "slim.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, slim(ids).logits)


def test_align_keep_rounds_every_block_up_to_the_multiple():
    """Blocks keep the most any block keeps, rounded up to ``multiple`` but not past the
    block: 5 → 8 of 12; 11 → 12 (all)."""
    snr = torch.arange(24.0)
    keep = torch.zeros(24, dtype=torch.bool)
    keep[:5] = True
    out = align_keep(keep, snr, 2, 4).reshape(2, 12)
    assert out.sum(dim=1).tolist() == [8, 8] and out[0, :5].all()
    keep[:11] = True
    assert align_keep(keep, snr, 2, 4).all()


def test_keep_noise_refuses_fused_experts_and_takes_the_other_gates():
    """The slim experts have no place for θ: keep_noise says so and names the layer; with the
    attention's gates alone it builds the noisy model."""
    model = _build("mixtral")
    ids = torch.randint(3, VOCAB, (2, 8))
    slim, thr = _attach_and_prune(model, ids)
    with pytest.raises(InputError, match=r"fused experts back yet \('model\.layers\.0\.mlp"):
        cd.keep_noise(model, slim, thr)
    heads = [n for n, _ in cd.named_gates(model) if n.endswith("o_proj")]
    noisy = cd.keep_noise(model, slim, thr, layers=heads)
    with torch.no_grad():
        torch.testing.assert_close(noisy(ids).logits, slim(ids).logits)
