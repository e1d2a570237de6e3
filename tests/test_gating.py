"""attach / detach on every reference net and on models written with functional ops."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import compressdrop as cd
from compressdrop.errors import InputError
from compressdrop.gating import Gated, find_groups, groups_of
from compressdrop.training import KLSchedule, Sparsifier

from .zoo import ZOO, attach_zoo, input_for, randomize_


@pytest.mark.parametrize("name", list(ZOO))
def test_attach_detach_round_trips(name):
    model = randomize_(ZOO[name]()).eval()
    x = input_for(model, 4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        before = model(x)
    attach_zoo(model, name)
    assert cd.is_gated(model)
    assert any(isinstance(m, Gated) for m in model.modules())
    cd.detach(model)
    assert not cd.is_gated(model)
    assert str(model) == str(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )
    assert not model._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "functional", "vit"])
def test_gated_state_dict_saves_and_loads(name):
    torch.manual_seed(0)
    model = attach_zoo(randomize_(ZOO[name]()), name, gate="variational")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(1)
    other = attach_zoo(ZOO[name](), name, gate="variational")
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = input_for(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_output_layer_is_never_gated_and_every_hidden_layer_is():
    model = cd.attach(ZOO["lenet300"]())
    names = [n for n, _ in cd.named_gates(model)]
    assert names == ["1", "3"]  # the two hidden Linear layers, not the classifier


def test_gate_sits_after_the_batchnorm_that_follows_a_conv():
    model = cd.attach(ZOO["vgg"]())
    for _, site in cd.gating.sites(model):
        assert isinstance(site.module, nn.BatchNorm2d | nn.BatchNorm1d)


def test_residual_stream_shares_one_gate_and_draws_one_sample_per_forward():
    model = cd.attach(ZOO["resnet"]()).train()
    shared = [g for _, g in cd.named_gates(model) if g.shared]
    assert shared
    sites = [s for _, s in cd.gating.sites(model) if s.gate is shared[0]]
    assert len(sites) >= 2
    draws: list[torch.Tensor] = []
    method = shared[0]._training_sample

    def record(batch: int) -> torch.Tensor:
        theta = method(batch)
        draws.append(theta.detach().clone())
        return theta

    shared[0]._training_sample = record
    model(input_for(model, 3))
    first = list(draws)
    assert len(first) == len(sites) and all(torch.equal(d, first[0]) for d in first)
    model(input_for(model, 3))
    assert not torch.equal(draws[-1], first[0])  # a new forward, a new θ


def test_functional_model_gets_gates_on_every_hidden_unit_group():
    model = cd.attach(ZOO["functional"]())
    names = {n for n, _ in cd.named_gates(model)}
    assert {"a", "b", "c", "fc1"} <= names  # concat branches, the residual conv pair, the hidden fc


def test_unsupported_pattern_is_left_ungated_with_a_warning_naming_the_layer():
    class SigmoidNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc1 = nn.Linear(4 * 36, 16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.sigmoid(self.conv(x)).flatten(1))))

    model = SigmoidNet()
    with pytest.warns(cd.GatingWarning, match=r"'conv' left ungated: .*Sigmoid"):
        cd.attach(model, example_inputs=torch.randn(1, 1, 8, 8))
    assert [n for n, _ in cd.named_gates(model)] == ["fc1"]


def test_layernorm_after_a_linear_blocks_gating():
    model = nn.Sequential(
        nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    with pytest.warns(cd.GatingWarning, match="'0' left ungated"):
        cd.attach(model)
    assert [n for n, _ in cd.named_gates(model)] == ["3"]


@pytest.mark.parametrize(
    "act",
    [nn.Threshold(0.5, 2.0), nn.Hardtanh(0.1, 1.0, inplace=True), nn.Hardtanh(-2.0, -0.1)],
    ids=["threshold", "hardtanh-above-0", "hardtanh-below-0"],
)
def test_an_activation_whose_bounds_move_zero_blocks_gating(act):
    """A threshold at or above 0 (0 becomes its value) or a clamp whose range leaves 0 out (0
    becomes a bound) does not map 0 to 0: fc1 was gated as if it did, and pruning it failed
    prune's check (the slim model differed from the masked one by 80 %)."""
    model = nn.Sequential(nn.Linear(16, 24), act, nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(cd.GatingWarning, match=r"'0' left ungated: .* does not map 0 to 0"):
        cd.attach(model, example_inputs=torch.randn(2, 5, 16))
    assert [n for n, _ in cd.named_gates(model)] == ["2"]
    # below the threshold, or a range that holds 0: gated as before
    for ok in (nn.Threshold(-0.5, 2.0), nn.Hardtanh(-0.5, 1.0), nn.ReLU6(inplace=True),
               nn.CELU(0.5), nn.SELU(), nn.ELU()):  # fmt: skip
        model = nn.Sequential(nn.Linear(16, 24), ok, nn.Linear(24, 3))
        cd.attach(model, example_inputs=torch.randn(2, 5, 16))
        assert [n for n, _ in cd.named_gates(model)] == ["0"]


class _Centered(nn.Module):
    """fc1's units, then either centred over the units (a mean over their dimension: removing one
    changes it) or averaged over the tokens (another dimension: exact)."""

    def __init__(self, over_units: bool) -> None:
        super().__init__()
        self.over_units = over_units
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):  # x: (N, T, 4)
        h = torch.relu(self.fc1(x))
        h = h - h.mean(-1, keepdim=True) if self.over_units else h * h.mean(1, keepdim=True)
        return self.fc3(torch.relu(self.fc2(h)))


