"""Fuzz: every operator a ``.pt2`` program may call (``compressdrop/programs/_ops.py``) with
argument sets built from its schema, on the CPU kernels, in a subprocess that a crash cannot take
the probe down with.

Each argument is drawn by its type (and name): tensors of small shapes whose dimensions often
disagree (zero-size, 0-d, one dimension more or less), of odd dtypes (integers, bool, float64,
bfloat16), non-contiguous (transposed, strided, expanded to stride 0, channels-last); integers
at their edges (negative, past the rank, 2**31, 2**62); size lists with negatives or huge values;
index-like tensors (``index``, ``target``, ``offsets``, ...) out of range or negative; strings and
modes in and out of range. An operator's calls that ran become the seeds of the next ones, each a
small change of one (one dimension, dtype or layout of one tensor, one integer or list, an index
past the end), and the calls that real programs make (torchvision and ``torch.nn`` models
exported, then decomposed: ``--seeds``) start each operator's pool.

Every tensor is a view into a larger buffer whose elements around it are "poisoned"; each call
runs twice, with two poisons: outputs that differ read outside their inputs (``oob-read``), a
poison changed was written over (``oob-write``). The fake-tensor kernel runs first on the same
arguments (``fake`` says whether it took them: a graph measured at load,
``programs/_measure.py``, runs its operators so), and an output of another shape than the fake
kernel's is noted (``fake-shape``). A worker prints each case before it runs it; a crash
(signal) or a case past ``--timeout`` (hang) is charged to it and the worker starts again after
it. Workers run one at a time under ``nice``, with ``RLIMIT_AS`` (``--memory``).

Run: python benchmarks/fuzz_allowed_ops.py [--cases N] [--ops REGEX] [--out FILE]
(47 minutes at 300 cases an operator on two busy cores; writes the findings to
benchmarks/results/fuzz_allowed_ops.jsonl and each operator's counts beside it, .summary.json);
--seeds first harvests the real programs' calls (fuzz_seeds.json); --report prints the table
kept in benchmarks/results/fuzz_allowed_ops.md
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import queue
import random
import re
import resource
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = RESULTS / "fuzz_seeds.json"
PAD = 2048  # poisoned elements on each side of every tensor

# ---------------------------------------------------------------------------------------------
# argument specs: plain data (JSON), turned into tensors by _make in the worker

_DIMS = [2, 3, 4, 1, 2, 3, 0, 5, 8]
_DTYPES = ["float32"] * 8 + ["float64", "bfloat16", "float16", "int64", "int32", "int8"]
_DTYPES += ["uint8", "bool", "complex64"]
_LAYOUTS = ["contig"] * 5 + ["transposed", "strided", "expanded", "channels_last", "offset"]
_INTS = [0, 1, 2, -1, -2, 3, 4, 7, 64, -100, 2**31 - 1, 2**31, 2**62, -(2**63), 2**63 - 1]
_FLOATS = [0.0, 1.0, -1.0, 0.5, 2.0, 3.0, -0.5, 1e30, -1e308, 1e-40, "nan", "inf", "-inf"]
_BIG_INDEX = [-1, -5, 9, 1000, -(10**6), 10**6, 2**31, 2**40, -(2**40), 2**62]
_STRS = {
    "reduce": ["sum", "prod", "mean", "amax", "amin", "x"],
    "approximate": ["none", "tanh", "x"],
    "rounding_mode": [None, "trunc", "floor", "x"],
    "mode": ["constant", "reflect", "replicate", "circular", "x"],
    "equation": ["ij,jk->ik", "i,i->", "bij,bjk->bik", "...ij->...ji", "ii->i", "i->ii", "ab"],
}
_INDEX_NAMES = re.compile(r"index|indices|target|offsets|sorter|weights_per|perm")


def _shape(rng: random.Random, rank: int | None = None) -> list[int]:
    rank = rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5]) if rank is None else rank
    return [rng.choice(_DIMS) for _ in range(rank)]


def tensor(rng: random.Random, index: bool = False, shape: list[int] | None = None) -> dict:
    """A tensor spec: shape, dtype, layout and what its values are."""
    if index:
        return {
            "T": shape if shape is not None else _shape(rng, rng.choice([0, 1, 1, 2])),
            "dtype": rng.choice(["int64"] * 4 + ["int32", "float32", "bool"]),
            "layout": rng.choice(_LAYOUTS),
            "vals": rng.choice(["small"] * 3 + [rng.choice(_BIG_INDEX)]),
        }
    return {
        "T": shape if shape is not None else _shape(rng),
        "dtype": rng.choice(_DTYPES),
        "layout": rng.choice(_LAYOUTS),
        "vals": rng.choice(["randn"] * 4 + ["zeros", "small", "huge"]),
    }


def _one(arg: Any, rng: random.Random) -> Any:
    """A value for a schema argument ``arg`` (``torch._C.Argument``)."""
    t, name = str(arg.real_type), arg.name
    if t.startswith("Optional["):
        if rng.random() < 0.3:
            return None
        t = t[len("Optional[") : -1]
    if t == "Tensor":
        return tensor(rng, index=bool(_INDEX_NAMES.search(name)))
    if t == "List[Tensor]":
        shape = _shape(rng)
        return {
            "TL": [
                tensor(rng, shape=shape if rng.random() < 0.6 else None)
                for _ in range(rng.choice([0, 1, 2, 2, 3]))
            ]
        }
    if t == "List[Optional[Tensor]]":
        return {
            "TL": [
                None if rng.random() < 0.3 else tensor(rng, index=True)
                for _ in range(rng.choice([1, 1, 2, 3]))
            ]
        }
    if t in ("int", "SymInt"):
        if "dim" in name:
            return rng.choice([0, 1, -1, 2, 3, -2, -5, 9, 2**31, -(2**62)])
        return rng.choice(_INTS + [rng.choice(_DIMS) for _ in range(6)])
    if t.startswith("List[int]") or t.startswith("List[SymInt]"):
        pool = _DIMS * 2 + _INTS if rng.random() < 0.7 else _INTS
        return [rng.choice(pool) for _ in range(rng.choice([0, 1, 2, 2, 3, 4, 5]))]
    if t == "List[float]":
        return [_float(rng) for _ in range(rng.choice([0, 1, 2, 3]))]
    if t == "float":
        return _float(rng)
    if t == "number":
        return rng.choice([_float(rng), rng.choice(_INTS), True])
    if t == "bool":
        return rng.random() < 0.5
    if t == "str":
        return rng.choice(_STRS.get(name, ["x"]))
    if t in ("ScalarType", "Layout", "MemoryFormat") and rng.random() < 0.2:
        return rng.choice([-1, -100, 7, 100, 2**31])  # a number where the enum belongs
    if t == "ScalarType":
        return {"dtype": rng.choice(_DTYPES)}
    if t == "Layout":
        return {"layout": "strided"}
    if t == "MemoryFormat":
        return {
            "memory_format": rng.choice(
                ["contiguous_format", "channels_last", "preserve_format", "channels_last_3d"]
            )
        }
    if t == "Device":
        return {"device": "cpu"}
    if t == "Generator":
        return None
    return {"unknown": t}


def _float(rng: random.Random) -> Any:
    return rng.choice(_FLOATS + [round(rng.uniform(-3, 3), 2) for _ in range(6)])


def _default(arg: Any) -> Any:
    """The schema default as a spec (a dtype, memory format or device as the markers above)."""
    v = arg.default_value
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return list(v)
    return "<no default>"


def fresh(schema: Any, rng: random.Random) -> list[Any]:
    out = []
    for a in schema.arguments:
        d = _default(a) if a.has_default_value() else "<no default>"
        out.append(d if d != "<no default>" and rng.random() < 0.35 else _one(a, rng))
    return out


def mutate(schema: Any, args: list[Any], rng: random.Random) -> list[Any]:
    """One or two small changes to a call that ran."""
    args = json.loads(json.dumps(args))
    for _ in range(rng.choice([1, 1, 1, 2])):
        i = rng.randrange(len(args)) if args else 0
        if not args:
            break
        a, arg = args[i], schema.arguments[i]
        tensors = _tensors_in(a)
        if tensors and rng.random() < 0.85:
            _mutate_tensor(rng.choice(tensors), rng, bool(_INDEX_NAMES.search(arg.name)))
        elif isinstance(a, list) and a and rng.random() < 0.6:
            j = rng.randrange(len(a))
            choice = rng.random()
            if choice < 0.4:
                a[j] = rng.choice(_INTS) if isinstance(a[j], int) else _float(rng)
            elif choice < 0.6:
                a[j] = a[j] + rng.choice([-1, 1]) if isinstance(a[j], (int, float)) else a[j]
            elif choice < 0.8:
                a.append(a[j])
            else:
                a.pop(j)
        elif isinstance(a, int) and not isinstance(a, bool) and rng.random() < 0.5:
            args[i] = (
                a + rng.choice([-1, 1, -2, 2, 100]) if rng.random() < 0.5 else rng.choice(_INTS)
            )
        else:
            args[i] = _one(arg, rng)
    return args


def _tensors_in(a: Any) -> list[dict]:
    if isinstance(a, dict) and "T" in a:
        return [a]
    if isinstance(a, dict) and "TL" in a:
        return [t for t in a["TL"] if t is not None]
    return []


def _mutate_tensor(t: dict, rng: random.Random, index: bool) -> None:
    r = rng.random()
    if r < 0.35 and t["T"]:  # one dimension changed
        j = rng.randrange(len(t["T"]))
        t["T"][j] = rng.choice([0, 1, max(t["T"][j] - 1, 0), t["T"][j] + 1, t["T"][j] * 2, 7])
    elif r < 0.45:  # a dimension more or fewer
        if t["T"] and rng.random() < 0.5:
            t["T"].pop(rng.randrange(len(t["T"])))
        else:
            t["T"].insert(rng.randrange(len(t["T"]) + 1), rng.choice([1, 2, 3]))
    elif r < 0.6:
        t["dtype"] = rng.choice(_DTYPES)
    elif r < 0.75:
        t["layout"] = rng.choice(_LAYOUTS)
    else:
        t["vals"] = (
            rng.choice(_BIG_INDEX)
            if index or rng.random() < 0.5
            else rng.choice(["zeros", "huge", "small", "randn"])
        )


# ---------------------------------------------------------------------------------------------
# the worker: builds each case's tensors, runs fake, real with poison A, real with poison B


def _make(spec: Any, poison: int, torch: Any) -> Any:
    """The value a spec stands for; tensors as views into a buffer poisoned with ``poison``."""
    if isinstance(spec, list):
        return [_make(s, poison, torch) for s in spec]
    if not isinstance(spec, dict):
        if spec in ("nan", "inf", "-inf"):
            return float(spec)
        return spec
    if "TL" in spec:
        return [_make(s, poison, torch) for s in spec["TL"]]
    if "dtype" in spec and "T" not in spec:
        return getattr(torch, spec["dtype"])
    if "memory_format" in spec:
        return getattr(torch, spec["memory_format"])
    if "layout" in spec and "T" not in spec:
        return torch.strided
    if "device" in spec:
        return torch.device(spec["device"])
    if "T" not in spec:
        raise ValueError(f"unknown spec {spec}")
    shape, layout = list(spec["T"]), spec["layout"]
    dtype = getattr(torch, spec["dtype"])
    base = list(shape)
    if layout == "transposed" and len(shape) >= 2:
        base[-1], base[-2] = base[-2], base[-1]
    elif layout == "strided" and shape:
        base[-1] = base[-1] * 2
    elif layout == "expanded" and shape:
        base[0] = 1
    elif layout == "channels_last" and len(shape) == 4:
        base = [shape[0], shape[2], shape[3], shape[1]]
    n = math.prod(base)
    if n > 1 << 22:
        raise MemoryError("spec too large")
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps(spec, sort_keys=True).encode()))
    vals = spec["vals"]
    if vals == "randn":
        v = torch.randn(n, generator=g, dtype=torch.float64)
    elif vals == "zeros":
        v = torch.zeros(n, dtype=torch.float64)
    elif vals == "huge":
        v = torch.randn(n, generator=g, dtype=torch.float64) * 1e30
    elif vals == "small":
        hi = max(min([d for d in shape if d > 0] or [1]), 1)
        v = torch.randint(0, hi, (n,), generator=g).to(torch.float64)
    else:  # an index value: one element set to it, the rest small
        v = torch.zeros(n, dtype=torch.float64)
        if n:
            v[torch.randint(0, n, (1,), generator=g)] = float(vals)
    buf = torch.full((PAD + n + PAD + 1,), poison, dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        buf = torch.full((PAD + n + PAD + 1,), complex(poison, -poison), dtype=dtype)
    off = PAD + (1 if layout == "offset" else 0)
    if vals not in ("randn", "zeros", "huge", "small"):
        region = torch.tensor(v.tolist(), dtype=torch.float64).to(torch.int64).to(dtype)
    else:
        region = v.to(dtype)
    buf[off : off + n] = region
    x = buf[off : off + n].view(base)
    if layout == "transposed" and len(shape) >= 2:
        x = x.transpose(-1, -2)
    elif layout == "strided" and shape:
        x = x[..., ::2]
    elif layout == "expanded" and shape:
        x = x.expand(shape)
    elif layout == "channels_last" and len(shape) == 4:
        x = x.permute(0, 3, 1, 2)
    return x


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _leaves(x)]
    return [out]


def _same(a: Any, b: Any, torch: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point or a.dtype.is_complex:
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def _copy(x: Any, torch: Any) -> Any:
    """An output as it is now (an in-place operator's is its input, changed by the next run)."""
    if isinstance(x, torch.Tensor) and all(d >= 0 for d in x.shape):
        return x.clone()
    return x


def _buffers(args: Any, torch: Any) -> list[Any]:
    return [
        x for x in _leaves(args) if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes()
    ]


_UNINIT = re.compile(r"::(empty|new_empty|empty_like|empty_strided|empty_permuted)")


def worker() -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    sys.path.insert(0, str(ROOT))
    from compressdrop.programs._checked import CHECKED

    torch.set_num_threads(1)
    pools: dict[str, list] = collections.defaultdict(list)
    seeds = json.loads(SEEDS.read_text()) if SEEDS.exists() else {}
    for line in sys.stdin:
        job = json.loads(line)
        name, start, count = job["op"], job["start"], job["count"]
        ns, op, ov = name.split(".")
        fn = getattr(getattr(getattr(torch.ops, ns), op), ov)
        schema = fn._schema
        pool = pools[name]
        if not pool:
            pool.extend(seeds.get(name, []))
        for i in range(start, count):
            rng = random.Random(f"{name}:{i}")
            if i < len(seeds.get(name, [])):
                args = seeds[name][i]
            elif pool and rng.random() < 0.6:
                args = mutate(schema, rng.choice(pool), rng)
            else:
                args = fresh(schema, rng)
            print(json.dumps({"s": i, "args": args}), flush=True)
            res = _case(CHECKED.get(fn, fn), schema, args, torch, FakeTensorMode)
            if res["real"] == "ok" and len(pool) < 200:
                pool.append(args)
            print(json.dumps({"r": i, **res}), flush=True)
        print(json.dumps({"done": name}), flush=True)


def _split(schema: Any, vals: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    pos, kw = [], {}
    for a, v in zip(schema.arguments, vals):
        if a.kwarg_only:
            kw[a.name] = v
        else:
            pos.append(v)
    return pos, kw


def _case(fn: Any, schema: Any, args: list[Any], torch: Any, fake_mode: Any) -> dict:
    res: dict[str, Any] = {}
    try:
        real_a = _make(args, 7777, torch)
        real_b = _make(args, -3333, torch)
    except Exception as e:
        return {"real": "bad-spec", "why": f"{type(e).__name__}: {e}"[:200], "fake": "-"}
    mode = fake_mode(allow_non_fake_inputs=False)
    fake_shapes = None
    try:
        fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in _flat1(real_a)]
        with mode:
            out = fn(
                *_split(schema, _unflat1(real_a, fakes))[0],
                **_split(schema, _unflat1(real_a, fakes))[1],
            )
        fake_shapes = [
            tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in _leaves(out)
        ]
        res["fake"] = "ok"
    except Exception as e:
        res["fake"] = type(e).__name__
    bufs = _buffers(real_a, torch)
    before = [_outside(x, torch) for x in bufs]
    outs = []
    for real in (real_a, real_b, _make(args, 7777, torch)):
        try:
            torch.manual_seed(0)
            pos, kw = _split(schema, real)
            outs.append([_copy(x, torch) for x in _leaves(fn(*pos, **kw))])
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            res.update(real="raise", why=f"{type(e).__name__}: {msg}"[:160])
            return res
        if real is real_a and len(outs) == 1:
            changed = [
                i
                for i, (x, y) in enumerate(zip(before, bufs))
                if not _same(x, _outside(y, torch), torch)
            ]
            if changed:
                res.update(real="oob-write", why=f"poison of tensor {changed} changed")
                return res
    res["real"] = "ok"
    if not _UNINIT.search(str(schema.name)):
        a, b, a2 = outs
        det = len(a) == len(a2) and all(_same(x, y, torch) for x, y in zip(a, a2))
        if det and not (len(a) == len(b) and all(_same(x, y, torch) for x, y in zip(a, b))):
            res.update(real="oob-read", why="outputs differ with the poison around the inputs")
    if fake_shapes is not None:
        got = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in outs[0]]
        if got != fake_shapes and res["real"] == "ok":
            res.update(real="fake-shape", why=f"real {got} fake {fake_shapes}"[:160])
    return res


