"""A shared gate's draw, repeated at each of its sites from the same random numbers.

One gate may serve several sites of a coupled group (the channels of a residual stream): every
site in a forward pass must multiply by the same θ. Drawing θ once and handing the tensor to the
other sites breaks under activation checkpointing (``torch.utils.checkpoint``), where a segment's
sites run again during the backward pass: a site recomputed without drawing consumes less of the
random stream that the segment replays (the non-reentrant variant raises ``CheckpointError``,
later draws in the segment silently differ), and under the reentrant variant a θ drawn in the
segment's first, gradient-free pass carries no graph, so the gate's parameters get no gradient.

Instead a shared gate takes a seed once per forward pass (in attach's root pre-hook, outside any
segment) and each site draws θ again from a stream started at that seed, in its own graph, leaving
the global random streams as they were. The sites see the same θ; the gradients add up over the
sites as for one tensor used several times; a recomputed site draws what it drew the first time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__: list[str] = []  # internal: Gate._training_sample uses it


def new_seed() -> int:
    """A seed from the CPU's global random stream (consumes one draw of it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


@contextlib.contextmanager
def replay(seed: int, device: torch.device) -> Iterator[None]:
    """Random numbers drawn on ``device`` inside come from a stream started at ``seed``; the global
    streams are restored on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:  # mps, xpu, ...: that device type's own generator (torch.manual_seed would reseed CUDA)
        with torch.random.fork_rng(device_type=device.type):
            getattr(torch, device.type).manual_seed(seed)
            yield