def test_a_mean_over_the_units_blocks_gating_and_one_over_the_tokens_does_not():
    x = torch.randn(3, 5, 4)
    with pytest.warns(cd.GatingWarning, match=r"'fc1' left ungated: its units are averaged"):
        model = cd.attach(_Centered(over_units=True), example_inputs=x[:2])
    assert [n for n, _ in cd.named_gates(model)] == ["fc2"]

    model = cd.attach(_Centered(over_units=False), example_inputs=x[:2])
    assert [n for n, _ in cd.named_gates(model)] == ["fc1", "fc2"]
    randomize_(model)
    for _, g in cd.named_gates(model):
        with torch.no_grad():
            g.log_sigma[::2] = 3.0  # half the units noisy: pruned at SNR 1
        g.pruned.copy_(~g.mask())
    ref = model.eval()(x)  # the masked model: what the slim one must compute
    slim = cd.prune(model)
    assert slim.fc1.out_features == 4
    torch.testing.assert_close(slim(x), ref, rtol=1e-5, atol=1e-6)


class _GroupedLinear(nn.Linear):
    """DeepSeek-V4's grouped output projection: its weight's rows are ``groups`` blocks, each
    applied to its own slice of the input; the output is ``(..., groups, rows // groups)``."""

    def __init__(self, in_per_group: int, out_features: int, groups: int) -> None:
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x):  # x: (..., groups, in_per_group)
        w = self.weight.view(self.groups, -1, self.in_features)  # (G, R, F)
        return torch.einsum("...gf,grf->...gr", x, w)


class _GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = _GroupedLinear(4, 12, groups=2)  # 12 rows, an output of (..., 2, 6)
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):  # x: (N, 2, 4)
        h = torch.relu(self.grouped(x)).flatten(-2)  # (N, 12)
        return self.fc2(torch.relu(self.fc1(h)))


