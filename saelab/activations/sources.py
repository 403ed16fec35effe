"""Batch sources for the trainer: shuffled batches of rows from an in-memory tensor (`TensorSource`) or from the
sharded on-disk store (`StoreSource`, shard groups read in a seeded order so memory stays bounded)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch

from saelab.activations.store import ActivationError, ActivationStore


class BatchSource(Protocol):
    """Where the trainer's batches come from (rows = tokens)."""

    n_rows: int
    d_in: int
    device: torch.device

    def head(self, n: int) -> torch.Tensor:
        """The first `n` rows, for the input scale."""
        ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows by index."""
        ...

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """About `n` random rows (for resampling)."""
        ...

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        """Batches `start`, `start`+1, ... of one epoch whose order depends on `gen` only (every epoch draws the same
        amount from `gen` whatever `start` is); `part` = (rank, world) keeps that rank's slice of each batch."""
        ...


def _part_bounds(batch_size: int, part: tuple[int, int]) -> tuple[int, int]:
    rank, world = part
    return rank * batch_size // world, (rank + 1) * batch_size // world


def sample_ids(n_rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` distinct random row indices (with replacement for very large sources, where a permutation of all rows
    would not fit in memory)."""
    if n_rows <= 1 << 24:
        return torch.randperm(n_rows, generator=gen)[:n]
    return torch.randint(n_rows, (n,), generator=gen)


class TensorSource:
    """Batches from activations held in memory: one permutation of all rows per epoch."""

    def __init__(self, acts_ND: torch.Tensor) -> None:
        self.acts_ND = acts_ND
        self.n_rows, self.d_in = acts_ND.shape
        self.device = acts_ND.device

    def head(self, n: int) -> torch.Tensor:
        return self.acts_ND[:n]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.acts_ND[ids.to(self.acts_ND.device)]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.rows(sample_ids(self.n_rows, n, gen))

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n_rows, generator=gen).to(self.acts_ND.device)
        lo, hi = _part_bounds(batch_size, part)
        for b in range(start, self.n_rows // batch_size):
            yield self.acts_ND[order[b * batch_size + lo : b * batch_size + hi]]


class _Group(NamedTuple):
    """Rows shuffled together in the buffer: the rows carried over from the previous group, then whole shards."""

    carry_ids: torch.Tensor
    """Global indices of the carried rows (fewer than a batch), held at the front of the buffer."""
    shards: list[int]
    perm: torch.Tensor
    """Permutation of the group's buffer positions; batch j is perm[j*B : (j+1)*B]."""
    n_batches: int


def plan_groups(
    shard_rows: list[int], batch_size: int, buffer_rows: int, gen: torch.Generator
) -> Iterator[_Group]:
    """One epoch's shuffle plan, drawn from `gen` without reading data: shards in random order, packed into groups
    that fit in the buffer with the carried rows, each group permuted; rows not filling a last batch carry over."""
    offsets = [0, *np.cumsum(shard_rows).tolist()]
    order = torch.randperm(len(shard_rows), generator=gen).tolist() if len(shard_rows) > 1 else [0]
    carry, i = torch.empty(0, dtype=torch.long), 0
    while i < len(order):
        shards, held = [], len(carry)
        while i < len(order) and held + shard_rows[order[i]] <= buffer_rows:
            shards.append(order[i])
            held += shard_rows[order[i]]
            i += 1
        ids = torch.cat([carry, *(torch.arange(offsets[s], offsets[s + 1]) for s in shards)])
        perm = torch.randperm(held, generator=gen)
        n_batches = held // batch_size
        yield _Group(carry, shards, perm, n_batches)
        carry = ids[perm[n_batches * batch_size :]]


class StoreSource:
    """Shuffled batches streamed from an `ActivationStore` through a buffer of `buffer_rows` rows.

    Memory holds the buffer and one shard being read, whatever the store's size. Mixing spans a buffer's worth of
    shards (block shuffling), so make the buffer many shards large. Every row is used once per epoch, but for the
    fewer than `batch_size` rows left at its end (dropped, as `TensorSource` drops N mod batch_size)."""

    def __init__(self, store: ActivationStore, buffer_rows: int, device: str | torch.device = "cpu") -> None:
        self.store, self.buffer_rows, self.device = store, buffer_rows, torch.device(device)
        self.n_rows, self.d_in = store.n_rows, store.d_in
        self.peak_rows = 0
        """Most rows in memory at once (the buffer plus the shard being copied into it), for tests."""
        self.shard_reads = 0

    def head(self, n: int) -> torch.Tensor:
        return self.store.head(n).to(self.device)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.store.rows(ids).to(self.device)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.rows(sample_ids(self.n_rows, n, gen))

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        self._check_fits(batch_size)
        lo, hi = _part_bounds(batch_size, part)
        buffer = torch.empty(min(self.buffer_rows, self.n_rows), self.d_in, device=self.device)
        done, carry_pos = 0, None
        for g in plan_groups(self.store.shard_rows, batch_size, self.buffer_rows, gen):
            if done + g.n_batches <= start:  # already trained on: skipped without reading
                done, carry_pos = done + g.n_batches, None
                continue
            self._fill(buffer, g, carry_pos)
            for j in range(max(0, start - done), g.n_batches):
                yield buffer[g.perm[j * batch_size + lo : j * batch_size + hi]]
            done += g.n_batches
            carry_pos = g.perm[g.n_batches * batch_size :]

    def _fill(self, buffer: torch.Tensor, g: _Group, carry_pos: torch.Tensor | None) -> None:
        """Carried rows to the front (from the buffer, or read again after a skip), then the group's shards."""
        n = len(g.carry_ids)
        if n:
            buffer[:n] = buffer[carry_pos] if carry_pos is not None else self.rows(g.carry_ids)
        for s in g.shards:
            data = self.store.read_shard(s)
            self.shard_reads += 1
            self.peak_rows = max(self.peak_rows, buffer.shape[0] + data.shape[0])
            buffer[n : n + data.shape[0]] = data
            n += data.shape[0]

    def _check_fits(self, batch_size: int) -> None:
        need = max(self.store.shard_rows) + batch_size - 1
        if self.buffer_rows < need:
            raise ActivationError(
                f"a shuffle buffer of {self.buffer_rows} rows cannot hold a shard of {max(self.store.shard_rows)} "
                f"rows plus the {batch_size - 1} rows a batch may carry over; raise --train.stream-buffer-rows to "
                f">= {need} or write smaller shards"
            )
