"""Key statistics over several processes with ``torch.distributed`` (``torchrun``).

Statistics are a sum over tokens, so ranks can each sum a shard of the
corpus and add their sums with one all-reduce. :class:`Ranks` is what the
statistics code needs to know about the process group: its rank and size,
and the three collectives it uses (sum a tensor, gather a small object,
broadcast a small object). A single process is ``Ranks()`` (rank 0 of 1),
for which every collective is the identity, so one code path serves both.

:func:`process_group` joins the group ``torchrun`` describes in the
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
NCCL when the device is a CUDA GPU, gloo otherwise (CPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from zupatch.errors import ZupatchError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a process group (default: the only process)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None  # "gloo", "nccl", or None for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the cache and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks, in place when the backend can use it where it lives."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        if self.backend == "gloo" and tensor.device.type != "cpu":
            on_cpu = tensor.cpu()
            dist.all_reduce(on_cpu)
            tensor.copy_(on_cpu)
        else:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (small, picklable values only)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_ranks() -> Ranks:
    """The initialised default process group as :class:`Ranks`, else a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def launched_distributed() -> bool:
    """Was this process started by ``torchrun`` (or alike) as one of several ranks?"""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``; others stay."""
    if device.type == "cuda" and device.index is None and launched_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, else gloo); a single process otherwise.

    A group already initialised by the caller is used as it is and left open.
    """
    import torch.distributed as dist

    if not launched_distributed() or (dist.is_available() and dist.is_initialized()):
        yield current_ranks()
        return
    if not dist.is_available():
        raise ZupatchError("this torch build has no torch.distributed; run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        yield current_ranks()
    finally:
        dist.destroy_process_group()