def test_a_layer_whose_output_does_not_hold_its_rows_as_units_is_left_ungated():
    """A Linear subclass whose forward views its 12 rows as 2 groups of 6 outputs 6 features
    along its unit dim: its gate of 12 units was attached, and the first forward pass (prune's)
    failed with "LogNormalGate has 12 units but the input has 6 along dim 2" (DeepSeek-V4's
    ``o_a_proj``). Attach now sees the output's size on the example inputs and names it."""
    model = _GroupedNet()
    x = torch.randn(3, 2, 4)
    with pytest.warns(cd.GatingWarning, match=r"'grouped' left ungated: its gate would have 12 "
                      r"units .* has 6 along dim -1 \(shape \(2, 2, 6\)\)"):  # fmt: skip
        cd.attach(model, example_inputs=x[:2])
    assert [n for n, _ in cd.named_gates(model)] == ["fc1"]
    randomize_(model)
    for _, g in cd.named_gates(model):
        with torch.no_grad():
            g.log_sigma[::2] = 3.0
        g.pruned.copy_(~g.mask())
    ref = model.eval()(x)
    slim = cd.prune(model)
    assert slim.fc1.out_features == 4 and slim.grouped.out_features == 12
    torch.testing.assert_close(slim(x), ref, rtol=1e-5, atol=1e-6)


