"""Training windows streamed from the corpus, for activations generated on the fly (`collect.format stream`).

The training documents (those `held_out` leaves in the training split) are read in order, tokenised in batches of
`TOKENIZE_BATCH` with the fast tokenizer, each followed by EOS, and packed into `ctx_len`-token windows as
`saelab.data.windows` packs them; `TrainStream.windows(n)` hands out the next `n`. Memory holds one tokenizer
batch's tokens, whatever the corpus size. Under torchrun rank r of w takes the training documents whose number
among the training documents is r mod w, so the ranks read disjoint documents.

`StreamPosition` is where the stream stands: the documents read, and the tokens packed but not yet handed out with
the documents they came from. A stream started from a position continues with the same windows as the stream that
reached it (the documents before it are skipped without tokenising), so a resumed training reads no document twice
and skips none.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from saelab.config import DataConfig
from saelab.data.windows import TOKENIZE_BATCH, corpus_documents, held_out, keep_mask


@dataclass(frozen=True)
class StreamPosition:
    """Where a `TrainStream` stands (small: it goes into every checkpoint)."""

    documents: int = 0
    """Documents of the corpus read, both splits and every rank's (the index of the next one)."""
    train_documents: int = 0
    """Training documents among them (every rank's)."""
    pending: tuple[int, ...] = ()
    """Tokens packed but not yet handed out in a window."""
    pending_docs: tuple[int, ...] = ()
    """The corpus index of the document each pending token came from."""

    def to_state(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "train_documents": self.train_documents,
            "pending": list(self.pending),
            "pending_docs": list(self.pending_docs),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamPosition:
        return cls(
            int(state["documents"]),
            int(state["train_documents"]),
            tuple(int(t) for t in state["pending"]),
            tuple(int(d) for d in state["pending_docs"]),
        )


class WindowBlock(NamedTuple):
    """Windows handed out by the stream."""

    tokens: np.ndarray
    """[n, ctx_len] int32 token ids."""
    keep: np.ndarray
    """[n, ctx_len] bool: False at excluded positions (as in `TokenWindows`)."""
    docs: np.ndarray
    """[n, ctx_len] int64: the corpus index of the document of each position."""


class TrainStream:
    """The training windows of this rank's share of the corpus, in order (module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        seed: int,
        part: tuple[int, int] = (0, 1),
        start: StreamPosition | None = None,
    ) -> None:
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.rank, self.world = part
        self.special = sorted(set(tokenizer.all_special_ids))
        self.eos = tokenizer.eos_token_id
        start = start or StreamPosition()
        self._documents, self._train_documents = start.documents, start.train_documents
        self._tokens = list(start.pending)
        self._docs = list(start.pending_docs)
        self._corpus: Generator[Any, None, None] | None = None
        self._batches: Iterator[list[tuple[int, Any]]] | None = None
        self.exhausted = False
        """The corpus (or `data.max_docs`) has ended."""
        self.documents_used = 0
        """Documents of this rank packed by this stream object (not counting those before its start)."""

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self._documents, self._train_documents, tuple(self._tokens), tuple(self._docs))

    def windows(self, n: int) -> WindowBlock:
        """The next `n` windows; fewer (possibly none) when the corpus ends."""
        ctx = self.cfg.ctx_len
        while len(self._tokens) < n * ctx and self._read_batch():
            pass
        m = min(n, len(self._tokens) // ctx)
        tokens = np.asarray(self._tokens[: m * ctx], dtype=np.int32).reshape(m, ctx)
        docs = np.asarray(self._docs[: m * ctx], dtype=np.int64).reshape(m, ctx)
        del self._tokens[: m * ctx], self._docs[: m * ctx]
        return WindowBlock(tokens, keep_mask(tokens, self.cfg, self.special), docs)

    def close(self) -> None:
        if self._corpus is not None:
            self._corpus.close()

    def _read_batch(self) -> bool:
        """Tokenise and pack the next batch of this rank's training documents; False at the corpus's end."""
        if self._batches is None:
            self._corpus = corpus_documents(self.cfg, self.tokenizer)
            self._batches = self._mine(self._corpus)
        batch = next(self._batches, None)
        if batch is None:
            self.exhausted = True
            return False
        texts = [doc for _, doc in batch if isinstance(doc, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for index, doc in batch:
            ids = next(encoded) if isinstance(doc, str) else doc.tolist()
            self._tokens.extend(ids)
            self._tokens.append(self.eos)
            self._docs.extend([index] * (len(ids) + 1))
            self.documents_used += 1
        return True

    def _mine(self, corpus: Iterator[Any]) -> Iterator[list[tuple[int, Any]]]:
        """Batches of (corpus index, document) of this rank's training documents after the start position.
        The counters move as each document is taken, so `position` always names the next one."""
        batch: list[tuple[int, Any]] = []
        for index, doc in enumerate(corpus):
            if self.cfg.max_docs and index >= self.cfg.max_docs:
                break
            if index < self._documents:
                continue  # before the start position: read, not tokenised
            self._documents = index + 1
            if held_out(self.seed, index, self.cfg.eval_fraction):
                continue
            mine = self._train_documents % self.world == self.rank
            self._train_documents += 1
            if mine:
                batch.append((index, doc))
            if len(batch) == TOKENIZE_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
