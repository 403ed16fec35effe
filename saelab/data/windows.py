"""Token windows packed on the fly from a streamed corpus, the held-out split, and the exclusion mask.

Documents (read lazily by `saelab.data.corpus`) are tokenised in batches of `TOKENIZE_BATCH` with the fast
tokenizer, each followed by EOS, and cut into `ctx_len`-token windows. The split is decided per document:
`held_out` hashes (seed, document index) to a uniform number in [0, 1) and holds the document out when it is below
`eval_fraction`, so any later stage can stream the same held-out documents again without storing them. Training
and held-out windows are packed from their own document streams (no window mixes the two); the windows are stored
in the order they were completed. The mask of positions to exclude (leading positions, special tokens) is computed
here, once, and every later stage uses it.

How much is read (`build_windows(..., n_train_tokens=N)`, as the collect stage calls it with
`collect.n_train_tokens`): documents are read until
- the training windows hold N kept positions (collect takes exactly these windows; later training documents are
  then skipped before tokenisation), and
- there are at least max(`data.min_eval_windows`, ceil(n_train_windows * f / (1 - f))) held-out windows, f being
  `eval_fraction`: the held-out share of the windows is at least f, as when the whole corpus was packed, and the
  later stages find what they read by default (eval: `eval.n_windows` = 64 windows, `eval.n_ce_windows` = 16 of
  them; `--cache.dataset-split eval`: every held-out window; raise `--data.min-eval-windows` for more).
Windows are counted exactly, so no margin beyond rounding up is needed. Memory holds the windows packed, one
tokenizer batch and the document being read, whatever the corpus size. A corpus (or `max_docs`) that ends before
N kept training tokens is refused, saying how many tokens it held; one that ends short of held-out windows keeps
what it has, with a warning. Without `n_train_tokens` the whole corpus (or `max_docs` documents) is packed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from saelab.config import DataConfig
from saelab.data.corpus import (
    BUNDLED_WIKIPEDIA,
    DataError,
    is_pretokenised,
    iter_documents,
    iter_token_documents,
)
from saelab.run import atomic

__all__ = [
    "BUNDLED_WIKIPEDIA",
    "DataError",
    "TokenWindows",
    "build_windows",
    "iter_documents",
    "read_held_out",
    "read_windows",
]

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 256
"""Documents tokenised per call of the (fast, batched) tokenizer."""


WINDOWS = "data/windows.npz"
"""The run's token windows, relative to the run folder (written by collect, read by every later stage)."""


@dataclass(frozen=True)
class TokenWindows:
    """Token windows and their split; `keep` marks positions that enter training and metrics."""

    tokens: np.ndarray
    """[n_windows, ctx_len] int32 token ids."""
    keep: np.ndarray
    """[n_windows, ctx_len] bool: False at excluded positions (leading positions, special tokens)."""
    eval_idx: np.ndarray
    """Indices of held-out windows."""
    train_idx: np.ndarray
    """Indices of the other windows."""

    def sha256(self) -> str:
        """Hash of the data slice: tokens, exclusion mask and split."""
        h = hashlib.sha256()
        for arr in (self.tokens, self.keep, self.eval_idx, self.train_idx):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def kept_before_batches(self, idx: np.ndarray, batch_size: int) -> np.ndarray:
        """Kept positions before each batch of `batch_size` windows of `idx`, in order: [n_batches + 1], from 0 to
        the total (where a resumed stage finds the batch to start from)."""
        if len(idx) == 0:
            return np.zeros(1, dtype=np.int64)
        per_batch = np.add.reduceat(self.keep[idx].sum(axis=1), np.arange(0, len(idx), batch_size))
        return np.concatenate([[0], np.cumsum(per_batch)])

    def save(self, path: Path) -> None:
        with atomic.atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: savez adds no suffix
            np.savez(f, tokens=self.tokens, keep=self.keep, eval_idx=self.eval_idx, train_idx=self.train_idx)

    @classmethod
    def load(cls, path: Path) -> TokenWindows:
        with np.load(path) as f:
            return cls(f["tokens"], f["keep"], f["eval_idx"], f["train_idx"])

    def save_run(self, run_folder: Path) -> str:
        """Save as the run's windows; returns the path relative to the run folder."""
        (run_folder / WINDOWS).parent.mkdir(parents=True, exist_ok=True)
        self.save(run_folder / WINDOWS)
        return WINDOWS

    @classmethod
    def load_run(cls, run_folder: Path) -> TokenWindows:
        """The run's windows."""
        return cls.load(run_folder / WINDOWS)