def _outside(x: Any, torch: Any) -> Any:
    """The poisoned elements of ``x``'s storage: all but those its view covers."""
    n = x.untyped_storage().nbytes() // x.element_size()
    flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, (n,))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    idx = torch.as_strided(torch.arange(flat.numel()), x.shape, x.stride(), x.storage_offset())
    keep[idx.reshape(-1)] = False
    return flat[keep].clone()


def _flat1(vals: list[Any]) -> list[Any]:
    return [y for v in vals for y in (v if isinstance(v, list) else [v])]


def _unflat1(shape: list[Any], flat: list[Any]) -> list[Any]:
    out, k = [], 0
    for v in shape:
        if isinstance(v, list):
            out.append(flat[k : k + len(v)])
            k += len(v)
        else:
            out.append(flat[k])
            k += 1
    return out


# ---------------------------------------------------------------------------------------------
# seeds: the calls real programs make, as specs


def _seed_models() -> list[tuple[str, Any, tuple]]:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from tests.torchvision_models import import_torchvision

    torchvision = import_torchvision()

    class Layers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c3 = nn.Conv1d(3, 4, 3, padding=1), nn.Conv3d(3, 4, 3, padding=1)
            self.t1, self.t2 = nn.ConvTranspose1d(4, 3, 2, 2), nn.ConvTranspose2d(3, 4, 3, 2, 1, 1)
            self.t3 = nn.ConvTranspose3d(4, 2, 2, 2)
            self.gn, self.inorm = nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)
            self.ln, self.prelu = nn.LayerNorm(8), nn.PReLU(4)
            self.emb, self.bag = nn.Embedding(10, 8), nn.EmbeddingBag(10, 8, mode="mean")
            self.bil = nn.Bilinear(8, 8, 3)
            self.rms = nn.RMSNorm(8)

        def forward(self, x: torch.Tensor) -> Any:  # x: (2, 3, 8, 8)
            f = nn.functional
            a = self.c1(x.flatten(2)[..., :8])
            a = self.t1(a)
            b = self.c3(x.unsqueeze(2).expand(-1, -1, 4, -1, -1))
            b = self.t3(b)
            c = self.prelu(self.inorm(self.gn(self.t2(x))))
            p1, i1 = f.max_pool2d(c, 2, return_indices=True)
            p2 = f.avg_pool1d(a, 2) + f.max_pool1d(a, 2) + f.adaptive_max_pool1d(a, 8)
            p3 = f.avg_pool3d(b, 2) + f.max_pool3d(b, 2)
            up = [f.interpolate(c, scale_factor=2, mode=m) for m in ("nearest", "bilinear")]
            up.append(f.interpolate(c, size=(9, 7), mode="bicubic", align_corners=True))
            pads = [f.pad(x, (1, 2, 1, 2), mode=m) for m in ("reflect", "replicate", "circular")]
            pads.append(f.pad(b, (1, 1, 1, 1, 1, 1), mode="replicate"))
            pads.append(f.pad(b, (1, 1, 1, 1, 1, 1), mode="reflect"))
            pads.append(f.pad(a, (1, 1), mode="reflect"))
            ps = f.pixel_unshuffle(f.pixel_shuffle(c, 2), 2)
            ids = (x[:, 0, 0].abs() * 3).long().clamp(0, 9)
            e = self.ln(self.emb(ids)) + self.bag(ids.flatten(), torch.tensor([0, 3]))[:1]
            e = (self.rms(e) + self.bil(e, e).sum(-1, keepdim=True)).mean(0)
            ids = ids[0]
            d = torch.cdist(e, e) + f.pairwise_distance(e, e).unsqueeze(-1)
            d = d + f.cosine_similarity(e, e).unsqueeze(-1)
            u = f.unfold(x, 3)
            fo = f.fold(u, (8, 8), 3)
            st = torch.sort(e, -1)[0] + torch.topk(e, 2)[0].sum() + torch.cumsum(e, 0)
            g = torch.gather(e, 1, ids[:, None].clamp(max=7))
            sc = e.scatter_add(1, ids[:, None].clamp(max=7), g)
            ix = e[ids.clamp(max=1)] + e.index_select(0, ids.clamp(max=1))
            ff = torch.fft.rfft(e).abs().sum() + torch.fft.irfft(torch.fft.rfft(e), 8).sum()
            return (
                a,
                p1,
                i1,
                p2,
                p3,
                *up,
                *pads,
                ps,
                d,
                fo,
                st,
                sc,
                ix,
                ff,
                f.glu(e),
                torch.roll(e, 1, 0),
                torch.flip(e, (1,)),
                e.tril(),
                e.triu(1),
                f.gelu(e, approximate="tanh"),
                f.softplus(e),
                f.elu(e),
                f.selu(e),
                f.hardswish(e),
                f.mish(e),
                e.diff(dim=1),
                torch.einsum("ij,kj->ik", e, e),
                e.var(1),
                e.std(1),
                e.norm(dim=1),
                e.amax(1),
                e.argmax(1),
                e.prod(1),
            )

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, 2, batch_first=True, bidirectional=True)
            self.gru, self.rnn = nn.GRU(12, 5, batch_first=True), nn.RNN(5, 3, batch_first=True)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> Any:  # x: (2, 5, 4)
            h = self.rnn(self.gru(self.lstm(x)[0])[0])[0]
            t = self.enc(torch.cat([x, x], -1))
            m = self.mha(t, t, t, need_weights=False)[0]
            q = t.unflatten(-1, (2, 4)).transpose(1, 2)
            sd = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            return h, m, sd

    tv = torchvision.models
    return [
        ("layers", Layers(), (torch.randn(2, 3, 8, 8),)),
        ("seq", Seq(), (torch.randn(2, 5, 4),)),
        ("resnet18", tv.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),)),
        ("mobilenet_v3_small", tv.mobilenet_v3_small(num_classes=10), (torch.randn(1, 3, 32, 32),)),
        ("swin_t", tv.swin_t(num_classes=10), (torch.randn(1, 3, 64, 64),)),
    ]


