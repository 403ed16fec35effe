"""Data-parallel training helpers over `torch.distributed` (torchrun, or any initialised process group).

Every rank holds the whole SAE and walks the same batch order; rank r takes the r-th of `world` equal slices of each
global batch, and the gradients are averaged across ranks before the optimizer step, so the ranks stay identical and
match one process training on the whole batch (up to float summation order). Per-step state that must agree across
ranks is reduced too: which latents fired (for the dead-latent counters) and floating buffers such as BatchTopK's
threshold. Rank 0 alone writes checkpoints and logs.

Run with torchrun, e.g. `torchrun --nproc-per-node 2 my_script.py`, where the script calls `init_from_env()` before
`saelab.train.trainer.train(...)`; on CPU the backend is gloo, on GPUs nccl.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the data-parallel group (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world): which slice of each batch this rank trains on."""
        return self.rank, self.world

    @classmethod
    def current(cls) -> DistInfo:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    a single process without those variables stays alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistInfo.current()


def exit_rank(code: int = 0) -> None:
    """End a data-parallel rank that has finished (its process group destroyed) with `os._exit`, once its logs and
    output are flushed. The interpreter's own finalisation can still meet gloo's worker threads and abort the
    process ("terminate called without an active exception", SIGABRT; torch 2.x, pytorch/pytorch#179291), which
    torchrun or torch.multiprocessing.spawn would report as a failed rank. No rank holds anything finalisation
    would write."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def average_grads_(module: nn.Module, world: int) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of all gradients together)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        # in p's own memory layout: the fused optimizers assume a gradient strided like its parameter
        p.grad = torch.empty_like(p).copy_(flat[offset : offset + n].view_as(p))
        offset += n


def average_buffers_(module: nn.Module, world: int) -> None:
    """Average floating buffers (running statistics such as BatchTopK's threshold) over the ranks."""
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= world


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a boolean tensor over the ranks."""
    m = mask.to(torch.int32)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.bool()


def sum_ranks_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over the ranks (returns `t`)."""
    dist.all_reduce(t)
    return t


def broadcast_tensor_(t: torch.Tensor) -> torch.Tensor:
    """In-place copy of rank 0's `t` to every rank (returns `t`)."""
    dist.broadcast(t, src=0)
    return t


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` without a process group."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)
