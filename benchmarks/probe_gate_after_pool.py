"""Probe (issue 17): how much of a gated LeNet-5 step is the gates' activation-sized passes, and
what multiplying after the max-pool instead of at the convolution would save. (Built since:
``compressdrop/gates/_defer.py``; ``bench_training_cost.py --ablate-defer`` measures the real thing.)

    python benchmarks/probe_gate_after_pool.py

Three hand-built LeNet-5-Caffe nets take turns (ABC…, the order reversed every other round, 40
rounds after 5 warm-up steps, batch 64, two threads): plain; crude per-example gates
θ = sigmoid((logit u + a)/0.66) on the 20, 50 and 500 units multiplied at each layer's output
("conv"); the same gates on the convolutions multiplied after ReLU and the 2×2 max-pool ("pool",
4× fewer values). For θ ≥ 0 (log-normal, concrete, hard concrete; not the variational family's
Gaussian θ) both give the same function: ReLU and max-pool commute with a positive per-channel
scale. No KL, no Adam state for more than the gates' logits: the gates' fixed costs are left out
on purpose. Prints the median step ratio to plain with its 10th–90th percentiles.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.f1, self.f2 = nn.Linear(800, 500), nn.Linear(500, 10)
        self.a = nn.ParameterList([nn.Parameter(torch.zeros(u)) for u in (20, 50, 500)])

    def theta(self, i: int, batch: int) -> torch.Tensor:
        u = torch.rand(batch, self.a[i].numel())
        return torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.a[i]) / 0.66)

    def conv(self, h: torch.Tensor, i: int) -> torch.Tensor:
        if self.mode == "conv":
            h = h * self.theta(i, h.shape[0])[:, :, None, None]
        h = F.max_pool2d(F.relu(h), 2)
        if self.mode == "pool":
            h = h * self.theta(i, h.shape[0])[:, :, None, None]
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.c2(self.conv(self.c1(x), 0)), 1)
        h = self.f1(h.flatten(1))
        if self.mode != "plain":
            h = h * self.theta(2, h.shape[0])
        return self.f2(F.relu(h))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    steps = {}
    for mode in ("plain", "conv", "pool"):
        net = Net(mode)
        opt = torch.optim.Adam(net.parameters(), 1e-4)

        def step(net: Net = net, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(5):
            step()
        steps[mode] = step
    ms: dict[str, list[float]] = {m: [] for m in steps}
    for i in range(40):
        for m in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            t0 = time.perf_counter()
            steps[m]()
            ms[m].append(time.perf_counter() - t0)
    for m in ("conv", "pool"):
        r = sorted(a / b for a, b in zip(ms[m], ms["plain"], strict=True))
        q = statistics.quantiles(r, n=10)
        print(f"{m}: median ratio {statistics.median(r):.3f} ({q[0]:.3f}–{q[-1]:.3f})")
    print({m: round(statistics.median(v) * 1e3, 2) for m, v in ms.items()}, "ms a step")


if __name__ == "__main__":
    main()