class _StackedExperts(nn.Module):
    """Experts as one 3-D weight, a type with no layer spec (JetMoE's ``JetMoeParallelExperts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, 8) / 8**0.5)  # (E, out, in)

    def forward(self, x):  # x: (N, 8), every expert on every row
        return torch.einsum("ni,eoi->no", x, self.weight)


def test_nothing_gated_names_the_weights_of_a_type_without_a_layer_spec():
    """Most of the weights in modules of a type compressdrop does not know: the error said only
    that the model's Linears could not be gated (JetMoE's experts and attention experts hold
    83 % of its parameters), not where the rest of the model is."""
    model = nn.Sequential(_StackedExperts(), nn.ReLU(), nn.Linear(16, 2))
    said = r"among its 1 layer \(Linear\).*; 94% of its parameters are weights of layer types"
    said += r" .* no layer spec for, _StackedExperts \(1\)"
    with pytest.raises(InputError, match=said):
        cd.attach(model, example_inputs=torch.randn(2, 8))


def test_include_exclude_and_granularity():
    lenet5 = ZOO["lenet5"]
    assert [n for n, _ in cd.named_gates(cd.attach(lenet5(), granularity="channel"))] == [
        "features.0",
        "features.3",
    ]
    assert [n for n, _ in cd.named_gates(cd.attach(lenet5(), granularity="neuron"))] == [
        "classifier.1"
    ]
    assert [n for n, _ in cd.named_gates(cd.attach(lenet5(), include=["features.*"]))] == [
        "features.0",
        "features.3",
    ]
    assert [n for n, _ in cd.named_gates(cd.attach(lenet5(), exclude=[nn.Linear]))] == [
        "features.0",
        "features.3",
    ]
    with pytest.raises(ValueError, match="granularity"):
        cd.attach(lenet5(), granularity="weight")
    with pytest.raises(ValueError, match="unknown gate family"):
        cd.attach(lenet5(), gate="gaussianish")


def test_attach_twice_and_missing_input_shape_are_clear_errors():
    model = cd.attach(ZOO["lenet300"]())
    with pytest.raises(ValueError, match="already has gates"):
        cd.attach(model)
    with pytest.raises(ValueError, match="example_inputs"):
        cd.attach(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)))


def test_kl_counts_a_shared_gate_once_and_needs_gates():
    model = cd.attach(ZOO["resnet"]())
    assert torch.isclose(cd.kl(model), sum(g.kl() for _, g in cd.named_gates(model)))
    with pytest.raises(ValueError, match="no gates"):
        cd.kl(ZOO["resnet"]())


def test_cost_aware_kl_weights_follow_the_units_cost():
    model = ZOO["lenet5"]()
    groups = find_groups(model, input_for(model, 1))
    by_name = {g.name: g for g in groups}
    # conv1 (20 units): each filter has 25 weights + bias and feeds 50·25 weights of conv2
    assert by_name["features.0"].params_per_unit[0] == 26 + 50 * 25
    cd.attach(model, kl_cost="flops")
    costs = torch.cat([g.unit_cost for _, g in cd.named_gates(model)])
    assert torch.isclose(costs.mean(), torch.tensor(1.0))
    per_gate = {n: float(g.unit_cost[0]) for n, g in cd.named_gates(model)}
    assert per_gate["features.3"] > per_gate["classifier.1"]
    assert len(groups_of(model)) == 3


def test_kl_scale_multiplies_the_kl_of_one_kind_of_unit_and_is_re_attached():
    from .test_heads import Encoder, _ids  # heads and MLP neurons

    x = _ids()

    def gated(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cd.GatingWarning)  # the LayerNorm stream
            return cd.attach(Encoder(), kl_cost="flops", example_inputs=x, **kw)

    plain, scaled = gated(), gated(kl_scale={"head": 4.0})
    heads = {n for n, s in cd.gating.sites(plain) if isinstance(s, cd.gating.HeadGated)}
    assert heads and len(heads) < len(list(cd.named_gates(plain)))  # neurons too
    for (name, a), (_, b) in zip(cd.named_gates(plain), cd.named_gates(scaled)):
        torch.testing.assert_close(b.unit_cost, (4.0 if name in heads else 1.0) * a.unit_cost)
    config = cd.gating.attach_config(scaled)
    assert config["kl_scale"] == {"head": 4.0}
    config.pop("kl_cost")
    again = gated(**config)
    for (_, a), (_, b) in zip(cd.named_gates(scaled), cd.named_gates(again)):
        torch.testing.assert_close(a.unit_cost, b.unit_cost)
    # a key that is neither a kind nor a gated layer's name: a typo, refused rather than ignored
    with pytest.raises(InputError, match=r"'heads' is not a unit kind .* matches no gated layer"):
        gated(kl_scale={"heads": 2.0})


def test_kl_scale_by_layer_name_glob_multiplies_with_the_kind_factor():
    def gated(**kw):
        return cd.attach(ZOO["lenet5"](), kl_cost="flops", **kw)

    plain = {n: g.unit_cost.clone() for n, g in cd.named_gates(gated())}
    assert set(plain) == {"features.0", "features.3", "classifier.1"}
    kl_scale = {"features.0": 0.5, "features.*": 3.0, "channel": 2.0, "neuron": 5.0}
    scaled = gated(kl_scale=kl_scale)
    factors = {"features.0": 0.5 * 3.0 * 2.0, "features.3": 3.0 * 2.0, "classifier.1": 5.0}
    for name, g in cd.named_gates(scaled):
        torch.testing.assert_close(g.unit_cost, factors[name] * plain[name])
    assert cd.gating.attach_config(scaled)["kl_scale"] == kl_scale
    with pytest.raises(InputError, match=r"'fc9' is not .* \(gated: 'classifier.1', 'features.0'"):
        gated(kl_scale={"fc9": 2.0})
    with pytest.raises(InputError, match="matches no gated layer"):  # the output layer
        gated(kl_scale={"classifier.3": 2.0})


def test_a_kl_scale_glob_that_matches_nothing_leaves_the_model_as_it_was():
    """The glob is refused once the groups are known, but was refused after attach had made the
    model's attentions prunable (compressdrop's class, the nested-tensor path off): the model
    was changed by an attach that failed, and attaching it again traced another graph."""
    from .test_heads import Encoder, _ids

    model = Encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.GatingWarning)  # the LayerNorm stream
        with pytest.raises(InputError, match="matches no gated layer"):
            cd.attach(model, example_inputs=_ids(), kl_scale={"encoder.*.out_proj": 2.0})
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert model.encoder.use_nested_tensor


def test_sparsifier_penalty_follows_schedule_and_scales_by_dataset_size():
    model = ZOO["lenet300"]()
    sp = Sparsifier(model, n_train=1000, schedule=KLSchedule(beta=2.0, warmup=4, delay=1))
    assert float(sp.penalty(0.5)) == 0.0
    torch.testing.assert_close(sp.penalty(3.0), 2.0 * 0.5 * cd.kl(model) / 1000)
    torch.testing.assert_close(sp.penalty(10.0), 2.0 * cd.kl(model) / 1000)
    groups = sp.param_groups(lr=1e-3, gate_lr=1e-2, weight_decay=1e-4)
    assert groups[1]["lr"] == 1e-2 and groups[1]["weight_decay"] == 0.0
    n_gate = sum(p.numel() for _, g in cd.named_gates(model) for p in g.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == n_gate
    kept, total = sp.units()
    assert total == 400 and kept == 400
    slim = sp.finish()
    assert not cd.is_gated(slim)


def test_attach_keeps_eval_mode_on_the_modules_it_adds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    cd.attach(model, example_inputs=torch.randn(2, 6))
    assert not any(m.training for m in model.modules())
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # no noise in eval


def test_nothing_to_gate_says_why_without_relying_on_warnings():
    with pytest.raises(ValueError, match="reach the model's output"):
        cd.attach(nn.Sequential(nn.Linear(4, 3)), example_inputs=torch.randn(2, 4))
    with pytest.raises(ValueError, match="no layer of a type compressdrop gates"):
        cd.attach(nn.Sequential(nn.Flatten(), nn.ReLU()), example_inputs=torch.randn(2, 4))


def test_squeeze_excitation_channels_are_gated_with_their_stream():
    """x * sigmoid(fc2(...)): a pruned channel of x is zero whatever its scale, so the block's
    channels are gated (used to be refused at the Sigmoid) and the excitation layer fc2 is cut
    with them; the squeeze layer's own units get a gate."""
    model = randomize_(ZOO["squeeze_excite"]()).eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cd.attach(model)
    assert not [w for w in record if w.category is cd.GatingWarning]
    assert [n for n, _ in cd.named_gates(model)] == ["b1", "se1.fc1", "b2", "se2.fc1"]


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_a_programs_recurrent_layer_is_named_where_nothing_is_gated(tmp_path):
    """A new-user walk: a plain LSTM's .pt2 was refused for 'no gateable layer' with no word
    of the LSTM (the message pointed to GatingWarnings that a program's graph never gives)."""
    from compressdrop.checkpoint import load_model

    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM's flat weights "assigned during export"
        batch = ({0: torch.export.Dim("batch")},)
        program = torch.export.export(_LSTMClassifier().eval(), (x,), dynamic_shapes=batch)
    torch.export.save(program, tmp_path / "lstm.pt2")
    with pytest.raises(InputError, match=r"its program runs lstm layers.*compressdrop\.dropout"):
        cd.attach(load_model(tmp_path / "lstm.pt2"), example_inputs=x)


