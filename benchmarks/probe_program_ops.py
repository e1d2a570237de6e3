"""Probe: the ATen and prims operators that ``torch.export`` programs call, and the allowlist of
them that compressdrop runs from a ``.pt2`` (``compressdrop/programs/_ops.py``).

Observed: the node targets (as ``torch.export.save`` writes them) of every torchvision
classification model (``torchvision.models.list_models``, random weights, a dynamic batch, a
64×64 input or the size the model needs; the six largest left out, their families covered), of
Hugging Face models built from small configs with random weights (as compressdrop records a
pickled one: ``programs.program_record``, a dynamic batch and length), of compressdrop's own
programs (its reference nets dense, gated with each gate family, slim, and slim with their noise
kept for MC dropout, through ``cd.export_program``; one model of each torchvision family, the
Hugging Face models and nn.TransformerEncoder pruned as ``prune --trust-pickle`` prunes them), of
one small model a ``torch.nn`` layer, each also after ``run_decompositions()``, of a few models
in training mode, and (``--tests``) of every program the test suite writes. ``--write`` then
writes the allowlist: those operators, the core ATen opset (``torch.Tag.core``) and the prims,
less what :func:`excluded` names (each with its reason).

Run: python benchmarks/probe_program_ops.py [--quick] [--tests | --tests-tsv FILE] [--write]
(about an hour on two cores; ``--quick``: one model a family, about ten minutes; ``--tests``: the
programs the test suite writes too, as long again as the suite takes; ``--observed
results/program_ops.json --write``: the allowlist again from an earlier run's operators)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compressdrop as cd  # noqa: E402
from compressdrop.programs import program_record  # noqa: E402
from compressdrop.programs._limits import _walk  # noqa: E402
from compressdrop.programs.safety import _NO_OPS  # noqa: E402

from common import save  # noqa: E402

OPS_FILE = ROOT / "compressdrop" / "programs" / "_ops.py"

# operators of the candidates left out, and why (benchmarks/probe_op_bounds.py tried them with
# indices, sizes and modes a crafted file can give, each in a subprocess of its own)
_BN = (
    "running statistics or a weight shorter than the channels are read past their end (a crash, "
    "or NaN read from memory past the buffer); aten.batch_norm, which torch.export writes, "
    "checks them"
)
_RESIZE = "grows a tensor's storage in place to any size the file gives; in no exported program"
EXCLUDED: dict[str, str] = {
    "aten._native_batch_norm_legit.default": _BN,
    "aten._native_batch_norm_legit.no_stats": _BN,
    "aten._native_batch_norm_legit_functional.default": _BN,
    "aten._native_batch_norm_legit_no_training.default": _BN,
    "aten.native_batch_norm.default": _BN,
    "aten.resize_.default": _RESIZE,
    "prims.resize.default": _RESIZE,
    "aten.grid_sampler_2d.default": "takes interpolation and padding modes out of range silently",
    **dict.fromkeys(
        [
            "aten._fft_c2r.default",
            "aten._fft_r2c.default",
            "prims.fft_c2c.default",
            "prims.fft_c2r.default",
            "prims.fft_r2c.default",
        ],
        "a negative or repeated dim crashed the CPU kernel (segfault, abort) and a dim past the "
        "rank was taken silently (benchmarks/fuzz_allowed_ops.py); in no exported model's program",
    ),
}
#: every gradient kernel (``*_backward``) of the candidates
BACKWARD = (
    "a gradient kernel, in no inference program, that takes the forward pass's saved indices and "
    "statistics as arguments (max_pool2d_with_indices_backward with an index past its input "
    "crashed; _adaptive_avg_pool2d_backward takes a gradient of any shape)"
)


def excluded(op: str) -> str | None:
    """Why ``op`` (``aten.add.Tensor``) is left out of the allowlist, or None."""
    if _NO_OPS.match(f"torch.ops.{op}"):
        return "refused by safety._NO_OPS"
    if op.split(".")[1].endswith("_backward"):
        return BACKWARD
    return EXCLUDED.get(op)


# models too big to build in a few seconds (hundreds of millions of weights); their families are
# covered by a smaller member
SKIP_TV = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf"}
# torchvision models that need a larger input than 64×64
SIDE_TV = {"inception_v3": 96, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224}


def targets(data: bytes) -> set[str]:
    """The node targets (and operator arguments) of every program in a ``.pt2``'s bytes."""
    found: set[str] = set()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            if "/models/" in name and name.endswith(".json"):
                for key, value in _walk(json.loads(z.read(name))):
                    if key in ("target", "as_operator") and isinstance(value, str):
                        found.add(value)
    return found