def _spec_of(v: Any, torch: Any) -> Any:
    from torch import fx

    if isinstance(v, fx.Node):
        val = v.meta.get("val")
        if isinstance(val, torch.Tensor):
            ints = not (val.dtype.is_floating_point or val.dtype.is_complex)
            return {
                "T": [int(d) for d in val.shape],
                "dtype": str(val.dtype)[6:],
                "layout": "contig",
                "vals": "small" if ints else "randn",
            }
        if isinstance(val, (int, float, bool)):
            return val
        raise ValueError("unknown node value")
    if isinstance(v, (list, tuple)):
        items = [_spec_of(x, torch) for x in v]
        if any(isinstance(x, dict) and "T" in x for x in items):
            return {"TL": items}
        return items
    if isinstance(v, torch.dtype):
        return {"dtype": str(v)[6:]}
    if isinstance(v, torch.device):
        return {"device": "cpu"}
    if isinstance(v, torch.layout):
        return {"layout": "strided"}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v)[6:]}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (int, float, bool, str)):
        return v
    raise ValueError(f"unknown argument {type(v)}")


def harvest() -> dict[str, list]:
    """The calls of allowed operators that real programs make (exported, then decomposed),
    as argument specs: at most 6 distinct per operator, of at most 300,000 elements."""
    import torch

    sys.path.insert(0, str(ROOT))
    from compressdrop.programs._ops import ALLOWED

    seeds: dict[str, list] = collections.defaultdict(list)
    for name, model, x in _seed_models():
        ep = torch.export.export(model.eval(), x)
        for prog in (ep, ep.run_decompositions()):
            for node in prog.graph.nodes:
                op = str(node.target)
                if node.op != "call_function" or op not in ALLOWED:
                    continue
                schema = node.target._schema
                vals = []
                try:
                    for i, a in enumerate(schema.arguments):
                        if i < len(node.args):
                            vals.append(_spec_of(node.args[i], torch))
                        elif a.name in node.kwargs:
                            vals.append(_spec_of(node.kwargs[a.name], torch))
                        else:
                            vals.append(_spec_of(a.default_value, torch))
                except ValueError:
                    continue
                size = sum(math.prod(t["T"]) for v in vals for t in _tensors_in(v))
                if size <= 300_000 and vals not in seeds[op] and len(seeds[op]) < 6:
                    seeds[op].append(vals)
        print(f"seeds: {name}: {len(seeds)} operators", flush=True)
    return dict(seeds)


