"""Aligned activations of several hookpoints held in memory, batched together: the in-memory counterpart of a
multi-hookpoint `StreamSource` (row i of every tensor is the same token).

A transcoder trains on (input, target) pairs: `train(PairedTensorSource(x, y), cfg, ...)` with
`target_slots=[1]`, each batch a tuple (x rows, y rows) drawn with one permutation. Collected runs store one
hookpoint only, so the CLI trains transcoders on the fly; this source is for tensors in hand (and tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from saelab.activations.sources import TensorSource
from saelab.activations.store import ActivationError, check_finite


class PairedTensorSource:
    """Row-aligned tensors [N, d_h], one per hookpoint; `slot(h)` is hookpoint h's `TensorSource` view."""

    def __init__(self, *tensors: torch.Tensor, hookpoints: Sequence[str] = ()) -> None:
        if len(tensors) < 2:
            raise ActivationError("a paired source takes at least two tensors (input and target)")
        rows = {t.shape[0] for t in tensors}
        if len(rows) > 1 or any(t.dim() != 2 for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ActivationError(f"paired activations must be [N, d] with the same N, got {shapes}")
        for h, t in enumerate(tensors):
            check_finite(t, f"paired training activations (tensor {h})")
        self.tensors = list(tensors)
        self.hookpoints = list(hookpoints) or ["" for _ in tensors]
        self.n_rows, self.d_in = tensors[0].shape
        self.device = tensors[0].device

    def slot(self, h: int) -> TensorSource:
        return TensorSource(self.tensors[h])

    def head(self, n: int) -> torch.Tensor:
        return self.tensors[0][:n]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tensors[0][ids]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.slot(0).sample(n, gen)

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """As `TensorSource.epoch` (one permutation drawn from `gen`), every tensor's rows of each batch."""
        order = torch.randperm(self.n_rows, generator=gen).to(self.device)
        rank, world = part
        lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world
        for b in range(start, self.n_rows // batch_size):
            ids = order[b * batch_size + lo : b * batch_size + hi]
            yield tuple(t[ids] for t in self.tensors)
