"""Recipe training under torch.distributed (DDP), launched by ``torchrun``.

Each rank holds the whole data set in memory and takes its share of every *global* batch: the
global batch is the one a single process would draw (same seeded permutation, ``batch_size``
examples), and rank r takes its examples r, r + W, r + 2W, ... (W = world size; the strided
sharding ``DistributedSampler`` uses, applied per global batch so that the ranks' batches add up
to the single-process batch exactly). Gate noise is drawn for the whole global batch on every rank
(the ranks' random streams stay identical) and each rank keeps its rows, so a W-process run
follows the single-process run to float rounding: the per-rank losses are sums scaled by W / B, so
DDP's gradient average is the global batch mean. The KL term is divided by the global training-set
size on every rank. Parameters (gates included) start identical (same seed; DDP also broadcasts
rank 0's) and stay identical (averaged gradients). Only rank 0 writes checkpoints and outputs.

A non-finite loss on any rank stops every rank with ``TrainingDiverged`` at the same step (the
ranks agree through one all-reduce of a flag per step). A trailing global batch too small to give
each rank two examples is merged into the batch before it.

BatchNorm statistics are per rank, as in plain DDP (on GPUs, ``nn.SyncBatchNorm`` would share
them; not done here).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CompressDropError
from ..runtime import resolve_device

__all__ = ["Dist", "RanksDisagree", "from_env", "launched_by_torchrun"]


class RanksDisagree(CompressDropError, ValueError):
    """The processes of a distributed run were given different work (a different recipe)."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (``world == 1``: no distribution)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's examples of a global batch ``idx``."""
        return idx[self.rank :: self.world] if self.active else idx

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when distributed, else ``model`` itself."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    def mean(self, value: float) -> float:
        """Average a Python number over ranks (for logging)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def all_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on every rank (one tiny all-reduce)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def check_same(self, what: str, value: bytes) -> None:
        """Raise :class:`RanksDisagree` on every rank unless ``value`` is the same on every rank.

        For what must agree before any training collective: ranks that, say, loaded different
        recipes would issue different sequences of collectives, and gloo then aborts the process
        (``Received data size doesn't match expected size``) or NCCL hangs, far from the cause.
        """
        if not self.active:
            return
        import hashlib

        digest = torch.tensor(list(hashlib.sha256(value).digest()), dtype=torch.uint8)
        if dist.get_backend() == "nccl":
            digest = digest.cuda()
        gathered = [torch.empty_like(digest) for _ in range(self.world)]
        dist.all_gather(gathered, digest)
        mine = gathered[self.rank].cpu()
        differ = [r for r, d in enumerate(gathered) if not torch.equal(d.cpu(), mine)]
        if differ:
            raise RanksDisagree(
                f"rank {self.rank} has a different {what} than rank(s) "
                f"{', '.join(map(str, differ))}; every process must run the same one"
            )

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def noise(self, global_batch: int) -> Iterator[None]:
        """Gates draw noise for the whole global batch and keep this rank's rows."""
        if not self.active:
            yield
            return
        from ..gates import noise_shard

        with noise_shard(self.rank, self.world, int(global_batch)):
            yield


def from_env(device: str = "auto") -> tuple[Dist, str]:
    """Join the process group that ``torchrun`` set up (if any) and pick this rank's device.

    Returns the :class:`Dist` and the device string to train on: ``cuda:LOCAL_RANK`` on GPUs
    (NCCL), the CPU otherwise (gloo).
    """
    if not launched_by_torchrun():
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), (f"cuda:{local}" if use_cuda else "cpu")


def shutdown(*, clean: bool = True) -> None:
    """Leave the process group.

    ``clean``: every rank gets here the same way (the run finished, or every rank stopped at the
    same agreed step with :class:`~compressdrop.training.runner.TrainingDiverged`), so wait for all
    of them first: no rank then tears down its gloo/NCCL connections while a peer is still inside a
    collective with it (a peer whose connection closes mid-collective fails or aborts). Not clean
    (any other error): a peer may be dead or stuck, so leave without waiting for it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