# ---------------------------------------------------------------------------------------------
# the parent: one worker at a time, restarted after each crash or hang


def _limits(memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.nice(10)


def _pump(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


class Runner:
    def __init__(self, memory: int, timeout: float, log: Path) -> None:
        self.memory, self.timeout = memory, timeout
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.log = log.open("a")
        self.err = open(os.devnull, "w")  # noqa: SIM115 (kept open with the runner)

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
            preexec_fn=lambda: _limits(self.memory),
        )

    def run_op(self, op: str, count: int) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        start = 0
        while start < count:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
                self.lines = queue.Queue()
                threading.Thread(
                    target=_pump, args=(self.proc.stdout, self.lines), daemon=True
                ).start()
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(json.dumps({"op": op, "start": start, "count": count}) + "\n")
            self.proc.stdin.flush()
            started, args = None, None
            while True:
                try:  # a worker's start (torch's import) may take longer on a busy machine
                    line = self.lines.get(timeout=self.timeout if started is not None else 120)
                except queue.Empty:  # a hang: the case that started and never ended
                    self.proc.kill()
                    self.proc.wait()
                    self._record(op, started, args, "hang", f"no result in {self.timeout}s")
                    counts["hang"] += 1
                    start = (started if started is not None else start) + 1
                    self.proc = None
                    break
                if not line:  # the worker died in the case that started
                    rc = self.proc.wait()
                    why = f"signal {-rc}" if rc < 0 else f"exit {rc}"
                    self._record(op, started, args, "crash", why)
                    counts["crash"] += 1
                    start = (started if started is not None else start) + 1
                    self.proc = None
                    break
                msg = json.loads(line)
                if "s" in msg:
                    started, args = msg["s"], msg["args"]
                elif "r" in msg:
                    counts[msg["real"]] += 1
                    counts[f"fake-{msg['fake']}" if msg["fake"] == "ok" else "fake-raise"] += 1
                    if msg["real"] not in ("ok", "raise", "bad-spec"):
                        self._record(
                            op, msg["r"], args, msg["real"], msg.get("why", ""), msg["fake"]
                        )
                elif "done" in msg:
                    start = count
                    break
        return counts

    def _record(self, op: str, i: Any, args: Any, kind: str, why: str, fake: str = "?") -> None:
        self.log.write(
            json.dumps({"op": op, "case": i, "kind": kind, "why": why, "fake": fake, "args": args})
            + "\n"
        )
        self.log.flush()


_BAD = ("crash", "hang", "oob-read", "oob-write", "fake-shape")


def report(out: Path) -> str:
    """The results table: per operator with a finding, its cases and what each finding was (the
    first argument set of each kind), then the totals."""
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    found: dict[str, dict[str, list]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        found[rec["op"]][rec["kind"]].append(rec)
    rows = [
        "| operator | ok | raised | findings | first case (arguments, why) |",
        "|---|---|---|---|---|",
    ]
    totals: collections.Counter = collections.Counter()
    for op, counts in sorted(summary.items()):
        totals.update({k: v for k, v in counts.items() if not k.startswith("fake-")})
        kinds = {k: counts[k] for k in _BAD if counts.get(k)}
        if not kinds:
            continue
        first = next((found[op][k][0] for k in _BAD if found[op].get(k)), None)
        shown = "" if first is None else f"`{json.dumps(first['args'])[:160]}` {first['why'][:60]}"
        kinds_s = ", ".join(f"{k} {v}" for k, v in kinds.items())
        rows.append(
            f"| {op} | {counts.get('ok', 0)} | {counts.get('raise', 0)} | {kinds_s} | {shown} |"
        )
    head = f"{len(summary)} operators, {sum(totals.values()):,} cases: " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(totals.items())
    )
    return head + "\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--seeds", action="store_true", help="harvest seeds from real programs")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--ops", default="")
    ap.add_argument("--memory", type=int, default=2 << 30)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--out", default=str(RESULTS / "fuzz_allowed_ops.jsonl"))
    ap.add_argument("--report", action="store_true", help="print the table of an earlier run")
    a = ap.parse_args()
    if a.report:
        print(report(Path(a.out)))
        return
    if a.worker:
        worker()
        return
    if a.seeds:
        SEEDS.write_text(json.dumps(harvest(), indent=0))
        return
    sys.path.insert(0, str(ROOT))
    from compressdrop.programs._ops import ALLOWED

    ops = sorted(op for op in ALLOWED if re.search(a.ops, op))
    out = Path(a.out)
    runner = Runner(a.memory, a.timeout, out)
    summary = {}
    t0 = time.time()
    for k, op in enumerate(ops):
        counts = runner.run_op(op, a.cases)
        summary[op] = dict(counts)
        bad = {
            k2: v
            for k2, v in counts.items()
            if k2 in ("crash", "hang", "oob-read", "oob-write", "fake-shape")
        }
        print(
            f"[{k + 1}/{len(ops)} {time.time() - t0:.0f}s] {op}: ok {counts['ok']} "
            f"raise {counts['raise']} {bad or ''}",
            flush=True,
        )
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
