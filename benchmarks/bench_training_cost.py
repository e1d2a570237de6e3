"""Benchmark 3: a gated training step against a plain one, per gate family, eager and compiled.

Run: .venv/bin/python benchmarks/bench_training_cost.py [--nets lenet5,lenet300,resnet18,encoder,vit]
     [--batches 64,256] [--modes eager,compiled] [--pairs 30] [--families ...] [--device cpu]
     [--ablate-bank | --ablate-defer | --ablate-handoff | --ablate-fuse | --ablate-bn]
     [--noise batch] [--saved]

A step is forward, cross-entropy (+ KL/N for the gated net), backward and an Adam update. The
plain and the gated net take turns on the same batch in one process (ABAB…, ``--pairs`` timed
pairs after warm-up), so a change of load on a shared machine hits both alike; the table gives
the median of the per-pair ratios gated/plain and its spread (the 10th and 90th percentiles).
"Compiled" wraps forward + loss (+ KL) in ``torch.compile(fullgraph=True)``; backward runs the
compiled backward graph, the optimizer step stays eager. Peak memory of one step: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the parameters and Adam state plus the peak of the
live bytes that ``torch.profiler`` (``profile_memory=True``, op by op) records over the step
(activations, gradients, temporaries). Targets (issue 17): ratio ≤ 1.10 (≤ 1.25 on
LeNet-300-100), memory ≤ 1.1×. ``--ablate-bank`` times a third net in the same rotation, the gated
one with ``compressdrop/gates/bank.py`` off (every gate's terms and KL computed on its own), and
adds its median ratio to plain as "per-gate ratio". ``--ablate-defer`` does the same with the
deferral of ``compressdrop/gates/_defer.py`` off (each gated convolution multiplies at its output,
not after the pool that follows it): "undeferred ratio". ``--ablate-handoff`` with every hand-off
off (``compressdrop.gates.hand_overs_off``: each gate keeps its input and multiplies out of place,
no ReLU, GELU or pool takes over): "kept-input ratio". ``--ablate-fuse`` with the head gates and
their output projections computed apart (``compressdrop/gates/_proj.py`` off): "unfused-heads
ratio". ``--ablate-bn`` with each BatchNorm and the gate after it computed apart
(``compressdrop/gates/_bn.py`` off): "unfused-batchnorm ratio". ``--saved`` gives the MB kept
for backward instead of times, gated/plain; with an ablation, also inside its switch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import compressdrop as cd
from compressdrop.gates import GATES, _bn, _defer, _proj, bank, hand_overs_off
from compressdrop.gates._mul import kept_tensors
from compressdrop.models import build_model

from common import markdown_table, save

N_TRAIN = 60_000
GATE_KWARGS: dict = {}  # --noise batch: {"noise": "batch"}


class Encoder(nn.Module):
    """A small transformer encoder classifier: 2 layers, d_model 128, 4 heads, 16 tokens."""

    def __init__(self, d: int = 128, tokens: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.pos = nn.Parameter(torch.zeros(tokens, d))
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=4 * d, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))  # x: (B, 16, 48)


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict]] = {
    "lenet5": (lambda: build_model("lenet5"), (1, 28, 28), {}),
    "lenet300": (lambda: build_model("lenet300"), (1, 28, 28), {}),
    # ResNet-18's widths and depth on 3×32×32 images
    "resnet18": (
        lambda: build_model(
            "resnet", input_shape=(3, 32, 32), widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)
        ),
        (3, 32, 32),
        {},
    ),
    "encoder": (Encoder, (16, 48), {"granularity": "neuron"}),  # the MLP neurons are gated
    # the tiny ViT of benchmark 1 (4 layers, width 64, 4 heads): heads and MLP neurons gated
    "vit": (lambda: build_model("vit", input_shape=(1, 28, 28)), (1, 28, 28), {}),
}


def peak_bytes(step: Callable[[], None], resident: list[torch.Tensor], device: torch.device) -> int:
    """Peak tensor bytes over one call of ``step``: ``resident`` (parameters, Adam state) plus the
    peak of what the step allocates (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # each op's own allocations minus its own frees, and the frees between ops ("[memory]"),
    # in time order: the live bytes after every op
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak + sum(t.numel() * t.element_size() for t in resident)


def loss_of(model: nn.Module, family: str | None, mode: str) -> Callable:
    """The step's loss: cross-entropy (+ KL/N when gated), compiled with fullgraph=True or not."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss + cd.kl(model) / N_TRAIN if family is not None else loss

    return torch.compile(loss_fn, fullgraph=True) if mode == "compiled" else loss_fn


def make_step(net: str, family: str | None, mode: str, batch: int, device: torch.device):
    factory, shape, attach_kwargs = NETS[net]
    torch.manual_seed(0)
    model = factory().to(device)
    if family is not None:
        example = torch.randn(2, *shape, device=device)
        model = cd.attach(
            model, gate=family, example_inputs=example, gate_kwargs=GATE_KWARGS, **attach_kwargs
        )
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fn = loss_of(model, family, mode)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, opt, step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


ABLATIONS = {  # --ablate-X: the third net's name, and the switch it runs inside
    "bank": ("per-gate", bank.off),  # every gate computed alone
    "defer": ("undeferred", _defer.off),  # each gate multiplies at its layer, not after a pool
    "handoff": ("kept-input", hand_overs_off),  # each gate keeps its input, out of place
    "fuse": ("unfused-heads", _proj.off),  # head gates and their projections computed apart
    "bn": ("unfused-batchnorm", _bn.off),  # BatchNorms and the gates after them computed apart
}


def ablated(step: Callable, switch: Callable) -> Callable:
    """``step`` run inside ``switch()`` (one of ABLATIONS)."""

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        with switch():
            step(x, y)

    return run


def measure(
    net: str,
    family: str,
    mode: str,
    batch: int,
    pairs: int,
    device: torch.device,
    ablate: str | None = None,
):
    """Median gated/plain step ratio over ``pairs`` interleaved pairs (with ``ablate``, a key of
    ABLATIONS, a third net takes its turn too: the same gated net with that part switched off)."""
    shape = NETS[net][1]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {}
    third = ABLATIONS[ablate][0] if ablate else None
    kinds = [("plain", None), ("gated", family)] + ([(third, family)] if third else [])
    for name, fam in kinds:
        model, opt, step = make_step(net, fam, mode, batch, device)
        if ablate and name == third:
            step = ablated(step, ABLATIONS[ablate][1])
        for _ in range(3):  # warm-up (and compilation)
            step(x, y)
        runs[name] = (model, opt, step)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(pairs):  # ABAB… (ABCCBA… with the ablation): each pair in both orders
        for name in order if i % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            runs[name][2](x, y)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    ratios = sorted(g / p for g, p in zip(times["gated"], times["plain"], strict=True))
    extra = {}
    if third:
        alone = sorted(g / p for g, p in zip(times[third], times["plain"], strict=True))
        extra = {f"{third} ratio": statistics.median(alone)}
        runs.pop(third)
    mem = {}
    for name, (model, opt, step) in runs.items():
        resident = list(model.parameters()) + [
            t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        ]
        mem[name] = peak_bytes(lambda step=step: step(x, y), resident, device)
    q = statistics.quantiles(ratios, n=10)
    return {
        "net": net,
        "family": family,
        "mode": mode,
        "batch": batch,
        "plain ms": statistics.median(times["plain"]) * 1e3,
        "gated ms": statistics.median(times["gated"]) * 1e3,
        "ratio": statistics.median(ratios),
        "p10": q[0],
        "p90": q[-1],
        "plain MB": mem["plain"] / 2**20,
        "gated MB": mem["gated"] / 2**20,
        "mem ratio": mem["gated"] / mem["plain"],
        "pairs": pairs,
        **extra,
    }


def gate_math(families: list[str], units: list[int], batch: int, repeats: int = 200) -> list[dict]:
    """The gates alone: one draw per gate and the summed KL, forward and backward, per step (ms).

    LeNet-5's gates by default (20, 50, 500 units), parameters spread off their initial values.
    """
    rows = []
    for family in families:
        torch.manual_seed(0)
        gates = [GATES[family](u) for u in units]
        with torch.no_grad():
            for g in gates:
                for p in g.parameters():
                    p.add_(0.5 * torch.randn_like(p))

        def step(gates: list = gates) -> None:
            total = sum(g.kl() + g._draw(batch).sum() for g in gates)
            total.backward()  # type: ignore[union-attr]
            for g in gates:
                g.clear_cache()

        for _ in range(20):
            step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        ms = (time.perf_counter() - t0) / repeats * 1e3
        rows.append({"family": family, "units": units, "batch": batch, "gate math ms": ms})
        print(rows[-1])
    return rows


def saved_mb(net: str, family: str | None, mode: str, batch: int) -> float:
    """MB of tensors a step keeps for its backward pass, as autograd's saved-tensor hooks see
    them (each storage once; the parameters, which a layer may save for its input's gradient,
    left out since 2026-12-06: they are resident anyway). Compiled with inductor, this is what
    the compiled graph saves, which the profiler's op-by-op count cannot see on CPU. Eager gates
    keep their input, their output or a ReLU's output outside the hooks (see
    compressdrop/gates/_mul.py): found in the graph and counted too, each storage once."""
    torch._dynamo.reset()
    model, _, _ = make_step(net, family, "eager", batch, torch.device("cpu"))
    x = torch.randn(batch, *NETS[net][1])
    y = torch.randint(0, 10, (batch,))
    fn = loss_of(model, family, mode)
    fn(x, y).backward()  # compile first
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # resident anyway

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, y)
    for t in kept_tensors(loss):  # what the gates keep outside the hooks
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    loss.backward()
    return sum(storages.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="lenet5,lenet300,resnet18,encoder")
    ap.add_argument("--families", default=",".join(GATES))
    ap.add_argument("--batches", default="64,256")
    ap.add_argument(
        "--noise",
        choices=("example", "batch"),
        default="example",
        help="the gates' noise: one θ per example (the default) or per mini-batch",
    )
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="training_cost")
    ap.add_argument("--gate-math", action="store_true", help="time the gates alone (one thread)")
    ap.add_argument("--saved", action="store_true", help="MB kept for backward, gated/plain")
    ap.add_argument(
        "--ablate-bank",
        action="store_true",
        help="also time the gated net with each gate computed alone (gates/bank.py off)",
    )
    ap.add_argument(
        "--ablate-defer",
        action="store_true",
        help="also time the gated net with each gate multiplying at its layer (gates/_defer.py)",
    )
    ap.add_argument(
        "--ablate-handoff",
        action="store_true",
        help="also time the gated net with each gate keeping its input (hand_overs_off)",
    )
    ap.add_argument(
        "--ablate-fuse",
        action="store_true",
        help="also time the gated net with head gates and projections apart (gates/_proj.py)",
    )
    ap.add_argument(
        "--ablate-bn",
        action="store_true",
        help="also time the gated net with BatchNorms and their gates apart (gates/_bn.py)",
    )
    args = ap.parse_args()
    GATE_KWARGS["noise"] = args.noise
    chosen = [k for k in ABLATIONS if getattr(args, f"ablate_{k}")]
    if len(chosen) > 1:
        ap.error("one ablation at a time: " + ", ".join(f"--ablate-{k}" for k in ABLATIONS))
    ablate = chosen[0] if chosen else None
    if args.saved:
        families = args.families.split(",")
        extra = [f"{f} {ABLATIONS[ablate][0]}" for f in families] if ablate else []
        rows = []
        for net in args.nets.split(","):
            for mode in args.modes.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    row = {"net": net, "mode": mode, "batch": batch}
                    row["plain"] = saved_mb(net, None, mode, batch)
                    for family in families:
                        row[family] = saved_mb(net, family, mode, batch) / row["plain"]
                        if ablate:
                            with ABLATIONS[ablate][1]():
                                mb = saved_mb(net, family, mode, batch)
                            row[f"{family} {ABLATIONS[ablate][0]}"] = mb / row["plain"]
                    rows.append(row)
                    print(row, flush=True)
        cols = ["net", "mode", "batch", "plain", *families, *extra]
        table = markdown_table(rows, cols)
        print(table)
        save(args.out, {"args": vars(args), "rows": rows, "table": table})
        return
    if args.gate_math:
        torch.set_num_threads(1)
        rows = gate_math(args.families.split(","), [20, 50, 500], 64)
        save(args.out, {"args": vars(args), "rows": rows})
        return
    device = torch.device(args.device)
    rows = []
    for net in args.nets.split(","):
        for mode in args.modes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for family in args.families.split(","):
                    rows.append(measure(net, family, mode, batch, args.pairs, device, ablate))
                    row = rows[-1]
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                    torch._dynamo.reset()
    columns = ["net", "family", "mode", "batch", "plain ms", "ratio", "p10", "p90", "mem ratio"]
    if ablate:
        columns.insert(6, f"{ABLATIONS[ablate][0]} ratio")
    table = markdown_table(rows, columns)
    print(table)
    save(args.out, {"args": vars(args), "device": str(device), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
