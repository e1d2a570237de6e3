"""Attention heads as units: nn.MultiheadAttention (both layouts, its encoder's fast and nested
paths), a ViT-style classifier, user-written attentions over F.scaled_dot_product_attention (found
by their parts' names, packed or separate projections, or registered), for every gate family:
a gate per head, heads removed exactly, the modules' own attributes updated, the slim model
exported, replayed and trained."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.export.program import export_program
from compressdrop.gating import HeadGated, HeadSpec, MultiheadAttention, register_attention, sites
from compressdrop.gating.attention import to_prunable, to_stock
from compressdrop.pruning import PruningWarning, replay, unmask_

from .zoo import ViT

FAMILIES = ["lognormal", "variational", "concrete", "hardconcrete"]


class Encoder(nn.Module):
    """Token ids (0 = padding) → embedding → nn.TransformerEncoder → masked mean → Linear."""

    def __init__(self, batch_first: bool = True, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=32, batch_first=batch_first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch_first=False: "nested tensor not used"
            self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        x = self.emb(ids)
        x = self.encoder(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=pad)
        x = x if self.batch_first else x.transpose(0, 1)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp(min=1))


class SDPAttention(nn.Module):
    """A user's causal attention: separate q/k/v/o projections, F.scaled_dot_product_attention."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (
            p(x).view(B, L, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class PackedAttention(nn.Module):
    """A user's attention with one packed qkv projection (timm's layout)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(B, L, -1))


class TalkingHeads(SDPAttention):
    """Mixes the heads' outputs (adds their mean) before the projection: removing a head changes
    the others, so it is not exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (
            p(x).view(B, L, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        y = y + y.mean(1, keepdim=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class Renamed(nn.Module):
    """A user's attention whose parts have names compressdrop does not guess."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.n = heads
        self.a, self.b, self.c, self.z = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.n, -1).transpose(1, 2) for p in (self.a, self.b, self.c))
        return self.z(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))


class TinyLM(nn.Module):
    """Pre-norm GPT block over token ids with a given attention module."""

    def __init__(self, attention: nn.Module, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), attention, nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.attn(self.ln_1(x))
        return self.out(x + self.fc2(F.gelu(self.fc1(self.ln_2(x)))))


def _ids(batch: int = 4, length: int = 6) -> torch.Tensor:
    ids = torch.randint(1, 40, (batch, length))
    ids[0, -2:] = 0  # padding
    return ids


def _attach(model: nn.Module, x: torch.Tensor, gate: str = "lognormal") -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cd.attach(model, gate=gate, example_inputs=x)
    return [str(w.message) for w in record if w.category is cd.GatingWarning]


def _scatter(model: nn.Module) -> float:
    """Spread every gate's parameters so that SNRs differ; returns a threshold between the
    lowest two head SNRs of the first head gate (so at least one head goes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, g in cd.named_gates(model):
            for p in g.parameters():
                p.add_(torch.randn_like(p) * 1.5)
    heads = next(s.gate for _, s in sites(model) if isinstance(s, HeadGated))
    snr = heads.snr().detach().sort().values
    return float((snr[0] + snr[1]) / 2)


def _prune(model: nn.Module, thr: float) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)  # an MLP gate may empty at thr
        return cd.prune(model, thr)


def _head_gates(model: nn.Module) -> list[str]:
    return [s.attention for _, s in sites(model) if isinstance(s, HeadGated)]


def _check_slim(model, slim, x, tmp_path, fresh, thr, export: bool = True):
    """slim = masked gated model, fewer parameters, ONNX and .pt2 exports that match it (unless
    ``export`` is False), replay of its history on ``fresh``, a training step."""
    with torch.no_grad():
        torch.testing.assert_close(slim(x), cd.mask_(model, thr)(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in slim.parameters()) < sum(
        p.numel() for n, p in model.named_parameters() if ".gate." not in n
    )
    if export:
        onnx_report = cd.export_onnx(slim, x[:2], tmp_path / "m.onnx")
        assert max(onnx_report.max_rel_error.values()) <= 1e-4
        assert max(export_program(slim, x[:2], tmp_path / "m.pt2").max_rel_error.values()) <= 1e-5
    rebuilt = replay(fresh, slim.prune_report.history, example_inputs=x)
    rebuilt.load_state_dict(slim.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), slim(x), rtol=1e-6, atol=1e-7)
    slim.train()(x).float().sum().backward()  # the slim model trains
    slim.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_heads_are_gated_and_removed_exactly(tmp_path, batch_first):
    torch.manual_seed(0)
    model, ids = Encoder(batch_first).eval(), _ids()
    fresh = copy.deepcopy(model)
    _attach(model, ids)
    attns = [f"encoder.layers.{i}.self_attn" for i in (0, 1)]
    assert _head_gates(model) == attns
    assert all(isinstance(model.get_submodule(a), MultiheadAttention) for a in attns)
    assert not model.encoder.use_nested_tensor  # its nested path would bypass the gates
    thr = _scatter(model)
    with torch.no_grad():
        masked = cd.mask_(model, thr)(ids)  # eval, no grad: PyTorch's fast paths would skip gates
        unmask_(model)
        assert not torch.allclose(masked, model(ids))  # so the head gates did act
    slim = _prune(model, thr)
    a0 = slim.encoder.layers[0].self_attn
    kept = slim.prune_report.layers[0].after
    assert a0.num_heads == kept < 4 and a0.embed_dim == 16 and a0.head_dim == 4
    assert a0.in_proj_weight.shape == (3 * 4 * kept, 16) and a0.out_proj.in_features == 4 * kept
    assert all(step[1] == "heads" for step in slim.prune_report.history[:1])
    _check_slim(model, slim, ids, tmp_path, fresh, thr)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_gate_family_prunes_vit_heads(tmp_path, family):
    torch.manual_seed(0)
    model, x = ViT().eval(), torch.randn(4, 1, 8, 8)
    fresh = copy.deepcopy(model)
    _attach(model, x, family)
    assert _head_gates(model) == ["blocks.0.self_attention", "blocks.1.self_attention"]
    thr = _scatter(model)
    slim = _prune(model, thr)
    heads = [b.self_attention.num_heads for b in slim.blocks]
    assert min(heads) < 4
    assert {r.name: r.after for r in slim.prune_report.layers}[
        "blocks.0.self_attention.out_proj"
    ] == heads[0]
    # the slim ViT holds no gate (the same modules whatever the family; fewer heads in each
    # attention): its ONNX and .pt2 exports run for one family, the rest for all four
    _check_slim(model, slim, x, tmp_path, fresh, thr, export=family == "lognormal")


@pytest.mark.parametrize("attention", [SDPAttention, PackedAttention])
def test_a_user_attention_is_found_by_its_parts_and_pruned(tmp_path, attention):
    torch.manual_seed(0)
    model, ids = TinyLM(attention()).eval(), _ids()
    fresh = copy.deepcopy(model)
    warned = _attach(model, ids)
    assert _head_gates(model) == ["attn"]
    assert not any("proj" in w or "qkv" in w for w in warned)  # the projections are the heads'
    thr = _scatter(model)
    slim = _prune(model, thr)
    attn = slim.attn
    assert attn.num_heads < 4
    width = attn.num_heads * 4
    if attention is SDPAttention:
        assert attn.q_proj.out_features == attn.k_proj.out_features == width
    else:
        assert attn.qkv.out_features == 3 * width
    assert (
        attn.get_submodule("o_proj" if attention is SDPAttention else "proj").in_features == width
    )
    _check_slim(model, slim, ids, tmp_path, fresh, thr)


def test_an_attention_that_mixes_its_heads_keeps_them_with_a_warning():
    torch.manual_seed(0)
    model = TinyLM(TalkingHeads()).eval()
    warned = _attach(model, _ids())
    assert _head_gates(model) == []
    assert any("'attn' keeps all its heads" in w and "not the same as zeroing" in w for w in warned)


def test_a_registered_attention_is_pruned(tmp_path):
    torch.manual_seed(0)
    register_attention(Renamed, HeadSpec(o="z", q="a", k="b", v="c", heads="n"))
    model, ids = TinyLM(Renamed()).eval(), _ids()
    fresh = copy.deepcopy(model)
    _attach(model, ids)
    assert _head_gates(model) == ["attn"]
    thr = _scatter(model)
    slim = _prune(model, thr)
    assert slim.attn.n < 4 and slim.attn.z.in_features == 4 * slim.attn.n
    _check_slim(model, slim, ids, tmp_path, fresh, thr)


def test_an_attention_registered_by_name_is_skipped_where_the_library_lacks_it():
    """The Hugging Face registrations name their classes by module and name: a transformers
    without a family (one that predates ModernBERT, say) must leave the others registered, not
    fail every attach with an ImportError."""
    from compressdrop.gating.heads import head_spec_of, register_attention_at

    spec = HeadSpec(o="z", q="a", k="b", v="c", heads="n")
    register_attention_at("transformers.models.no_such_family.modeling_no_such_family", "X", spec)
    register_attention_at(__name__, "NoSuchAttention", spec)
    register_attention_at(__name__, "RenamedAgain", spec)
    found = head_spec_of(RenamedAgain())
    assert found is not None and found[0] is spec


class RenamedAgain(Renamed):
    """A class of its own for the registration by name above."""


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_detach_gives_back_the_stock_attention():
    torch.manual_seed(0)
    model, ids = Encoder().eval(), _ids()
    with torch.no_grad():
        before = model(ids)  # through PyTorch's nested-tensor fast path
    _attach(model, ids)
    cd.detach(model)
    attn = model.encoder.layers[0].self_attn
    assert type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim
    assert model.encoder.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)


def test_granularity_head_gates_heads_only():
    torch.manual_seed(0)
    model = ViT().eval()
    cd.attach(model, granularity="head", example_inputs=torch.randn(2, 1, 8, 8))
    assert [n for n, _ in cd.named_gates(model)] == [
        "blocks.0.self_attention.out_proj",
        "blocks.1.self_attention.out_proj",
    ]


def test_gated_heads_train_and_keep_the_eval_mode():
    torch.manual_seed(0)
    model, ids = Encoder().eval(), _ids()
    _attach(model, ids)
    assert all(not m.training for m in model.modules())
    model.train()
    out = model(ids)
    cd.kl(model).add(out.sum()).backward()
    head = next(s.gate for _, s in sites(model) if isinstance(s, HeadGated))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_the_prunable_attention_computes_what_pytorch_does(batch_first, kdim):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    ours = to_prunable(copy.deepcopy(stock))
    assert list(ours.state_dict()) == list(stock.state_dict())
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 5, kdim or 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for kwargs in (
        {},
        {"key_padding_mask": pad},
        {"attn_mask": causal, "key_padding_mask": pad, "need_weights": False},
        {"attn_mask": causal.float() * -1e4, "average_attn_weights": False},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
    ):
        want, want_w = stock(q, kv, kv, **kwargs)
        got, got_w = ours(q, kv, kv, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
        if kdim is None:  # self-attention: one product for q, k and v
            torch.testing.assert_close(ours(q, q, q, **kwargs)[0], stock(q, q, q, **kwargs)[0])
    assert type(to_stock(ours)) is nn.MultiheadAttention


def _transposes_onnxruntime_runs(path) -> list[list[int]]:
    """The ``perm`` of every Transpose node left in onnxruntime's optimized graph of ``path``."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    return [
        list(a.ints)
        for n in graph.node
        if n.op_type == "Transpose"
        for a in n.attribute
        if a.name == "perm"
    ]


def test_exported_attention_leaves_onnxruntime_no_key_transpose(tmp_path):
    """PyTorch's fused attention exports kᵀ as a Transpose that onnxruntime cannot fold into its
    MatMul (on CPU it cost as much as the product, BENCHMARKS §1); export_onnx exports stock and
    slim attention spelled out, and an attention with one head left moves no axis at all."""
    torch.manual_seed(0)
    model, ids = Encoder().eval(), _ids()
    layers = model.encoder.layers
    with warnings.catch_warnings():  # the check runs the stock encoder: its nested-tensor path
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors", UserWarning)
        cd.export_onnx(model, ids[:2], tmp_path / "dense.onnx")  # compared with PyTorch inside
    # the user's model is given back as it was: stock attention, its nested-tensor path on
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in layers)
    assert model.encoder.use_nested_tensor
    perms = _transposes_onnxruntime_runs(tmp_path / "dense.onnx")
    swaps_last_two = [p for p in perms if p[-2:] == [len(p) - 1, len(p) - 2]]
    assert perms and not swaps_last_two  # the heads' split and merge only
    for layer in layers:  # one head left in each layer
        layer.self_attn = to_prunable(layer.self_attn)
        layer.self_attn.remove_heads_(torch.tensor([2]))
    model.encoder.use_nested_tensor = False
    cd.export_onnx(model, ids[:2], tmp_path / "one_head.onnx")
    assert _transposes_onnxruntime_runs(tmp_path / "one_head.onnx") == []


class _CausalLM(nn.Module):
    """Two self-attention layers over token ids (0 = padding), causal mask and padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.att = nn.ModuleList(nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2))
        self.head = nn.Linear(16, 16)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).triu(1)
        h = self.emb(t)
        for a in self.att:
            h = h + a(h, h, h, attn_mask=causal, key_padding_mask=t == 0, need_weights=False)[0]
        return self.head(h)


def test_a_query_that_sees_no_key_exports_as_zeros_not_nan(tmp_path):
    """Left padding under a causal mask leaves the first query no key: PyTorch's attention gives
    it zeros; the attention spelled out for export must too (a NaN there spreads to every
    position of the next layer)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _CausalLM().eval()
    t = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    want = model(t).detach()  # (under no_grad, PyTorch's fused fast path gives NaN there)
    assert not want.isnan().any()
    # as in a slim model (export_onnx's own check runs the model under no_grad, where the stock
    # module's fast path would give NaN for such rows)
    model.att = nn.ModuleList(to_prunable(a) for a in model.att)
    with torch.no_grad():
        torch.testing.assert_close(model(t), want)
    ids = torch.randint(1, 16, (4, 6))
    cd.export_onnx(model, ids, tmp_path / "lm.onnx")
    sess = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: t.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    export_program(model, ids, tmp_path / "lm.pt2")
    with open(tmp_path / "lm.pt2", "rb") as f:
        program = torch.export.load(f).module()
    with torch.no_grad():
        torch.testing.assert_close(program(t), want, rtol=1e-5, atol=1e-6)


class _Functional(nn.Module):
    """A forward that reads its attention's internals to call the functional form itself."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, x = self.attn, x.transpose(0, 1)
        y, _ = F.multi_head_attention_forward(
            x, x, x, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias, a.bias_k,
            a.bias_v, a.add_zero_attn, a.dropout, a.out_proj.weight, a.out_proj.bias,
            training=a.training, need_weights=False,
            use_separate_proj_weight=not a._qkv_same_embed_dim, q_proj_weight=a.q_proj_weight,
            k_proj_weight=a.k_proj_weight, v_proj_weight=a.v_proj_weight,
        )  # fmt: skip
        return self.fc(y.mean(0))


def test_a_model_that_reads_its_attention_s_internals_exports_as_it_is(tmp_path):
    torch.manual_seed(0)
    model = _Functional().eval()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("torch.export").addHandler(handler)
    try:
        report = cd.export_onnx(model, torch.randn(4, 5, 8), tmp_path / "m.onnx")
    finally:
        logging.getLogger("torch.export").removeHandler(handler)
    assert max(report.max_rel_error.values()) <= 1e-4
    # the first, swapped attempt failed without a word from torch.export
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
    assert type(model.attn) is nn.MultiheadAttention


def test_a_slim_attention_attaches_again_without_a_cut_off_warning():
    """Torch-Pruning traces compressdrop's MultiheadAttention (a slim model's) as one node: the
    out_proj it calls inside is not in the pruning graph, which is no cut-off (it hosts the head
    gate); attach named it as left ungated, "run under torch.no_grad() or detached"."""
    torch.manual_seed(0)
    model, ids = Encoder().eval(), _ids()
    for layer in model.encoder.layers:
        layer.self_attn = to_prunable(layer.self_attn)
    said = _attach(model, ids)
    assert not [w for w in said if "does not lead back" in w], said
    assert _head_gates(model) == [f"encoder.layers.{i}.self_attn" for i in (0, 1)]
