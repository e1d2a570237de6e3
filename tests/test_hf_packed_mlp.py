"""Phi-3's MLP packs its gate and up projections in one ``gate_up_proj`` (rows ``[gate; up]``):
one gate per neuron, and a prune that cuts neuron ``j``'s rows ``j`` and ``I + j`` and its
``down_proj`` column together (``compressdrop/gating/packed_mlp.py``). A gate per row gave each
neuron two gates, and Torch-Pruning cut a neuron when either of its rows went: a uniform prune
kept different widths in the layers, and the slim folder was refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import compressdrop as cd
from compressdrop.pruning import replay

from .test_hf import VOCAB, check_against_masked
from .test_hf_families import _build

transformers = pytest.importorskip("transformers")

N = 48  # intermediate_size of the tiny config


def _gated_phi3():
    """A tiny Phi-3 with gates on its MLPs alone (its heads left ungated), and token ids."""
    model = _build("phi3")
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids, exclude=["Phi3Attention"])
    return model, ids


def _noisy(model, noisy: list[list[int]]) -> None:
    """Gate ``i`` quiet (SNR far above 1) but for its neurons ``noisy[i]`` (far below)."""
    with torch.no_grad():
        for (_, g), idx in zip(cd.named_gates(model), noisy):
            g.log_sigma.fill_(-4.0)
            g.log_sigma[idx] = 3.0


def test_attach_puts_one_gate_of_i_units_on_each_phi3_mlp():
    from compressdrop.gating.packed_mlp_gated import PackedMLPGated

    model, _ = _gated_phi3()
    gates = {name: g.num_units for name, g in cd.named_gates(model)}
    assert gates == {f"model.layers.{i}.mlp": N for i in range(2)}
    assert all(isinstance(layer.mlp, PackedMLPGated) for layer in model.model.layers)


def test_a_uniform_prune_cuts_each_neurons_two_rows_and_its_column():
    """The gates choose 20 neurons in each layer, at different places: each layer loses those
    20 (rows j and I + j of gate_up_proj, column j of down_proj), the slim model equals the
    masked one, and the config's intermediate_size follows."""
    model, ids = _gated_phi3()
    noisy = [list(range(0, 20)), list(range(13, 33))]
    _noisy(model, noisy)
    dense = [layer.mlp.module.gate_up_proj.weight.clone() for layer in model.model.layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)  # the config describes the slim model
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    assert slim.config.intermediate_size == N - 20
    for layer, gone, up in zip(slim.model.layers, noisy, dense):
        keep = torch.tensor([j for j in range(N) if j not in gone])
        torch.testing.assert_close(layer.mlp.gate_up_proj.weight, up[torch.cat([keep, keep + N])])
        assert layer.mlp.down_proj.weight.shape == (32, N - 20)
    check_against_masked(slim, model, 1.0)


def test_a_uniform_prune_keeps_one_width_where_the_gates_disagree():
    """Layer 0's gates drop 10 neurons, layer 1's 17: both keep round(mean) of the kept, 34."""
    model, ids = _gated_phi3()
    _noisy(model, [list(range(10)), list(range(20, 37))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.PruningWarning)
        slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    widths = [(m.mlp.gate_up_proj.out_features, m.mlp.down_proj.in_features)
              for m in slim.model.layers]  # fmt: skip
    assert widths == [(68, 34), (68, 34)] and slim.config.intermediate_size == 34


def test_a_slim_phi3_folder_reloads_replays_and_exports(tmp_path):
    """The slim folder reloads in plain transformers with the slim logits; the prune history
    rebuilds the slim shape on a fresh model; the ONNX export matches PyTorch."""
    model, ids = _gated_phi3()
    _noisy(model, [list(range(0, 40, 2)), list(range(1, 41, 2))])
    slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    slim.save_pretrained(tmp_path / "slim")
    back = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, slim(input_ids=ids).logits)
    fresh = replay(_build("phi3"), slim.prune_report.history, ids)
    fresh.load_state_dict(slim.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, slim(input_ids=ids).logits)
    rep = cd.export_onnx(slim, ids, tmp_path / "slim.onnx", check_batch_sizes=(1, 3))
    assert max(rep.max_rel_error.values()) <= 1e-4


def test_the_folder_plans_dry_run_cuts_a_neurons_two_rows_and_its_column():
    """check_folder_plan's dry run cuts one neuron of each packed MLP on the meta copy, as the
    prune does (it could not cut the MLP through Torch-Pruning, and left the question to
    save_hf_folder), and the config then describes the cut model."""
    from compressdrop.gating.groups import find_groups
    from compressdrop.hf_folder import folder_problem
    from compressdrop.hf_plan import _by_exclude_pattern, _cut

    model = _build("phi3")
    ids = torch.randint(3, VOCAB, (2, 8))
    groups = find_groups(model, ids, exclude=["Phi3Attention"], warn=False)
    (pattern, mlps), *others = _by_exclude_pattern(model, groups).items()
    assert pattern == "model.layers.*.mlp.gate_up_proj" and not others
    cut = _cut(model, mlps, ids)
    assert cut is not None and folder_problem(cut) is None
    shapes = [(m.mlp.gate_up_proj.weight.shape, m.mlp.down_proj.weight.shape)
              for m in cut.model.layers]  # fmt: skip
    assert shapes == [((2 * (N - 1), 32), (32, N - 1))] * 2


