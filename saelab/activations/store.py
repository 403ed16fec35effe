"""Activation collection and the activation sources the trainer reads.

Collection: residual-stream activations at a hookpoint, forward stopped after the hooked layer. Only positions kept
by the data stage's mask (no leading position, no special token) are stored, so the massive activations at position
0 never reach training. Two on-disk forms:
- one file (`Activations`): `acts` [N, d_in] and `window`/`pos` [N] (where each row came from), written under a
  temporary name and renamed when complete; training loads it whole (`TensorSource`);
- a sharded store (`ActivationStoreWriter` / `ActivationStore`): `shard-00000.safetensors`, ... of `shard_rows` rows
  each, plus `store.json`; collect writes it shard by shard and training streams it (`StoreSource`) through a
  bounded shuffle buffer, so memory does not grow with the token count.

Both sources give the trainer the same interface (`BatchSource`): `epoch(gen, batch_size, start, part)` yields the
batches of one epoch in an order drawn from `gen` alone, starting at batch `start` (a resumed run skips what it has
done without reading it) and giving each data-parallel rank its `part` of every batch.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saelab.data.windows import TokenWindows
from saelab.models.loading import LoadedModel, capture, forward_until
from saelab.run import atomic

STORE_MANIFEST = "store.json"
_STORE_FORMAT = "saelab-activation-store"
_PROGRESS = "progress.json"


class ActivationError(ValueError):
    """Activations are unusable (NaN/inf, wrong shape); the message says what to do."""


@dataclass(frozen=True)
class Activations:
    """Collected activations and where each row came from."""

    acts_ND: torch.Tensor
    window_N: torch.Tensor
    """Window index (into TokenWindows.tokens) of each row."""
    pos_N: torch.Tensor
    """Position inside the window of each row."""

    def save(self, path: Path) -> None:
        with atomic.atomic_path(path) as tmp:
            save_file({"acts": self.acts_ND, "window": self.window_N, "pos": self.pos_N}, str(tmp))

    @classmethod
    def load(cls, path: Path) -> Activations:
        if not path.exists():
            raise ActivationError(f"{path} is missing; run `saelab collect` first")
        t = load_file(str(path))
        return cls(t["acts"], t["window"], t["pos"])

    def to_store(self, folder: Path, shard_rows: int) -> ActivationStore:
        """The same rows as a sharded store (in order)."""
        writer = ActivationStoreWriter(folder, shard_rows, self.acts_ND.dtype)
        writer.append(self.acts_ND, self.window_N, self.pos_N)
        return writer.close()


def iter_window_batches(
    lm: LoadedModel, windows: TokenWindows, idx: np.ndarray, hookpoint: str, batch_size: int, desc: str
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (window indices, activations [b, T, D]) for the windows `idx`, stopping each forward early."""
    device = lm.device
    for start in tqdm(range(0, len(idx), batch_size), desc=desc, unit="batch", leave=False):
        batch = idx[start : start + batch_size]
        ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long, device=device)
        with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, ids)
        yield batch, store[hookpoint].float()