def _bytes(program: torch.export.ExportedProgram) -> bytes:
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _with_decomposed(data: bytes, decompose: bool) -> Iterator[tuple[str, set[str] | str]]:
    """The targets of a program, then (``decompose``) of its ``run_decompositions()`` (the core
    opset), or why torch could not decompose it."""
    yield "", targets(data)
    if not decompose:
        return
    program = torch.export.load(io.BytesIO(data))  # a program made here: trusted
    try:
        yield "+decomposed", targets(_bytes(program.run_decompositions()))
    except Exception as e:
        yield "+decomposed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _export(model: nn.Module, x: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    except Exception:  # a model whose graph fixes its batch (a reshape): exported as it is
        program = torch.export.export(model, (x,))
    return _bytes(program)


def torchvision_models(quick: bool) -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    tv = cd.import_torchvision()
    names = tv.models.list_models(module=tv.models)
    if quick:
        names = [n for n in names if n in QUICK_TV]
    for name in names:
        if name in SKIP_TV:
            print(f"skipped {name}: too big to build quickly", flush=True)
            continue

        def run(name: str = name) -> list[bytes]:
            model = tv.models.get_model(name, weights=None).eval()
            side = SIDE_TV.get(name, 64)
            return [_export(model, torch.randn(2, 3, side, side))]

        yield f"torchvision:{name}", run


QUICK_TV = {
    *("alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "densenet121", "squeezenet1_1"),
    *("inception_v3", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5"),
    *("shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf"),
    *("regnet_y_400mf", "convnext_tiny", "vit_b_32", "swin_t", "swin_v2_t", "maxvit_t"),
}


def _hf_configs() -> dict[str, tuple[str, str, dict[str, Any]]]:
    tokens = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    dec = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}  # fmt: skip
    enc = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "max_position_embeddings": 64, "num_labels": 3}  # fmt: skip
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {**tokens, **dec}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**tokens, **dec}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {**tokens, **dec}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {**tokens, **dec, "head_dim": 8}),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {**tokens, **dec, "head_dim": 8, "sliding_window": 4},
        ),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {**tokens, **dec, "head_dim": 8, "sliding_window": 4},
        ),
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            {**tokens, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4},
        ),
        "opt": (
            "OPTConfig",
            "OPTForCausalLM",
            {
                **tokens,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "ffn_dim": 48,
                "max_position_embeddings": 64,
                "word_embed_proj_dim": 32,
            },
        ),
        "bert": ("BertConfig", "BertForSequenceClassification", {**tokens, **enc}),
        "roberta": (
            "RobertaConfig",
            "RobertaForSequenceClassification",
            {**tokens, **enc, "max_position_embeddings": 66},
        ),
        "electra": (
            "ElectraConfig",
            "ElectraForSequenceClassification",
            {**tokens, **enc, "embedding_size": 16},
        ),
        "distilbert": (
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            {
                **tokens,
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "hidden_dim": 48,
                "max_position_embeddings": 64,
                "num_labels": 3,
            },
        ),
        "t5": (
            "T5Config",
            "T5EncoderModel",
            {**tokens, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4},
        ),
        "vit": (
            "ViTConfig",
            "ViTForImageClassification",
            {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 48,
                "image_size": 32,
                "patch_size": 8,
                "num_labels": 3,
            },
        ),
    }


def hf_models() -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    cd.import_torchvision()  # before transformers, which imports it
    try:
        import transformers
    except ImportError:
        print("skipped Hugging Face models: transformers is not installed", flush=True)
        return
    for name, (config_cls, model_cls, sizes) in _hf_configs().items():

        def run(config_cls=config_cls, model_cls=model_cls, sizes=sizes, name=name) -> list[bytes]:
            model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes))
            x = torch.randn(2, 3, 32, 32) if name == "vit" else torch.randint(3, 64, (2, 12))
            return [program_record(model.eval(), x)["program"].numpy().tobytes()]

        yield f"hf:{name}", run


