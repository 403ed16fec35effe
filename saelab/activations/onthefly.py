"""Training activations generated on the fly from the streamed corpus, through a mixing buffer.

`StreamSource` runs the subject model over the training windows of `saelab.data.stream.TrainStream` (each forward
stopped after the last hooked layer, in batches of `collect.batch_size` windows), keeps the rows of the kept
positions (float32, whatever the model's dtype: the SAE's master weights are float32), and fills a *block* of
`block_rows` rows, the mixing buffer. The block is permuted and handed out as batches; then the next block is
filled. So every batch is a uniform random draw, without replacement, of `batch_size` rows from a buffer of
`block_rows` rows drawn from many documents (SAELens's mixing buffer does the same with a refill of half the
buffer; sparsify trains on the rows of a few windows in order). `block_rows` is `train.stream_buffer_rows` rounded
down to whole batches, so no row crosses from one block to the next.

The mixing bound (asserted in tests/test_onthefly.py): if a document contributes m of the R rows of a block, the
number of its rows in one batch of B is hypergeometric with mean B*m/R, and Hoeffding's bound for sampling without
replacement gives P(X >= B*m/R + t) <= exp(-2 t^2 / B). So with probability 1 - delta every batch of n blocks'
batches holds at most B*m/R + sqrt(B/2 * ln(R*n/delta)) rows of any one document.

Several hookpoints are filled from one forward (`hookpoints`), one buffer each, permuted alike: slot h of a batch
holds the rows of hookpoint h at the same token positions.

Every epoch reads the corpus from its start again (the same rows, in newly permuted blocks). A checkpoint holds
`state()`: the block being trained on and the stream position of the forward batch that begins it (a few numbers,
never the buffer); a resumed run refills that block from there with the same forwards, and skips the batches
already trained on, so no document is read twice or skipped. Under torchrun each rank streams its own documents
(`TrainStream`'s partition) and hands out its `batch_size // world` rows of each batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saelab.activations.sources import sample_ids
from saelab.activations.store import ActivationError, check_finite
from saelab.config import DataConfig
from saelab.data.stream import StreamPosition, TrainStream
from saelab.models.loading import LoadedModel, capture, forward_until, hookpoint_width

log = logging.getLogger(__name__)


def mixing_bound(
    batch_rows: int, block_rows: int, doc_rows: int, n_batches: int, delta: float = 1e-6
) -> float:
    """Most rows of one document (holding `doc_rows` rows of its block) that any of `n_batches` batches of
    `batch_rows` rows drawn from blocks of `block_rows` rows holds, with probability >= 1 - `delta` (Hoeffding's
    bound for sampling without replacement, with a union over the block's rows and the batches)."""
    mean = batch_rows * doc_rows / block_rows
    return mean + math.sqrt(batch_rows / 2 * math.log(block_rows * n_batches / delta))


@dataclass
class _Block:
    """One filled mixing buffer."""

    index: int
    slots: list[torch.Tensor]
    """Per hookpoint, [rows, d] float32 on the model's device."""
    docs: np.ndarray
    """[rows] the corpus index of each row's document."""


@dataclass(frozen=True)
class _BlockStart:
    """Where block `index` begins: the stream position before the forward batch holding its first row, and how
    many rows of that batch the block before it took."""

    index: int
    position: StreamPosition
    used: int

    def to_state(self) -> dict[str, Any]:
        return {"block": self.index, "position": self.position.to_state(), "used": self.used}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _BlockStart:
        return cls(int(state["block"]), StreamPosition.from_state(state["position"]), int(state["used"]))


class StreamSource:
    """Batches of activations generated on the fly (module docstring); `slot(h)` is the `BatchSource` view of
    hookpoint h that a trainer reads its statistics from."""

    def __init__(
        self,
        lm: LoadedModel,
        data_cfg: DataConfig,
        seed: int,
        hookpoints: Sequence[str],
        n_rows: int,
        batch_size: int,
        buffer_rows: int,
        forward_windows: int,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        _, world = part  # the trainer refuses a batch that does not divide over the ranks (`_check_batches`)
        if buffer_rows < batch_size:
            raise ActivationError(
                f"train.stream_buffer_rows {buffer_rows} is smaller than one batch of {batch_size}; raise it "
                "(the mixing buffer must hold many batches to mix documents)"
            )
        self.lm, self.data_cfg, self.seed, self.part = lm, data_cfg, seed, part
        self.hookpoints = list(hookpoints)
        self.n_rows = n_rows
        self.batch_rows = batch_size // world
        """Rows of each batch on this rank."""
        self.steps_per_epoch = n_rows // batch_size
        self.epoch_rows = self.steps_per_epoch * self.batch_rows
        """Rows this rank trains on per epoch."""
        self.block_rows = (buffer_rows // batch_size) * self.batch_rows
        self.forward_windows = forward_windows
        self.device = lm.device
        self.events: list[dict[str, Any]] = []
        """Block records (`{"event": "block", ...}`) not yet written to the training log (`drain_events`)."""
        self._first: _Block | None = None
        self._first_start: _BlockStart | None = None
        self._current: _Block | None = None
        self._current_start: _BlockStart | None = None
        self._resume: _BlockStart | None = None
        self._stream: TrainStream | None = None
        self._leftover: tuple[list[torch.Tensor], np.ndarray] | None = None
        self._lead: tuple[StreamPosition, int] = (StreamPosition(), 0)
        self._pending_drop = 0
        self._left = 0
        """Batches of the current block not yet handed out."""
        self.batch_docs = np.zeros(0, dtype=np.int64)
        """The corpus index of the document of each row of the last batch handed out (for tests and checks)."""
        self._quiet_block: int | None = None
        """A resumed block, refilled: its record is in the log already."""
        self.d_ins = [hookpoint_width(lm, hp) for hp in self.hookpoints]
        self.d_in = self.d_ins[0]

    # --- what the trainers read ---------------------------------------------------------------------------
    def slot(self, h: int) -> SlotView:
        return SlotView(self, h)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.epoch_rows / self.block_rows)

    def head(self, n: int, h: int = 0) -> torch.Tensor:
        """The first `n` rows of the stream (of its first block) at hookpoint `h`."""
        return self._first_block().slots[h][:n]

    def sample(self, n: int, gen: torch.Generator, h: int = 0) -> torch.Tensor:
        """About `n` random rows of the block being trained on (the first block before training)."""
        block = self._current or self._first_block()
        ids = sample_ids(len(block.docs), n, gen).to(self.device)
        return block.slots[h][ids]

    def state(self) -> dict[str, Any]:
        """For a checkpoint: where the block being trained on begins, or once its last batch is out, where the
        next one begins (the stream stands there: blocks are filled when their first batch is asked for)."""
        start = self._current_start or _BlockStart(0, StreamPosition(), 0)
        if self._current is not None and self._left == 0:
            start = _BlockStart(start.index + 1, *self._lead)
        return start.to_state()

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume: the next `epoch` refills the checkpoint's block from its recorded start."""
        self._resume = _BlockStart.from_state(state)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint of a streamed training must share with the run resuming it."""
        from saelab.config import to_dict

        return {
            "hookpoints": self.hookpoints,
            "data": to_dict(self.data_cfg),
            "block_rows": self.block_rows,
            "forward_windows": self.forward_windows,
        }

    def drain_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        """Batches `start`, `start`+1, ... of one epoch (this rank's rows of each; `part` is the source's own).
        One number is drawn from `gen` per epoch, whatever `start` is; block b is permuted by a generator seeded
        from it and b."""
        epoch_seed = int(torch.randint(2**62, (1,), generator=gen))
        if start >= self.steps_per_epoch:
            return
        first, skip = divmod(start, self.block_rows // self.batch_rows)
        if first > 0 or self._first is None:
            # a block resumed within has its record in the log; one resumed at its start does not (the log
            # keeps the records before the step resumed from)
            self._restart(first, resumed=skip > 0)
        for b in range(first, self.n_blocks):
            rows = min(self.block_rows, self.epoch_rows - b * self.block_rows)
            block = self._take_first() if b == 0 and self._first is not None else self._fill(b, rows)
            self._current = block
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(epoch_seed + b))
            perm = order.to(self.device)
            n_batches = rows // self.batch_rows
            for j in range(skip if b == first else 0, n_batches):
                lo, hi = j * self.batch_rows, (j + 1) * self.batch_rows
                self._left = n_batches - j - 1
                self.batch_docs = block.docs[order[lo:hi].numpy()]
                batch = tuple(s[perm[lo:hi]] for s in block.slots)
                yield batch if len(batch) > 1 else batch[0]
            self._current = None
            del block  # before the next block is filled: one block in memory

    # --- filling blocks ----------------------------------------------------------------------------------
    def _first_block(self) -> _Block:
        if self._first is None:
            self._restart(0, resumed=False)
            self._first = self._fill(0, min(self.block_rows, self.epoch_rows), logged=True)
            self._first_start = self._current_start
        return self._first

    def _take_first(self) -> _Block:
        """Block 0 as filled for the statistics, handed to epoch 0 (and dropped: later epochs refill it)."""
        assert self._first is not None
        block, self._first = self._first, None
        self._current_start = self._first_start
        self.events.append(self._event(block))
        return block

    def _restart(self, block: int, resumed: bool) -> None:
        """Stream from the corpus's start (block 0), or from the resumed checkpoint's block."""
        if self._stream is not None:
            self._stream.close()
        if block == 0:
            start = _BlockStart(0, StreamPosition(), 0)
        elif self._resume is not None and self._resume.index == block:
            start = self._resume
        else:
            raise ActivationError(
                f"cannot start a streamed epoch at block {block} without the checkpoint that records where it "
                "begins; resume from that checkpoint, or train afresh without --train.resume"
            )
        self._stream = TrainStream(self.data_cfg, self.lm.tokenizer, self.seed, self.part, start.position)
        self._leftover, self._lead = None, (start.position, 0)
        self._pending_drop = start.used
        self._quiet_block = block if resumed else None

    def _fill(self, index: int, rows: int, logged: bool = False) -> _Block:
        """The next `rows` rows of the stream as block `index`; its record goes to `events` unless `logged` or
        it is a resumed block refilled."""
        self._current_start = _BlockStart(index, *self._lead)
        block = _Block(
            index,
            [torch.empty(rows, d, device=self.device) for d in self.d_ins],
            np.empty(rows, dtype=np.int64),
        )
        have = 0
        while have < rows:
            if self._leftover is None:
                self._forward_batch(have)
            assert self._leftover is not None
            acts, doc = self._leftover
            take = min(rows - have, len(doc))
            for slot, a in zip(block.slots, acts, strict=True):
                slot[have : have + take] = a[:take]
            block.docs[have : have + take] = doc[:take]
            have += take
            position, used = self._lead
            self._lead = (position, used + take)
            self._leftover = ([a[take:] for a in acts], doc[take:]) if take < len(doc) else None
        for h, s in enumerate(block.slots):
            check_finite(s, f"streamed activations at {self.hookpoints[h]} (block {index})")
        if not logged and self._quiet_block != index:
            self.events.append(self._event(block))
        self._quiet_block = None
        return block

    def _forward_batch(self, have: int) -> None:
        """Run the model over the next windows; their kept rows become the leftover the blocks take from."""
        assert self._stream is not None
        position = self._stream.position
        windows = self._stream.windows(self.forward_windows)
        if len(windows.tokens) == 0:
            self._ran_out(have)
        ids = torch.as_tensor(windows.tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode(), capture(self.lm.model, self.hookpoints) as store:
            forward_until(self.lm.model, ids)
        keep = torch.as_tensor(windows.keep, device=self.device)
        acts = [store[hp][keep].float() for hp in self.hookpoints]
        doc = windows.docs[windows.keep]
        drop, self._pending_drop = self._pending_drop, 0
        self._leftover = ([a[drop:] for a in acts], doc[drop:])
        self._lead = (position, drop)

    def _ran_out(self, have: int) -> None:
        assert self._stream is not None
        pos = self._stream.position
        start = self._current_start.index if self._current_start else 0
        got = start * self.block_rows + have
        _, world = self.part
        raise ActivationError(
            f"dataset {self.data_cfg.dataset!r} ran out after {pos.documents} documents: its training documents "
            f"gave {got * world} kept tokens, fewer than the {self.epoch_rows * world} an epoch of "
            f"--collect.n-train-tokens {self.n_rows} takes; lower --collect.n-train-tokens to at most "
            f"{got * world}, or use a larger corpus"
        )

    def _event(self, block: _Block) -> dict[str, Any]:
        _, counts = np.unique(block.docs, return_counts=True)
        return {
            "event": "block",
            "block": block.index,
            "rows": len(block.docs),
            "first_document": int(block.docs.min()),
            "last_document": int(block.docs.max()),
            "documents": len(counts),
            "max_document_rows": int(counts.max()),
        }


class SlotView:
    """Hookpoint `h` of a `StreamSource`, as a trainer's `BatchSource` for its statistics (input scale, decoder
    bias, resampling); the batches come from the shared source's `epoch`."""

    def __init__(self, source: StreamSource, h: int) -> None:
        self.source, self.h = source, h
        self.n_rows = source.n_rows
        self.d_in = source.d_ins[h]
        self.device = source.device

    def head(self, n: int) -> torch.Tensor:
        return self.source.head(n, self.h)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise ActivationError("a streamed source has no random access to rows; use sample()")

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.source.sample(n, gen, self.h)

    def epoch(
        self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        raise ActivationError("the batches of a streamed source come from the shared StreamSource.epoch")