def test_keep_noise_refuses_a_packed_mlp_by_name():
    """The slim MLP has no place for θ on down_proj's input: keep_noise says so and names the
    layer (it put the noise on the MLP's output, whose width is not the neurons')."""
    from compressdrop.errors import InputError

    model, ids = _gated_phi3()
    _noisy(model, [list(range(20))] * 2)
    slim = cd.prune(model, 1.0, example_inputs=ids, uniform=True)
    with pytest.raises(InputError, match=r"a packed MLP back yet \('model\.layers\.0\.mlp'\)"):
        cd.keep_noise(model, slim, 1.0)


def test_a_bfloat16_packed_mlp_is_gated_per_neuron_too():
    """A bfloat16 Phi-3 (width 512) fell back to a gate per row: the check that removing a
    neuron equals zeroing it ran in bfloat16, whose rounding is above its 1e-5. It runs in
    float32 now, as the heads' check does."""
    from compressdrop.gating import PackedMLPGated

    cfg = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).to(torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, example_inputs=torch.randint(3, VOCAB, (2, 32)))
    gates = {n: g.mu.numel() for n, g in cd.named_gates(model)}
    assert gates == {"model.layers.0.self_attn.o_proj": 8, "model.layers.0.mlp": 1024}
    assert isinstance(model.model.layers[0].mlp, PackedMLPGated)


def test_a_packed_mlp_whose_rows_are_interleaved_is_left_ungated_and_the_user_reads_why():
    """An MLP named like GLM's whose forward reads its gate and up rows interleaved (row 2j and
    2j + 1, not j and I + j) fails the check that removing a neuron equals zeroing it: it was
    gated per row by Torch-Pruning's groups without a word (two gates per neuron). It is left
    ungated now, and attach says why; the heads are gated as before."""
    from transformers.models.glm.modeling_glm import GlmMLP

    class InterleavedMLP(GlmMLP):
        def forward(self, x):
            h = self.gate_up_proj(x)
            gate, up = h[..., 0::2], h[..., 1::2]
            return self.down_proj(up * self.activation_fn(gate))

    model = _build("glm")
    for layer in model.model.layers:
        mlp = InterleavedMLP(model.config)
        mlp.load_state_dict(layer.mlp.state_dict())
        layer.mlp = mlp
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids)
    said = [str(w.message) for w in caught if "left ungated: its gate_up_proj" in str(w.message)]
    assert [s.split(" (relative error")[0] for s in said] == [
        f"compressdrop: MLP 'model.layers.{i}.mlp' left ungated: its gate_up_proj rows are not "
        f"[gate; up] halves (rows j and {N} + j per neuron): removing a neuron's two rows is not "
        "the same as zeroing it"
        for i in range(2)
    ]
    assert [n for n, _ in cd.named_gates(model)] == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)
    ]


def test_granitemoe_hybrids_shared_mlp_is_a_packed_mlp_of_other_names():
    """GraniteMoE-Hybrid's shared MLP packs its gate and up rows in ``input_linear`` (read by
    ``output_linear``): Torch-Pruning gave it a gate per row (96), and the prune cut rows of the
    two halves apart, so the slim model failed ("mat1 and mat2 shapes cannot be multiplied").
    It is gated per neuron as Phi-3's is, and removed exactly."""
    from compressdrop.gating.packed_mlp_gated import PackedMLPGated

    if not hasattr(transformers, "GraniteMoeHybridForCausalLM"):
        pytest.skip("this transformers has no GraniteMoE-Hybrid")
    torch.manual_seed(0)
    config = transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        shared_intermediate_size=N, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, layer_types=["full_attention"] * 2, mamba_n_heads=8,
    )  # fmt: skip
    model = transformers.GraniteMoeHybridForCausalLM(config).eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)
        cd.attach(model, "lognormal", example_inputs=ids, include=["*shared_mlp*"])
    gates = {name: g.num_units for name, g in cd.named_gates(model)}
    assert gates == {f"model.layers.{i}.shared_mlp": N for i in range(2)}
    assert all(isinstance(layer.shared_mlp, PackedMLPGated) for layer in model.model.layers)
    _noisy(model, [list(range(0, 20)), list(range(13, 30))])
    # the config's shared_intermediate_size follows a uniform prune; this free one it cannot
    with pytest.warns(cd.PruningWarning, match=r"shared_intermediate_size \[28, 31\]"):
        slim = cd.prune(model, 1.0, example_inputs=ids)
    widths = [(m.input_linear.out_features, m.output_linear.in_features)
              for m in (layer.shared_mlp for layer in slim.model.layers)]  # fmt: skip
    assert widths == [(2 * 28, 28), (2 * 31, 31)]
    check_against_masked(slim, model, 1.0)