def _kept_rows(
    lm: LoadedModel,
    windows: TokenWindows,
    hookpoint: str,
    n_tokens: int,
    batch_size: int,
    store_dtype: torch.dtype,
    skip_rows: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(acts, window, pos) of the kept positions, batch by batch, over enough training windows for `n_tokens`.

    `skip_rows` rows already stored are not yielded again: the forwards start at the batch holding the first
    missing row, with the same batch boundaries as a run from the start (so the rows come out bit for bit the
    same), and the rows of that batch before it are dropped."""
    keep_per_window = windows.keep[windows.train_idx].sum(axis=1)
    n_windows = int(np.searchsorted(np.cumsum(keep_per_window), n_tokens) + 1)
    if n_windows > len(windows.train_idx):
        raise ActivationError(
            f"asked for {n_tokens} training tokens but the training split holds {int(keep_per_window.sum())}; "
            "lower --collect.n-train-tokens or use a larger corpus"
        )
    idx = windows.train_idx[:n_windows]
    before = windows.kept_before_batches(idx, batch_size)
    first = int(np.searchsorted(before, skip_rows, side="right") - 1)
    drop = skip_rows - int(before[first])
    for batch, a_BTD in iter_window_batches(
        lm, windows, idx[first * batch_size :], hookpoint, batch_size, "collect"
    ):
        keep = torch.as_tensor(windows.keep[batch], device=a_BTD.device)
        w, p = keep.cpu().nonzero(as_tuple=True)
        acts = a_BTD[keep].to(store_dtype).cpu()
        win = torch.as_tensor(batch, dtype=torch.int32)[w]
        yield acts[drop:], win[drop:], p.to(torch.int32)[drop:]
        drop = 0


def collect(
    lm: LoadedModel,
    windows: TokenWindows,
    hookpoint: str,
    n_tokens: int,
    batch_size: int,
    store_dtype: torch.dtype = torch.float32,
) -> Activations:
    """Collect at least `n_tokens` kept-position activations from the training windows (in order)."""
    chunks = list(_kept_rows(lm, windows, hookpoint, n_tokens, batch_size, store_dtype))
    acts, win, pos = (torch.cat(parts) for parts in zip(*chunks))
    out = Activations(acts, win, pos)
    check_finite(out.acts_ND, "collected activations")
    return out


@dataclass
class CollectProgress:
    """What one `collect_to_store` call did."""

    resumed_rows: int = 0
    """Rows kept from an interrupted collect's finished shards (not collected again)."""
    forward_batches: int = 0
    """Forward passes this call ran."""


def collect_to_store(
    lm: LoadedModel,
    windows: TokenWindows,
    hookpoint: str,
    n_tokens: int,
    batch_size: int,
    folder: Path,
    shard_rows: int,
    store_dtype: torch.dtype = torch.float32,
    *,
    key: str = "",
    resume: bool = False,
    progress: CollectProgress | None = None,
) -> ActivationStore:
    """`collect`, written shard by shard into a store at `folder` (memory holds one shard, not all rows).

    `key` names everything that decides the rows (model, windows, hookpoint, batch size, dtype, shard size); it is
    recorded beside every finished shard. With `resume`, the finished shards of an interrupted call with the same
    key are kept and only the rows after them are collected (see `ActivationStoreWriter`)."""
    writer = ActivationStoreWriter(folder, shard_rows, store_dtype, key=key, resume=resume)
    progress = progress if progress is not None else CollectProgress()
    progress.resumed_rows = writer.n_written
    rows = _kept_rows(lm, windows, hookpoint, n_tokens, batch_size, store_dtype, skip_rows=writer.n_written)
    for acts, win, pos in rows:
        progress.forward_batches += 1
        writer.append(acts, win, pos)
    return writer.close()


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse NaN / inf activations with a message saying how many and where to look."""
    # NaN and inf propagate through a sum, so a finite sum (one pass, no [N, D] mask) clears the data; otherwise
    # (bad values, or a sum that overflowed) the elementwise mask decides, and counts and locates them.
    if x.numel() == 0 or math.isfinite(float(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=-1).nonzero().flatten()
        raise ActivationError(
            f"{what} contain {int(bad.sum())} NaN/inf values in {len(rows)} rows (first row {int(rows[0])}); "
            "check the model dtype (try --model.dtype float32) and the input tokens"
        )


# --- the sharded store -------------------------------------------------------------------------------------------


class ActivationStoreWriter:
    """Writes rows as shards of `shard_rows` rows plus `store.json`; memory holds at most one shard of pending rows.

    The store is built in `<folder>.tmp` and renamed to `folder` by `close()`, so a killed collect never leaves a
    store that looks complete. After each shard, `progress.json` in the temporary folder lists the finished shards
    and `key`. With `resume`, a temporary folder whose `progress.json` has the same key is continued: its listed
    shards are kept (`n_written` rows; anything else there, such as a shard cut short by the kill, is removed) and
    the next rows appended go into the next shard. Otherwise, or with another key, it starts afresh."""

    def __init__(
        self,
        folder: Path,
        shard_rows: int,
        dtype: torch.dtype = torch.float32,
        key: str = "",
        resume: bool = False,
    ) -> None:
        if shard_rows <= 0:
            raise ActivationError(f"shard_rows must be > 0, got {shard_rows}")
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(self.folder.name + ".tmp")
        self.shard_rows, self.dtype, self.key = shard_rows, dtype, key
        self.d_in = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._n_pending = 0
        self._shards: list[dict[str, int | str]] = []
        done = self._finished_shards() if resume else None
        if done is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        else:
            self._shards, self.d_in = done
            listed = {str(s["file"]) for s in self._shards} | {_PROGRESS}
            for path in self.tmp.iterdir():
                if path.name not in listed:
                    path.unlink()

    @property
    def n_written(self) -> int:
        """Rows in finished shards."""
        return sum(int(s["rows"]) for s in self._shards)

    def _finished_shards(self) -> tuple[list[dict[str, int | str]], int] | None:
        """The shards and width an interrupted writer with this key finished, or None."""
        try:
            progress = json.loads((self.tmp / _PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        if progress.get("key") != self.key or progress.get("shard_rows") != self.shard_rows:
            return None
        shards = progress["shards"]
        if not all((self.tmp / s["file"]).exists() for s in shards):
            return None
        return shards, int(progress["d_in"])

    def append(self, acts_ND: torch.Tensor, window_N: torch.Tensor, pos_N: torch.Tensor) -> None:
        check_finite(acts_ND, "collected activations")
        if self.d_in and acts_ND.shape[1] != self.d_in:
            raise ActivationError(
                f"rows of width {acts_ND.shape[1]} appended to a store of width {self.d_in}"
            )
        self.d_in = acts_ND.shape[1]
        self._pending.append((acts_ND.to(self.dtype).cpu(), window_N.to(torch.int32), pos_N.to(torch.int32)))
        self._n_pending += acts_ND.shape[0]
        while self._n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        acts, win, pos = (torch.cat(parts) for parts in zip(*self._pending))
        name = f"shard-{len(self._shards):05d}.safetensors"
        tensors = {"acts": acts[:n].contiguous(), "window": win[:n].contiguous(), "pos": pos[:n].contiguous()}
        save_file(tensors, str(self.tmp / name))
        self._shards.append({"file": name, "rows": n})
        progress = {"key": self.key, "shard_rows": self.shard_rows, "d_in": self.d_in, "shards": self._shards}
        atomic.write_json(self.tmp / _PROGRESS, progress)
        self._pending = [(acts[n:], win[n:], pos[n:])] if acts.shape[0] > n else []
        self._n_pending = acts.shape[0] - n

    def close(self) -> ActivationStore:
        if self._n_pending:
            self._flush(self._n_pending)
        if not self._shards:
            raise ActivationError(f"no activations were written to {self.folder}")
        manifest = {
            "format": _STORE_FORMAT,
            "version": 1,
            "d_in": self.d_in,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_rows": sum(int(s["rows"]) for s in self._shards),
            "shards": self._shards,
        }
        (self.tmp / _PROGRESS).unlink(missing_ok=True)
        (self.tmp / STORE_MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(self.folder, ignore_errors=True)
        self.tmp.rename(self.folder)
        return ActivationStore(self.folder)


class ActivationStore:
    """A sharded activation store on disk (read-only); rows are numbered across shards in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / STORE_MANIFEST
        if not path.exists():
            raise ActivationError(f"{path} is missing; {self.folder} is not a complete activation store")
        m = json.loads(path.read_text())
        if m.get("format") != _STORE_FORMAT:
            raise ActivationError(f"{path} is not a saelab activation store manifest")
        self.d_in: int = m["d_in"]
        self.files: list[str] = [s["file"] for s in m["shards"]]
        self.shard_rows: list[int] = [s["rows"] for s in m["shards"]]
        self.offsets = torch.tensor([0, *np.cumsum(self.shard_rows).tolist()], dtype=torch.long)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def read_shard(self, i: int) -> torch.Tensor:
        """Shard `i`'s activations as float32 [rows, d_in] (NaN/inf refused)."""
        acts = load_file(str(self.folder / self.files[i]))["acts"].float()
        check_finite(acts, f"activations in {self.folder / self.files[i]}")
        return acts

    def head(self, n: int) -> torch.Tensor:
        """The first `n` rows (fewer if the store is smaller)."""
        parts, got = [], 0
        for i in range(len(self.files)):
            if got >= n:
                break
            parts.append(self.read_shard(i)[: n - got])
            got += parts[-1].shape[0]
        return torch.cat(parts)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows by global index, in the order given, as float32; only those rows are read (memory-mapped)."""
        out = torch.empty(len(ids), self.d_in)
        shard_of = torch.searchsorted(self.offsets[1:], ids, right=True)
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().flatten()
            with safe_open(str(self.folder / self.files[s]), framework="pt") as f:
                acts = f.get_slice("acts")
                out[where] = torch.stack(
                    [acts[i : i + 1][0] for i in (ids[where] - self.offsets[s]).tolist()]
                ).float()
        check_finite(out, f"activations in {self.folder}")
        return out

    def load(self) -> Activations:
        """Every row with its window and position, in memory (for small stores)."""
        parts = [load_file(str(self.folder / f)) for f in self.files]
        return Activations(*(torch.cat([p[k] for p in parts]) for k in ("acts", "window", "pos")))