def build_windows(
    cfg: DataConfig, tokenizer: Any, seed: int, n_train_tokens: int | None = None
) -> TokenWindows:
    """The corpus's windows, split and masked; reading stops once the training windows hold `n_train_tokens`
    kept positions and the held-out windows their share (module docstring); None packs the whole corpus."""
    return read_windows(cfg, tokenizer, seed, n_train_tokens).windows


def read_windows(cfg: DataConfig, tokenizer: Any, seed: int, n_train_tokens: int | None = None) -> CorpusRead:
    """`build_windows`, with what was read."""
    budget = _Budget(n_train_tokens, cfg.min_eval_windows, cfg.eval_fraction) if n_train_tokens else None
    packer, n_docs, exhausted = _read(cfg, tokenizer, seed, budget)
    if exhausted:
        _check_exhausted(cfg, packer, budget, n_docs)
    return _corpus_read(cfg, seed, packer, n_docs, exhausted)


def read_held_out(cfg: DataConfig, tokenizer: Any, seed: int) -> CorpusRead:
    """The held-out windows alone, `data.min_eval_windows` of them (a run whose training windows are streamed,
    `saelab.data.stream`): the training documents are passed over without tokenising."""
    budget = _Budget(0, cfg.min_eval_windows, cfg.eval_fraction)
    packer, n_docs, exhausted = _read(cfg, tokenizer, seed, budget)
    if exhausted and packer.n_windows[True] == 0:
        raise _no_held_out_window(cfg, n_docs)
    if exhausted:
        log.warning(
            "the corpus ended with %d held-out windows, fewer than the %d of --data.min-eval-windows",
            packer.n_windows[True],
            cfg.min_eval_windows,
        )
    return _corpus_read(cfg, seed, packer, n_docs, exhausted)


def _corpus_read(cfg: DataConfig, seed: int, packer: _Packer, n_docs: int, exhausted: bool) -> CorpusRead:
    n_held = sum(held_out(seed, i, cfg.eval_fraction) for i in range(n_docs))
    return CorpusRead(packer.windows(), n_docs, n_held, packer.tokens, exhausted)


def _read(cfg: DataConfig, tokenizer: Any, seed: int, budget: _Budget | None) -> tuple[_Packer, int, bool]:
    """Pack documents until `budget` is met (or the corpus ends): the packer, the documents read, and whether
    the corpus ended first."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    packer = _Packer(cfg, eos, sorted(set(tokenizer.all_special_ids)))
    docs = corpus_documents(cfg, tokenizer)
    reader = _Reader(docs, cfg, seed)
    last = None
    try:
        for batch in reader.batches(packer, budget):
            if (last := packer.feed(batch, tokenizer, budget)) is not None:
                break
    finally:
        docs.close()
    return packer, (reader.count if last is None else last + 1), last is None


def corpus_documents(cfg: DataConfig, tokenizer: Any) -> Generator[Any, None, None]:
    """The corpus's documents in reading order: texts, or 1-D token-id arrays of a pre-tokenised corpus."""
    if is_pretokenised(cfg.dataset, cfg.token_field):
        return iter_token_documents(cfg.dataset, cfg.token_field, len(tokenizer), tokenizer.eos_token_id)
    return iter_documents(cfg.dataset, cfg.text_field)