def test_an_include_pattern_or_granularity_that_selects_nothing_is_named():
    """Found by a new-user walk: each gave the generic 'the units of each reach the model's
    output' message, which did not say that the pattern matched nothing."""
    lenet300 = ZOO["lenet300"]  # its layers are named 1, 3 and 5
    with pytest.raises(
        InputError,
        match=r"include pattern 'zzz' matches none of the model's gateable layers "
        r"\('1' \(Linear\), '3' \(Linear\), '5' \(Linear\)\)",
    ):
        cd.attach(lenet300(), include=["zzz"])
    with pytest.raises(InputError, match="include patterns 'fc1', 'fc2' match none"):
        cd.attach(lenet300(), include=["fc1", "fc2"])
    with pytest.raises(InputError, match="granularity 'head' asks for head units"):
        cd.attach(lenet300(), granularity="head")
    with pytest.raises(InputError, match="granularity 'channel' asks for channel units"):
        cd.attach(lenet300(), granularity="channel")
    with pytest.raises(InputError, match=r"exclude Linear takes every gateable layer that incl"):
        cd.attach(lenet300(), include=["1"], exclude=[nn.Linear])
    # a CNN whose only neuron layer is its output: the message counts that layer, not the convs
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    with pytest.raises(InputError, match=r"among its 1 neuron layer \(Linear\): the units"):
        cd.attach(cnn, granularity="neuron", example_inputs=torch.randn(2, 3, 8, 8))
    # one pattern of several that matches nothing: the others gate, the stray one is warned about
    with pytest.warns(cd.GatingWarning, match="include pattern 'fc1' matches none"):
        model = cd.attach(lenet300(), include=["1", "fc1"])
    # an exclude that matches nothing excludes nothing: said, the gates attached as without it
    # (a new-user walk: exclude=["BertSelfAttention"] left BERT's heads gated without a word)
    with pytest.warns(cd.GatingWarning, match="exclude pattern 'fc1' matches none.*excludes noth"):
        assert len(list(cd.named_gates(cd.attach(lenet300(), exclude=["fc1"])))) == 2
    assert [n for n, _ in cd.named_gates(model)] == ["1"]


