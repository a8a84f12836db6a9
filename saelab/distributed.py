"""Many processes, through PyTorch's own engine: `torchrun` starts them and `torch.distributed`
connects them (NCCL on CUDA, gloo on CPU). This module is the one place that knows which
process this is and the few collectives saelab uses; harvest and training take a `Dist`.

Under `torchrun --nproc_per_node=N`, `init()` joins the process group (once) and returns this
process's `Dist`; without torchrun it returns `SINGLE`, on which every collective is the
identity, so single-process code paths pay nothing.

`Dist` counts the bytes each process puts into collectives (`sent`), so benchmarks can
report the communication volume of a training step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import Tensor

from saelab.errors import UserError


@dataclass
class Dist:
    """This process's place among `world` processes (rank 0 writes every file)."""

    rank: int = 0
    world: int = 1
    sent: dict[str, int] = field(default_factory=dict)
    """Bytes this process contributed to each kind of collective, since the last reset."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _count(self, kind: str, t: Tensor) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + t.numel() * t.element_size()

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum `t` over the processes, in place; returns it."""
        if self.active:
            self._count("all_reduce", t)
            tdist.all_reduce(t)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Every process's `t` concatenated along dim 0, in rank order (same shape on all)."""
        if not self.active:
            return t
        self._count("all_gather", t)
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        _gather_into(out, t.contiguous())
        return out

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        """`t` from rank `src`, in place on every process; returns it."""
        if self.active:
            if self.rank == src:
                self._count("broadcast", t)
            tdist.broadcast(t, src)
        return t

    def sum_identical_loss(self, t: Tensor) -> Tensor:
        """Σ over processes of `t`, differentiably, for a sum that every process then turns
        into the *same* loss: the gradient reaching each summand is then the loss's gradient
        itself (no further reduction), so its backward is the identity."""
        return _SumForIdenticalLoss.apply(t, self) if self.active else t

    def shard(self, n: int) -> tuple[int, int]:
        """This process's [start, stop) of n items split in `world` contiguous equal parts."""
        if n % self.world:
            raise UserError(f"{n} does not split evenly over {self.world} processes")
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size


class _SumForIdenticalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, dist: Dist) -> Tensor:  # type: ignore[override]
        return dist.all_reduce_(t.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


# all_gather_single is torch 2.13's name for all_gather_into_tensor (deprecated there).
_gather_into = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor

SINGLE = Dist()
"""The one process of a run without torchrun."""


def launched() -> bool:
    """True in a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> Dist:
    """This process's `Dist`: joins the process group under torchrun (NCCL for a CUDA
    device, else gloo), else `SINGLE`."""
    if not launched():
        return SINGLE
    if not tdist.is_available():
        raise UserError("this torch build has no torch.distributed; install a full torch wheel")
    if not tdist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if cuda else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size())


def shutdown() -> None:
    """Leave the process group, if this process joined one (before the interpreter exits:
    a group left to the interpreter's teardown can abort the process after its work is
    done)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """A CUDA device named without an index means this process's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. writes a file); the others run it after it has."""
    if not dist.main:
        dist.barrier()
    try:
        yield
    finally:
        if dist.main:
            dist.barrier()