def held_out(seed: int, index: int, fraction: float) -> bool:
    """Whether document `index` (0-based, in reading order) is held out: blake2b of (seed, index) read as a
    uniform number in [0, 1), below `fraction`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class CorpusRead(NamedTuple):
    """The windows and what was read to pack them."""

    windows: TokenWindows
    documents: int
    """Documents read, both splits (with a budget, up to the one that completed it)."""
    held_out_documents: int
    tokens: int
    """Tokens of the documents packed, EOS included (documents skipped once their split had enough are not)."""
    exhausted: bool
    """The corpus (or `max_docs`) ended before the budget was met (always True without a budget)."""


@dataclass(frozen=True)
class _Budget:
    """When reading stops (module docstring)."""

    n_train_tokens: int
    min_eval_windows: int
    eval_fraction: float

    def train_done(self, p: _Packer) -> bool:
        return p.kept[False] >= self.n_train_tokens

    def eval_target(self, p: _Packer) -> int:
        share = p.n_windows[False] * self.eval_fraction / (1 - self.eval_fraction)
        return max(self.min_eval_windows, math.ceil(share - 1e-9))

    def wants(self, p: _Packer, held: bool) -> bool:
        """Whether a document of this split still adds to what the run needs."""
        if not held:
            return not self.train_done(p)
        return not self.train_done(p) or p.n_windows[True] < self.eval_target(p)

    def done(self, p: _Packer) -> bool:
        return self.train_done(p) and p.n_windows[True] >= self.eval_target(p)


class _Reader:
    """The corpus's documents, numbered and split, at most `max_docs`, in batches of those still wanted."""

    def __init__(self, docs: Iterator[Any], cfg: DataConfig, seed: int) -> None:
        self.docs, self.cfg, self.seed = docs, cfg, seed
        self.count = 0
        """Documents read so far."""

    def batches(self, packer: _Packer, budget: _Budget | None) -> Iterator[list[tuple[int, bool, Any]]]:
        batch: list[tuple[int, bool, Any]] = []
        for index, doc in enumerate(tqdm(self.docs, desc="read corpus", unit="doc", leave=False)):
            self.count = index + 1
            held = held_out(self.seed, index, self.cfg.eval_fraction)
            if budget is None or budget.wants(packer, held):
                batch.append((index, held, doc))
            if len(batch) == TOKENIZE_BATCH:
                yield batch
                batch = []
            if self.count == self.cfg.max_docs:
                break
        if batch:
            yield batch