def test_a_kl_scale_kind_that_no_gated_unit_has_is_warned_about():
    with pytest.warns(cd.GatingWarning, match=r"kl_scale\['head'\] matches no gated unit"):
        cd.attach(ZOO["lenet300"](), kl_scale={"head": 4.0, "neuron": 2.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 3}, r"gate_kwargs\['lam'\]: unknown argument \(hardconcrete gates accept init_"),
        ({"penalty": "ten"}, r"gate_kwargs\['penalty'\]: expected a number, got 'ten'"),
        ({"init_drop": 1.5}, r"gate_kwargs\['init_drop'\]: init_drop must be in \(0, 1\)"),
    ],
)
def test_gate_kwargs_are_checked_with_the_packages_error(kwargs, message):
    model = ZOO["lenet300"]()
    with pytest.raises(InputError, match=message):
        cd.attach(model, gate="hardconcrete", gate_kwargs=kwargs)
    assert not cd.is_gated(model)


def test_an_operation_that_stops_gating_is_named_in_words_too():
    """The warning named autograd's nodes alone ("Mm", "Bmm", "AsStrided")."""

    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            g = self.b(x)
            return self.out(torch.relu(self.a(x)) @ (g.T @ g))

    said = r"'b' left ungated: .*Mm \(a matrix product"
    # nothing else is gateable here: attach fails after its warning
    with pytest.warns(cd.GatingWarning, match=said), pytest.raises(InputError, match="no gateable"):
        cd.attach(Gram(), example_inputs=torch.randn(2, 4))


class _FrozenBackbone(nn.Module):
    """A backbone computed under no_grad (or detached), a head trained on its features."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "no_grad":
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)
        return self.head(self.backbone(x).detach())


@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_layers_autograd_does_not_connect_to_the_output_are_named(how):
    """A backbone run under no_grad or detached was left ungated without a word: the pruning
    graph follows autograd and never saw it."""
    with pytest.warns(cd.GatingWarning) as said:
        net = cd.attach(_FrozenBackbone(how), "lognormal", example_inputs=torch.randn(2, 3, 8, 8))
    assert [n for n, _ in cd.named_gates(net)] == ["head.1"]
    ours = [str(w.message) for w in said if "does not lead back" in str(w.message)]
    assert len(ours) == 1
    assert "layers 'backbone.0', 'backbone.3' left ungated" in ours[0] and "no_grad" in ours[0]
    # asked only for what was traced, or only for neurons: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cd.attach(_FrozenBackbone(how), "lognormal", granularity="neuron",
                  example_inputs=torch.randn(2, 3, 8, 8))  # fmt: skip
        cd.attach(_FrozenBackbone(how), "lognormal", include="head.*",
                  example_inputs=torch.randn(2, 3, 8, 8))  # fmt: skip
