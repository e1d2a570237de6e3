"""Noise for a slice of a global batch: what a data-parallel rank draws (``noise_shard``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from ..errors import InputError

__all__ = ["noise_shard"]

# (rank, world size, global batch) inside noise_shard, None outside it
_NOISE_SHARD: ContextVar[tuple[int, int, int] | None] = ContextVar(
    "compressdrop_noise_shard", default=None
)
# how many noise_shard contexts are open in any thread: while none is, a gate need not read the
# ContextVar, which torch.compile cannot trace
_OPEN_SHARDS = [0]


@contextlib.contextmanager
def noise_shard(rank: int, world: int, global_batch: int) -> Iterator[None]:
    """Make every gate draw the noise of this rank's slice of a global batch.

    In a data-parallel run each of ``world`` processes sees examples ``rank, rank + world, ...`` of
    a global batch of ``global_batch`` examples. Inside this context a gate draws θ for the whole
    global batch and keeps those rows, so with the ranks' random streams in step the W processes
    together draw exactly the noise one process would draw for the global batch, and a distributed
    run follows the single-process run. A forward pass whose batch is not this rank's share raises
    :class:`~compressdrop.errors.InputError`.

    The setting belongs to the current thread (and asyncio task); contexts nest, and leaving one,
    by an exception too, restores the setting it replaced.

    Args:
        rank: this process's index, ``0 <= rank < world``.
        world: the number of processes sharing the global batch.
        global_batch: the examples in the global batch.

    Raises:
        InputError: ``world`` or ``global_batch`` is below 1, or ``rank`` is not in
            ``range(world)``.

    Example:
        >>> import torch
        >>> from compressdrop.gates import LogNormalGate, noise_shard
        >>> gate = LogNormalGate(4)
        >>> with noise_shard(rank=1, world=2, global_batch=6):
        ...     y = gate(torch.ones(3, 4))  # rows 1, 3, 5 of the global batch's noise
        >>> y.shape
        torch.Size([3, 4])
    """
    if world < 1 or global_batch < 1 or not 0 <= rank < world:
        raise InputError(
            f"noise_shard needs 0 <= rank < world and global_batch >= 1, got rank={rank}, "
            f"world={world}, global_batch={global_batch}"
        )
    token = _NOISE_SHARD.set((int(rank), int(world), int(global_batch)))
    _OPEN_SHARDS[0] += 1
    try:
        yield
    finally:
        _OPEN_SHARDS[0] -= 1
        _NOISE_SHARD.reset(token)