@dataclass
class _Packer:
    """Two token streams (training, held out), each document followed by EOS, cut into windows as they fill."""

    cfg: DataConfig
    eos: int
    special: list[int]
    buffers: dict[bool, list[int]] = field(default_factory=lambda: {False: [], True: []})
    n_windows: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    kept: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    """Kept positions of each split's windows."""
    tokens: int = 0
    blocks: list[tuple[bool, np.ndarray]] = field(default_factory=list)
    """Windows [n, ctx_len] in the order they were completed, each block with its split."""

    def feed(self, batch: list[tuple[int, bool, Any]], tokenizer: Any, budget: _Budget | None) -> int | None:
        """Tokenise and pack `batch` in order; the index of the document that completed the budget, if one did
        (the documents after it are dropped, so where reading stops does not depend on the batch size)."""
        texts = [doc for _, _, doc in batch if isinstance(doc, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for index, held, doc in batch:
            ids = next(encoded) if isinstance(doc, str) else doc.tolist()
            if budget is not None and not budget.wants(self, held):
                continue
            self.add(ids, held, budget.n_train_tokens if budget is not None and not held else None)
            if budget is not None and budget.done(self):
                return index
        return None

    def add(self, ids: Sequence[int], held: bool, kept_limit: int | None = None) -> None:
        """Pack one document; with `kept_limit`, no window past the one that brings the split's kept positions
        to it (collect takes exactly those windows)."""
        buf, ctx = self.buffers[held], self.cfg.ctx_len
        buf.extend(ids)
        buf.append(self.eos)
        self.tokens += len(ids) + 1
        n = len(buf) // ctx
        if n:
            block = np.asarray(buf[: n * ctx], dtype=np.int32).reshape(n, ctx)
            del buf[: n * ctx]
            kept_W = self.kept[held] + np.cumsum(self.keep(block).sum(axis=1))
            if kept_limit is not None and kept_W[-1] >= kept_limit:
                block = block[: int(np.searchsorted(kept_W, kept_limit)) + 1]
            self.blocks.append((held, block))
            self.n_windows[held] += len(block)
            self.kept[held] = int(kept_W[len(block) - 1])

    def keep(self, tokens: np.ndarray) -> np.ndarray:
        return keep_mask(tokens, self.cfg, self.special)

    def windows(self) -> TokenWindows:
        tokens = np.concatenate([b for _, b in self.blocks]).reshape(-1, self.cfg.ctx_len)
        held = np.concatenate([np.full(len(b), h) for h, b in self.blocks])
        return TokenWindows(tokens, self.keep(tokens), np.flatnonzero(held), np.flatnonzero(~held))


def keep_mask(tokens: np.ndarray, cfg: DataConfig, special: Sequence[int]) -> np.ndarray:
    """[n, ctx_len] bool: False at the positions excluded from training and metrics (the first
    `cfg.exclude_first` of each window, and special tokens when `cfg.exclude_special`)."""
    keep = np.ones_like(tokens, dtype=bool)
    keep[:, : cfg.exclude_first] = False
    if cfg.exclude_special:
        keep &= ~np.isin(tokens, np.asarray(special, dtype=np.int32))
    return keep


def _documents_read(cfg: DataConfig, n_docs: int) -> str:
    limited = bool(cfg.max_docs) and n_docs == cfg.max_docs
    return f"{n_docs} documents" + (" (the --data.max-docs limit)" if limited else "")


def _no_held_out_window(cfg: DataConfig, n_docs: int) -> DataError:
    return DataError(
        f"dataset {cfg.dataset!r} gives no held-out window: the held-out documents among its "
        f"{_documents_read(cfg, n_docs)} (eval_fraction {cfg.eval_fraction}) hold fewer than {cfg.ctx_len} tokens; "
        "raise --data.eval-fraction, lower --data.ctx-len or use a larger corpus"
    )


def _check_exhausted(cfg: DataConfig, p: _Packer, budget: _Budget | None, n_docs: int) -> None:
    """Refuse a corpus that ended before the run had what it needs; warn when it is short of held-out windows."""
    total = p.n_windows[False] + p.n_windows[True]
    if total < 2:
        raise DataError(
            f"dataset {cfg.dataset!r} gives {p.tokens} tokens, fewer than two windows of {cfg.ctx_len}; "
            "use a larger corpus or a smaller --data.ctx-len"
        )
    ended = _documents_read(cfg, n_docs)
    if budget is not None and not budget.train_done(p):
        raise DataError(
            f"dataset {cfg.dataset!r} ran out after {ended} and {p.tokens} tokens: its training windows hold "
            f"{p.kept[False]} kept tokens, fewer than the {budget.n_train_tokens} asked; lower "
            f"--collect.n-train-tokens to at most {p.kept[False]}, or use a larger corpus"
        )
    if p.n_windows[True] == 0:
        raise _no_held_out_window(cfg, n_docs)
    if p.n_windows[False] == 0:
        raise DataError(
            f"dataset {cfg.dataset!r} gives no training window: its {ended} are (nearly) all held out; lower "
            "--data.eval-fraction or use a larger corpus"
        )
    if budget is not None and p.n_windows[True] < budget.eval_target(p):
        log.warning(
            "the corpus ended with %d held-out windows, fewer than the %d wanted (eval takes eval.n_windows of "
            "them); use a larger corpus or raise --data.eval-fraction",
            p.n_windows[True],
            budget.eval_target(p),
        )