def compressdrop_programs(tmp: Path) -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    """compressdrop's reference nets as ``cd.export_program`` writes them: dense, gated with each
    gate family, slim, and slim with its noise kept (MC dropout)."""
    from compressdrop.models import build_model

    shapes = {"lenet300": (1, 8, 8), "lenet5": (1, 28, 28), "vgg": (3, 32, 32),
              "resnet": (3, 32, 32), "vit": (3, 32, 32), "lstm_rows": (1, 8, 8)}  # fmt: skip
    for arch, shape in shapes.items():
        for family in ["dense", *cd.GATES]:

            def run(arch: str = arch, shape: tuple = shape, family: str = family) -> list[bytes]:
                torch.manual_seed(0)
                model, x = build_model(arch, shape), torch.randn(2, *shape)
                if family == "dense":
                    return [_written(model, x, tmp)]
                cd.attach(model, gate=family)
                slim = cd.prune(model, 1.0)
                noisy = cd.keep_noise(model, slim, 1.0)  # MC dropout's slim model
                return [_written(m, x, tmp) for m in (model, slim, noisy)]

            yield f"compressdrop:{arch}:{family}", run


def _written(model: nn.Module, x: torch.Tensor, tmp: Path) -> bytes:
    path = tmp / "program.pt2"
    cd.export_program(model, x, path)
    return path.read_bytes()


def slim_programs(tmp: Path, quick: bool) -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    """Models pruned as ``compressdrop prune`` prunes a pickled one: recorded as their dense
    program, gated, given gates of spread SNR, pruned at the median, then written as the slim
    program (``cd.export_program``) and recorded as one (a slim checkpoint's program): one of
    every torchvision family of the test suite (heads of ViT and Swin cut), the Hugging Face
    models above, and nn.TransformerEncoder in both layouts with a padding mask."""
    from compressdrop._attrs import set_record

    from tests.test_heads import Encoder
    from tests.test_surgery import quantiles, random_gates_
    from tests.torchvision_models import families

    builds: dict[str, tuple[Callable[[], nn.Module], torch.Tensor]] = {
        name: (build, torch.randn(2, 3, side, side)) for name, (build, side) in families().items()
    }
    transformers = None
    with contextlib.suppress(ImportError):
        import transformers
    for name, (config_cls, model_cls, sizes) in _hf_configs().items():
        if transformers is not None:
            make = getattr(transformers, model_cls), getattr(transformers, config_cls)
            x = torch.randn(2, 3, 32, 32) if name == "vit" else torch.randint(3, 64, (2, 12))
            builds[f"hf {name}"] = (lambda make=make, sizes=sizes: make[0](make[1](**sizes)), x)
    ids = torch.randint(1, 40, (2, 12))
    ids[0, -3:] = 0  # padding
    for layout in (True, False):
        builds[f"encoder batch_first={layout}"] = (lambda layout=layout: Encoder(layout), ids)
    if quick:
        builds = {k: v for k, v in builds.items() if k in ("ResNet", "ViT", "hf bert", "hf llama")}
    for name, (build, x) in builds.items():

        def run(build: Callable[[], nn.Module] = build, x: torch.Tensor = x) -> list[bytes]:
            torch.manual_seed(0)
            model = build().eval()
            dense = program_record(model, x)
            set_record(model, "arch", dense)  # what `prune --trust-pickle` does
            cd.attach(model, example_inputs=x)
            random_gates_(model, seed=1)
            slim = cd.prune(model, quantiles(model, (0.5,))[0], example_inputs=x)
            record = program_record(slim, x)["program"].numpy().tobytes()
            return [dense["program"].numpy().tobytes(), _written(slim, x, tmp), record]

        yield f"slim:{name}", run


def train_mode() -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    """A few models exported in training mode: dropout, batch statistics."""
    from compressdrop.models import build_model

    for arch, shape in (("vgg", (3, 32, 32)), ("vit", (3, 32, 32)), ("lstm_rows", (1, 8, 8))):

        def run(arch: str = arch, shape: tuple = shape) -> list[bytes]:
            model = build_model(arch, shape).train()
            return [_bytes(torch.export.export(model, (torch.randn(2, *shape),)))]

        yield f"train:{arch}", run


def nn_layers() -> Iterator[tuple[str, Callable[[], list[bytes]]]]:
    """One small model a ``torch.nn`` layer that a user's model may hold (compressdrop gates
    Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and LSTM; the others are around them)."""
    c = 4  # channels

    def seq(*layers: nn.Module) -> nn.Module:
        return nn.Sequential(*layers)

    layers: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
        "Conv1d": (lambda: seq(nn.Conv1d(c, c, 3, padding=1)), (c, 16)),
        "Conv3d": (lambda: seq(nn.Conv3d(c, c, 3, padding=1)), (c, 6, 6, 6)),
        "ConvTranspose1d": (lambda: seq(nn.ConvTranspose1d(c, c, 3, stride=2)), (c, 8)),
        "ConvTranspose2d": (lambda: seq(nn.ConvTranspose2d(c, c, 3, stride=2)), (c, 8, 8)),
        "ConvTranspose3d": (lambda: seq(nn.ConvTranspose3d(c, c, 3)), (c, 4, 4, 4)),
        "GRU": (lambda: _Recurrent(nn.GRU(c, 8, batch_first=True)), (5, c)),
        "RNN": (lambda: _Recurrent(nn.RNN(c, 8, batch_first=True)), (5, c)),
        "LSTM bidirectional": (
            lambda: _Recurrent(nn.LSTM(c, 8, num_layers=2, bidirectional=True)),
            (5, c),
        ),
        "BatchNorm1d": (lambda: seq(nn.Linear(c, c), nn.BatchNorm1d(c)), (c,)),
        "BatchNorm3d": (lambda: seq(nn.BatchNorm3d(c)), (c, 4, 4, 4)),
        "GroupNorm": (lambda: seq(nn.GroupNorm(2, c)), (c, 6, 6)),
        "InstanceNorm2d": (lambda: seq(nn.InstanceNorm2d(c, affine=True)), (c, 6, 6)),
        "InstanceNorm2d stats": (
            lambda: seq(nn.InstanceNorm2d(c, track_running_stats=True)),
            (c, 6, 6),
        ),
        "LocalResponseNorm": (lambda: seq(nn.LocalResponseNorm(2)), (c, 6, 6)),
        "RMSNorm": (lambda: seq(nn.RMSNorm(c)), (3, c)),
        "pools 1d": (
            lambda: seq(nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveMaxPool1d(2)),
            (c, 16),
        ),
        "pools 2d": (
            lambda: seq(
                nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveMaxPool2d(2), nn.LPPool2d(2, 1)
            ),
            (c, 9, 9),
        ),
        "pools 3d": (lambda: seq(nn.MaxPool3d(2), nn.AvgPool3d(1)), (c, 4, 4, 4)),
        "upsampling": (
            lambda: seq(
                nn.Upsample(scale_factor=2),
                nn.Upsample(scale_factor=2, mode="bilinear"),
                nn.Upsample(size=(9, 9), mode="bicubic"),
                nn.PixelShuffle(2),
                nn.PixelUnshuffle(2),
            ),
            (c, 4, 4),
        ),
        "padding": (
            lambda: seq(
                nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.ZeroPad2d(1), nn.CircularPad2d(1)
            ),
            (c, 4, 4),
        ),
        "activations": (
            lambda: seq(
                *(nn.ELU(), nn.SELU(), nn.CELU(), nn.PReLU(), nn.RReLU(), nn.Softplus()),
                *(nn.Mish(), nn.Softsign(), nn.Tanhshrink(), nn.Hardshrink(), nn.Softshrink()),
                *(nn.LogSigmoid(), nn.ReLU6(), nn.Threshold(0.1, 0.0), nn.GLU()),
                *(nn.Softmin(-1), nn.LogSoftmax(-1), nn.Softmax2d()),
            ),
            (c, 4, 4),
        ),
        "dropouts": (
            lambda: seq(
                nn.Dropout1d(), nn.Dropout2d(), nn.AlphaDropout(), nn.FeatureAlphaDropout()
            ),
            (c, 4),
        ),
        "Embedding(Bag)": (lambda: _Embeddings(), (6,)),
        "Bilinear": (lambda: _Pair(nn.Bilinear(c, c, 3)), (c,)),
        "distances": (lambda: _Distances(), (c,)),
        "Fold": (lambda: seq(nn.Unfold(2), nn.Fold((4, 4), 2)), (c, 4, 4)),
        "Transformer": (
            lambda: nn.Transformer(8, 2, 1, 1, 16, batch_first=True),
            (5, 8),
        ),
        "tensor functions": (lambda: _TensorFunctions(), (c, 6)),
    }
    for name, (build, shape) in layers.items():

        def run(build: Callable[[], nn.Module] = build, shape: tuple = shape) -> list[bytes]:
            torch.manual_seed(0)
            model = build()
            outs = []
            for mode in (False, True):  # eval, then training (dropouts, batch statistics)
                tokens = isinstance(model, _Embeddings)
                x = torch.randint(0, 9, (2, *shape)) if tokens else torch.randn(2, *shape)
                x = (x, x) if isinstance(model, nn.Transformer) else (x,)
                outs.append(_bytes(torch.export.export(model.train(mode), x)))
            return outs

        yield f"nn:{name}", run


class _Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0, max_norm=None)
        self.bag = nn.EmbeddingBag(10, 4, mode="mean")
        self.bag_max = nn.EmbeddingBag(10, 4, mode="max", padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).sum(1) + self.bag(ids) + self.bag_max(ids)


class _Pair(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x.flip(-1))


class _Distances(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flip(0)
        return torch.cat(
            [
                nn.functional.cosine_similarity(x, y).unsqueeze(1),
                nn.functional.pairwise_distance(x, y).unsqueeze(1),
                torch.cdist(x, y),
                nn.functional.normalize(x),
            ],
            dim=1,
        )


class _TensorFunctions(nn.Module):
    """Tensor functions a forward pass often calls, beyond those of the models above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [
            torch.stack([x, x]).mean(0),
            x.max(-1, keepdim=True).values.expand_as(x),
            x.amax(-1, keepdim=True).expand_as(x),
            x.argmax(-1, keepdim=True).float().expand_as(x),
            x.cumsum(-1),
            x.sort(-1).values,
            x.topk(2, -1).values.repeat(1, 1, 3),
            x.clamp(-1, 1),
            x.abs().sqrt(),
            x.std(-1, keepdim=True).expand_as(x),
            torch.tril(x),
            x.masked_fill(x > 0, 0.0),
            x.exp().log1p(),
            x.norm(dim=-1, keepdim=True).expand_as(x),
            torch.einsum("bij,bij->bij", x, x),
            x.t().t() if x.dim() == 2 else x.transpose(-1, -2).transpose(-1, -2),
            x.narrow(-1, 0, x.shape[-1]),
            x.gather(-1, x.argsort(-1)),
            x.float().round(),
            x.sign(),
            x.atan(),
            x.reciprocal().nan_to_num(),
            x.erf(),
            x.square(),
            x.softmax(-1),
        ]
        return torch.stack(parts).sum(0)


def _decomposes(source: str, i: int) -> bool:
    """Whether the ``i``-th program of a source is decomposed too: not every torchvision model
    (one of each family is; a family's decompositions are its members' own), and of a slim
    model only the program ``cd.export_program`` wrote (in the interest of time)."""
    if source.startswith("torchvision:"):
        return source.removeprefix("torchvision:") in QUICK_TV
    return i == 1 if source.startswith("slim:") else True


def observe(
    groups: list[str], quick: bool, tmp: Path
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """``{target: {sources}}`` over the sources of ``groups`` (:data:`GROUPS`), and
    ``{source: why it failed}``."""
    seen: dict[str, set[str]] = defaultdict(set)
    failed: dict[str, str] = {}
    every = {
        "torchvision": lambda: torchvision_models(quick),
        "hf": hf_models,
        "compressdrop": lambda: compressdrop_programs(tmp),
        "slim": lambda: slim_programs(tmp, quick),
        "train": train_mode,
        "nn": nn_layers,
    }
    sources = [source for group in groups for source in every[group]()]
    for name, run in sources:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i, data in enumerate(run()):
                    for suffix, found in _with_decomposed(data, _decomposes(name, i)):
                        if isinstance(found, str):  # torch failed to decompose it
                            failed[name + suffix] = found
                            continue
                        for t in found:
                            seen[t].add(name + suffix)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=1)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return seen, failed


# --- the programs the test suite writes: this file is also a pytest plugin ----------------------

_HARVEST = "PROBE_PROGRAM_OPS_TSV"  # where the plugin appends "test<TAB>target" lines


def pytest_configure(config: Any) -> None:
    """As a pytest plugin (``--tests``): record the targets of every program
    ``torch.export.save`` writes, by test."""
    out = os.environ.get(_HARVEST)
    if not out:
        return
    original = torch.export.save

    def save_and_record(program: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        original(program, f, *args, **kwargs)
        buf = io.BytesIO()
        original(program, buf)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(out, "a") as log:
            log.writelines(f"{test}\t{t}\n" for t in sorted(targets(buf.getvalue())))

    torch.export.save = save_and_record


def suite_targets(tsv: Path | None) -> dict[str, set[str]]:
    """``{target: {test file}}`` of the programs the test suite writes: read from ``tsv`` (an
    earlier run's), or from a run of the suite (two workers; as long as the suite takes)."""
    if tsv is None:
        tsv = Path(tempfile.mkdtemp()) / "targets.tsv"
        env = {**os.environ, _HARVEST: str(tsv), "PYTHONPATH": str(Path(__file__).parent)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "probe_program_ops", "-p", "no:logging"]
        subprocess.run([*cmd, "-n", "2", "--dist", "loadfile"], cwd=ROOT, env=env, check=False)
    seen: dict[str, set[str]] = defaultdict(set)
    for line in tsv.read_text().splitlines():
        test, _, target = line.partition("\t")
        seen[target].add("tests:" + test.split("::")[0].removeprefix("tests/"))
    return seen


def core_and_prims() -> tuple[set[str], set[str]]:
    """Every overload of the core ATen opset (``torch.Tag.core``), and of the prims, as
    ``aten.add.Tensor``: those a bare ``import torch`` registers (:func:`main` reads them before
    any export; ``run_decompositions`` imports torch._inductor, which registers prims of its
    own, such as ``_unsafe_index_put_`` and ``_low_memory_max_pool_offsets_to_indices``)."""
    core, prims = set(), set()
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = qualified.partition("::")
        if namespace not in ("aten", "prims"):
            continue
        name, _, overload = rest.partition(".")
        op = getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
        if namespace == "prims":
            prims.add(str(op))
        elif torch.Tag.core in op.tags:
            core.add(str(op))
    return core, prims


def allowlist(
    observed: set[str], core: set[str], prims: set[str]
) -> tuple[list[str], dict[str, str]]:
    """The allowlist (``aten.add.Tensor``, sorted) and what was left out of the candidates, why."""
    left_out: dict[str, str] = {}
    allowed = []
    for op in sorted(observed | core | prims):
        why = excluded(op)
        if why:
            left_out[op] = why
        else:
            allowed.append(op)
    return allowed, left_out


HEADER = '''"""The ATen and prims operators a ``.pt2`` program may call (:mod:`.safety` refuses others).

Written by ``benchmarks/probe_program_ops.py --write`` on torch {torch} (run it again to
regenerate; ``benchmarks/results/program_ops.json`` says which programs call each). The
candidates: the {observed} operators that ``torch.export`` programs call, before and after
``run_decompositions()``, of every torchvision classification model, of Hugging Face models from
small configs (BERT, RoBERTa, ELECTRA, DistilBERT, GPT-2, LLaMA, Qwen2, Mistral, Gemma 1 to 3,
OPT, T5's encoder, ViT), of one model a ``torch.nn`` layer, and of the programs compressdrop and
its test suite write (reference nets dense, gated with each gate family, slim, slim with their
noise kept; models pruned as a pickled one is, heads cut), with torch's core ATen opset ({core}
overloads tagged ``torch.Tag.core``) and the prims ({prims}). Left out ({excluded}): what
``safety._NO_OPS`` refuses (files, printing, sparse and unchecked calls), every gradient kernel
(``*_backward``: in no inference program, and fed the forward pass's indices and statistics by
the file), the batch-norm kernels that read running statistics shorter than the channels past
their end (``aten.batch_norm``, which ``torch.export`` writes, checks them), ``resize_`` and
``grid_sampler_2d`` (modes out of range taken silently), the FFT kernels (a negative dim
crashed them); the script says why for each, ``benchmarks/probe_op_bounds.py`` tries the kernels
with the indices, sizes and modes a crafted file can give, and ``benchmarks/fuzz_allowed_ops.py``
with arguments drawn from their schemas. Operators that real models need are kept though their
CPU kernels crash on arguments that disagree (``lstm.input`` with weights smaller than its
hidden state, ``scaled_dot_product_attention`` with keys shorter than its values, ``col2im``
with a padding of 2**32, an embedding bag of no bags): :mod:`._checked` checks them first.
"""

from __future__ import annotations

__all__: list[str] = []  # internal: safety.py uses ALLOWED

# {allowed} overloads as str(torch.ops.aten.add.Tensor) writes them, sorted; a node's target is
# "torch.ops." and one of these
_ATEN = """
{aten}
"""
_PRIMS = """
{prims_list}
"""

#: the operators a program read from a file may call
ALLOWED: frozenset[str] = frozenset(_ATEN.split() + _PRIMS.split())
'''


def write_ops_file(allowed: list[str], counts: dict[str, int]) -> None:
    def wrapped(ops: list[str]) -> str:
        return textwrap.fill(" ".join(ops), width=99, break_on_hyphens=False)

    OPS_FILE.write_text(
        HEADER.format(
            torch=torch.__version__.split("+")[0],
            aten=wrapped([o for o in allowed if o.startswith("aten.")]),
            prims_list=wrapped([o for o in allowed if o.startswith("prims.")]),
            **counts,
        )
    )


def _some(sources: list[str], most: int = 6) -> list[str]:
    """The first ``most`` sources of an operator and how many more (a result file to read)."""
    more = [s for s in sources if not s.startswith("+")]
    extra = sum(int(s.split()[0][1:]) for s in sources if s.startswith("+"))
    extra += max(0, len(more) - most)
    return more[:most] + ([f"+{extra} more"] if extra else [])


GROUPS = ["torchvision", "hf", "compressdrop", "slim", "train", "nn"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one torchvision model a family")
    ap.add_argument("--write", action="store_true", help=f"write {OPS_FILE.relative_to(ROOT)}")
    ap.add_argument("--out", default="program_ops", help="the result's name in results/")
    ap.add_argument("--observed", type=Path, help="start from this earlier result's operators")
    ap.add_argument(
        "--sources",
        default=None,
        help=f"the groups to export, of {','.join(GROUPS)} (default: all; with --observed: none)",
    )
    ap.add_argument("--tests", action="store_true", help="run the test suite too (its programs)")
    ap.add_argument("--tests-tsv", type=Path, help="the test suite's programs, from a run's TSV")
    args = ap.parse_args()
    core, prims = core_and_prims()  # before any export (see its docstring)
    groups = args.sources.split(",") if args.sources else ([] if args.observed else GROUPS)
    observed: dict[str, set[str]] = defaultdict(set)
    failed: dict[str, str] = {}
    ran: set[str] = set()
    if args.observed:
        earlier = json.loads(args.observed.read_text())
        for t, sources in earlier["observed"].items():
            observed[t].update(sources)
        failed.update(earlier["failed"])
        ran.update(earlier["sources"])
    with tempfile.TemporaryDirectory() as tmp:
        seen, newly_failed = observe(groups, args.quick, Path(tmp))
    failed.update(newly_failed)
    tests = suite_targets(args.tests_tsv) if args.tests or args.tests_tsv else {}
    for t, sources in [*seen.items(), *tests.items()]:
        observed[t].update(sources)
        ran.update(s.removesuffix("+decomposed") for s in sources)
    ops = {t.removeprefix("torch.ops.") for t in observed if t.startswith("torch.ops.")}
    ops = {o for o in ops if o.startswith(("aten.", "prims."))}
    other = sorted(t for t in observed if not t.startswith(("torch.ops.aten.", "torch.ops.prims.")))
    allowed, left_out = allowlist(ops, core, prims)
    counts = {"observed": len(ops), "core": len(core), "prims": len(prims)}
    counts.update(excluded=len(left_out), allowed=len(allowed))
    if groups or tests:
        shown = {t: _some(sorted(observed[t])) for t in sorted(observed)}
        payload = {"sources": sorted(ran), "observed": shown, "other_targets": other}
        path = save(args.out, {**payload, "failed": failed, "counts": counts, "left_out": left_out})
        print(f"wrote {path}")
    print(json.dumps({"counts": counts, "failed": failed}, indent=1))
    print(f"observed, not in the core opset: {' '.join(sorted(ops - core))}")
    print(f"left out: {json.dumps(left_out, indent=1)}")
    if args.write:
        write_ops_file(allowed, counts)
        print(f"wrote {OPS_FILE}")


if __name__ == "__main__":
    main()
