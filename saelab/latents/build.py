"""Building the latent cache in bounded memory: encode in chunks, spill sorted runs, merge into latent shards.

An external sort. Tokens arrive in order in chunks of activations; each chunk is encoded and its nonzeros
(token, latent, value) join a buffer. When the buffer holds `buffer_nnz` nonzeros it is sorted by latent (stable,
so tokens stay ascending) and spilled to disk as a run. The merge then writes latent-range shards of about
`shard_nnz` nonzeros: for a block of latents holding at most `buffer_nnz` nonzeros it gathers the block's slice
of every run (memory-mapped) and sorts it by latent; a latent with more nonzeros than that alone is copied run by
run. Shards are safetensors files written piecewise (`writer.SafetensorsWriter`), so no array of the whole cache ever
exists in memory. Memory: one encoded batch, the buffer, one merge block and [F]-sized statistics, whatever the
number of tokens.

Chunk sources: `chunks_from_activations` (in memory), `chunks_from_file` (collect's single file, read by slices),
`chunks_from_store` (the sharded store); the eval split comes from the model (`pipeline.stage_cache`).
Run through `saelab cache --run-dir RUN` (see `CacheConfig`); `benchmarks/latent_cache.py` measures it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from saelab.activations.store import Activations, ActivationStore
from saelab.config import CacheConfig, to_dict
from saelab.latents.cache import (
    MANIFEST,
    STATS,
    TOKENS,
    CacheError,
    CacheInfo,
    LatentCache,
    LatentStats,
    ShardInfo,
)
from saelab.latents.writer import SafetensorsWriter
from saelab.run import atomic
from saelab.sae.base import SAE

Chunk = tuple[torch.Tensor, np.ndarray, np.ndarray]
"""(acts [B, D], window [B] int32, pos [B] int32) of consecutive cached tokens."""
ChunkSource = Iterable[Chunk] | Callable[[int], Iterable[Chunk]]
"""Chunks, or a function giving the chunks from a token index on (a resumed build starts after what it has)."""
Run = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A spilled run, memory-mapped: (indptr [F+1], token indices, values), sorted by latent then token."""

_PROGRESS = "progress.npz"


@dataclass
class CacheProgress:
    """What one `build_cache` call did."""

    resumed_tokens: int = 0
    """Tokens encoded by an interrupted build and kept (not encoded again)."""
    encoded_chunks: int = 0
    """Chunks this call encoded."""


FLOAT16_MAX = float(np.finfo(np.float16).max)


class _Runs:
    """Sorted runs spilled to `folder`: per run `indptr` [F+1], `tok` and `val` sorted by latent, then token."""

    def __init__(self, folder: Path, d_sae: int, n: int = 0) -> None:
        self.folder, self.F, self.n = folder, d_sae, n
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():  # a run a killed build spilled after its last checkpoint
            if int(path.name.split("-")[0]) >= n:
                path.unlink()

    def spill(self, tok: np.ndarray, lat: np.ndarray, val: np.ndarray) -> None:
        order = np.argsort(lat, kind="stable")  # tokens arrive ascending, so they stay ascending per latent
        indptr = np.concatenate([[0], np.cumsum(np.bincount(lat, minlength=self.F))]).astype(np.int64)
        for name, arr in (("indptr", indptr), ("tok", tok[order]), ("val", val[order])):
            np.save(self.folder / f"{self.n:05d}-{name}.npy", arr)
        self.n += 1

    def open(self) -> list[Run]:
        def load(i: int, name: str) -> np.ndarray:
            return np.load(self.folder / f"{i:05d}-{name}.npy", mmap_mode="r")

        return [(load(i, "indptr"), load(i, "tok"), load(i, "val")) for i in range(self.n)]


class _Accumulator:
    """Encodes chunks, keeps [F] counts/sums/maxima, spills nonzeros in runs and token origins to raw files.

    After every spill it checkpoints (`progress.npz`: `key`, tokens and runs so far, the [F] statistics; one
    atomic rename), so `resume` continues a killed build from its last spill with the same statistics, runs and
    token files it had then."""

    def __init__(self, sae: SAE, folder: Path, buffer_nnz: int, key: str, resume: bool) -> None:
        self.sae, self.buffer_nnz, self.folder, self.key = sae, buffer_nnz, folder, key
        F = sae.cfg.d_sae
        self.count_F = np.zeros(F, dtype=np.int64)
        self.sum_F = np.zeros(F, dtype=np.float64)
        self.max_F = np.zeros(F, dtype=np.float32)
        self.n_tokens = n_runs = 0
        saved = self._saved() if resume else None
        if saved is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        else:  # a kill during a checkpoint leaves its temporary file, which the finished cache must not hold
            atomic.sweep_temporaries(folder)
            self.count_F, self.sum_F, self.max_F = saved["count"], saved["sum"], saved["max"]
            self.n_tokens, n_runs = int(saved["n_tokens"]), int(saved["n_runs"])
        self.resumed_tokens, self.encoded_chunks = self.n_tokens, 0
        self.runs = _Runs(folder / "runs", F, n_runs)
        self.window_f = self._token_file("window.bin")
        self.pos_f = self._token_file("pos.bin")
        self.buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_buf = 0
        self.device = next(sae.parameters()).device

    def _saved(self) -> dict[str, np.ndarray] | None:
        """The last checkpoint of a build with this key in `folder`, or None."""
        try:
            with np.load(self.folder / _PROGRESS) as z:
                saved = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            return None
        if str(saved["key"]) != self.key or saved["count"].shape != self.count_F.shape:
            return None
        return saved

    def _token_file(self, name: str) -> BinaryIO:
        """The raw int32 file of `name`, cut to the tokens checkpointed so far and open for appending."""
        f = (self.folder / name).open("r+b" if self.n_tokens else "wb")
        f.truncate(self.n_tokens * 4)
        f.seek(0, 2)
        return f

    def _checkpoint(self) -> None:
        self.window_f.flush()
        self.pos_f.flush()
        with atomic.atomic_path(self.folder / _PROGRESS) as tmp, tmp.open("wb") as f:
            np.savez(
                f, key=np.array(self.key), n_tokens=self.n_tokens, n_runs=self.runs.n,
                count=self.count_F, sum=self.sum_F, max=self.max_F,
            )  # fmt: skip

    @torch.no_grad()
    def add(self, acts_BD: torch.Tensor, window_B: np.ndarray, pos_B: np.ndarray) -> None:
        code = self.sae.encode(acts_BD.to(device=self.device, dtype=torch.float32))
        nz_BK = code.top_acts_BK > 0
        rows_BK = torch.arange(acts_BD.shape[0], device=self.device)[:, None].expand_as(nz_BK)
        tok = (rows_BK[nz_BK].cpu().numpy() + self.n_tokens).astype(np.int32)
        lat = code.top_idx_BK[nz_BK].cpu().numpy().astype(np.int32)
        val = code.top_acts_BK[nz_BK].float().cpu().numpy()
        self.encoded_chunks += 1
        self.count_F += np.bincount(lat, minlength=len(self.count_F))
        self.sum_F += np.bincount(lat, weights=val, minlength=len(self.count_F))
        np.maximum.at(self.max_F, lat, val)
        np.asarray(window_B, dtype=np.int32).tofile(self.window_f)
        np.asarray(pos_B, dtype=np.int32).tofile(self.pos_f)
        self.n_tokens += acts_BD.shape[0]
        if self.n_tokens >= 2**31:
            raise CacheError(
                "a latent cache holds at most 2**31 tokens (int32 token indices); lower cache.n_tokens"
            )
        self.buf.append((tok, lat, val))
        self.n_buf += len(tok)
        if self.n_buf >= self.buffer_nnz:
            self.flush()

    def flush(self) -> None:
        parts, self.buf, self.n_buf = self.buf, [], 0
        if parts:
            tok, lat, val = (np.concatenate(column) for column in zip(*parts))
            del parts  # the chunks' arrays go before the sort allocates its own
            self.runs.spill(tok, lat, val)
            self._checkpoint()

    def close(self) -> None:
        self.flush()
        self.window_f.close()
        self.pos_f.close()


def _ranges(count_F: np.ndarray, start: int, end: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive latent ranges of [start, end) holding at most `budget` nonzeros each (a latent with more alone)."""
    out, a, held = [], start, 0
    for f in range(start, end):
        c = int(count_F[f])
        if held and held + c > budget:
            out.append((a, f))
            a, held = f, 0
        held += c
    out.append((a, end))
    return out


def _quantiles(vals_sorted: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest-rank quantiles of ascending values (zeros when empty)."""
    if len(vals_sorted) == 0:
        return np.zeros(len(levels), dtype=np.float32)
    return vals_sorted[np.round(levels * (len(vals_sorted) - 1)).astype(np.int64)]


def _write_block(
    w: SafetensorsWriter, runs: list[Run], a: int, b: int, at: int, levels: np.ndarray
) -> np.ndarray:
    """Gather latents [a, b) from every run, write them from nonzero `at` on; returns their quantiles [b-a, Q]."""
    toks, vals, lats = [], [], []
    counts = np.zeros(b - a, dtype=np.int64)
    for indptr, tok, val in runs:
        s, e = int(indptr[a]), int(indptr[b])
        toks.append(tok[s:e])
        vals.append(val[s:e])
        n_run = np.diff(np.asarray(indptr[a : b + 1]))
        lats.append(np.repeat(np.arange(a, b, dtype=np.int32), n_run))
        counts += n_run
    # runs come in token order, so a stable sort keeps each latent's tokens ascending
    order = np.argsort(np.concatenate(lats), kind="stable")
    del lats
    w.write_at("token_idx", at, np.concatenate(toks)[order])
    sorted_val = np.concatenate(vals)[order]
    del order
    w.write_at("values", at, sorted_val)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return np.stack(
        [_quantiles(np.sort(sorted_val[bounds[i] : bounds[i + 1]]), levels) for i in range(b - a)]
    )


def _write_big_latent(
    w: SafetensorsWriter, runs: list[Run], f: int, at: int, levels: np.ndarray, budget: int
) -> np.ndarray:
    """Copy one latent with more than `budget` nonzeros run by run; quantiles from a strided subsample."""
    total = sum(int(ip[f + 1] - ip[f]) for ip, _, _ in runs)
    stride = -(-total // budget)
    sample = []
    for indptr, tok, val in runs:
        s, e = int(indptr[f]), int(indptr[f + 1])
        w.write_at("token_idx", at, np.asarray(tok[s:e]))
        w.write_at("values", at, np.asarray(val[s:e]))
        sample.append(np.asarray(val[s:e:stride]))
        at += e - s
    return _quantiles(np.sort(np.concatenate(sample)), levels)


def _merge(
    runs_folder: _Runs, count_F: np.ndarray, folder: Path, cfg: CacheConfig
) -> tuple[list[ShardInfo], np.ndarray, np.ndarray]:
    """Write the shards; returns (shards, quantiles [F, Q], exact [F])."""
    runs = runs_folder.open()
    F, levels = len(count_F), np.asarray(cfg.quantiles, dtype=np.float64)
    quantiles_FQ = np.zeros((F, len(levels)), dtype=np.float32)
    exact_F = count_F <= cfg.buffer_nnz
    shards: list[ShardInfo] = []
    for a, b in _ranges(count_F, 0, F, cfg.shard_nnz):
        indptr = np.concatenate([[0], np.cumsum(count_F[a:b])]).astype(np.int64)
        nnz = int(indptr[-1])
        name = f"shard-{len(shards):05d}.safetensors"
        specs: list[tuple[str, np.dtype[Any], int]] = [
            ("indptr", np.dtype(np.int64), b - a + 1),
            ("token_idx", np.dtype(np.int32), nnz),
            ("values", np.dtype(cfg.value_dtype), nnz),
        ]
        w = SafetensorsWriter(folder / name, specs, {"latent_start": str(a), "latent_end": str(b)})
        w.write_at("indptr", 0, indptr)
        for c, d in _ranges(count_F, a, b, cfg.buffer_nnz):
            at = int(indptr[c - a])
            if d - c == 1 and count_F[c] > cfg.buffer_nnz:
                quantiles_FQ[c] = _write_big_latent(w, runs, c, at, levels, cfg.buffer_nnz)
            else:
                quantiles_FQ[c:d] = _write_block(w, runs, c, d, at, levels)
        w.close()
        shards.append(ShardInfo(name, a, b, nnz))
    return shards, quantiles_FQ, exact_F


def _write_tokens(tmp: Path, n_tokens: int, block: int) -> None:
    """tokens.safetensors from the raw window/pos files, copied block by block."""
    specs = [("window", np.dtype(np.int32), n_tokens), ("pos", np.dtype(np.int32), n_tokens)]
    w = SafetensorsWriter(tmp / TOKENS, specs, {})
    for name in ("window", "pos"):
        raw = np.memmap(tmp / f"{name}.bin", dtype=np.int32, mode="r") if n_tokens else np.zeros(0, np.int32)
        for s in range(0, n_tokens, block):
            w.write_at(name, s, np.asarray(raw[s : s + block]))
        del raw
    w.close()


def build_cache(
    sae: SAE,
    chunks: ChunkSource,
    folder: Path,
    cfg: CacheConfig,
    sae_sha256: str,
    data_sha256: str = "",
    progress: CacheProgress | None = None,
) -> LatentCache:
    """Encode every chunk and write the cache to `folder` (replacing one there); see the module docstring.

    The cache is built in `<folder>.tmp` and renamed when complete, so a killed build never looks finished. With
    `cfg.resume`, an interrupted build of the same SAE, data and settings continues from its last spill: `chunks`
    given as a function of the first token to encode skips the tokens done without producing them (the pipeline's
    sources start there without reading or running the model for them); an iterable is read past them."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    # the spilled runs hold float32 whatever value_dtype is, so a build resumed with another one keeps them
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "value_dtype")}
    key = hashlib.sha256(json.dumps([sae_sha256, data_sha256, settings], sort_keys=True).encode()).hexdigest()
    acc = _Accumulator(sae, tmp, cfg.buffer_nnz, key, cfg.resume)
    source = chunks(acc.n_tokens) if callable(chunks) else _skip_tokens(chunks, acc.n_tokens)
    for acts_BD, window_B, pos_B in tqdm(source, desc="cache latents", unit="batch", leave=False):
        acc.add(acts_BD, window_B, pos_B)
    if progress is not None:
        progress.resumed_tokens, progress.encoded_chunks = acc.resumed_tokens, acc.encoded_chunks
    acc.close()
    if acc.n_tokens == 0:
        raise CacheError("no tokens to cache: the activation source is empty")
    if cfg.value_dtype == "float16" and float(acc.max_F.max(initial=0.0)) > FLOAT16_MAX:
        raise CacheError(
            f"latent activations reach {float(acc.max_F.max()):.4g}, beyond float16's {FLOAT16_MAX:.0f}; pass "
            "--cache.value-dtype float32 --cache.resume (the encoded tokens are kept)"
        )
    shards, quantiles_FQ, exact_F = _merge(acc.runs, acc.count_F, tmp, cfg)
    shutil.rmtree(acc.runs.folder)
    _write_tokens(tmp, acc.n_tokens, cfg.buffer_nnz)
    for name in ("window.bin", "pos.bin", _PROGRESS):
        (tmp / name).unlink()
    n, count = acc.n_tokens, acc.count_F
    mean = np.where(count > 0, acc.sum_F / np.maximum(count, 1), 0.0).astype(np.float32)
    stats = LatentStats(count, count / n, acc.max_F, mean, quantiles_FQ, exact_F, tuple(cfg.quantiles), n)
    stats.save(tmp / STATS)
    nnz = int(count.sum())
    size = sum((tmp / s.file).stat().st_size for s in shards)
    info = CacheInfo(
        sae.cfg.d_sae,
        n,
        nnz,
        cfg.dataset_split,
        sae_sha256,
        data_sha256,
        tuple(shards),
        size / max(1, nnz),
        value_dtype=cfg.value_dtype,
    )
    info.save(tmp / MANIFEST)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return LatentCache.open(folder)


def _skip_tokens(chunks: Iterable[Chunk], n: int) -> Iterator[Chunk]:
    """The chunks after the first `n` tokens (a checkpoint falls between chunks)."""
    seen = 0
    for chunk in chunks:
        if seen >= n:
            yield chunk
        seen += len(chunk[0])
    if seen < n:
        raise CacheError(
            f"the activation source holds {seen} tokens, fewer than the {n} the resumed build had"
        )


# --- chunk sources -----------------------------------------------------------------------------------------------


def check_n_tokens(requested: int, available: int, split: str, fix: str) -> int:
    """Tokens to cache: `requested`, or all `available` when 0; asking for more than the split holds is an error."""
    if requested > available:
        raise CacheError(
            f"cache.n_tokens {requested} is more than the {available} tokens the {split} split holds; "
            f"pass --cache.n-tokens {available} (or 0 for all), or {fix}"
        )
    return requested or available


def chunks_from_activations(acts: Activations, batch_size: int, n_tokens: int = 0) -> Iterator[Chunk]:
    """Chunks of in-memory activations (the first `n_tokens` rows; all when 0)."""
    n = check_n_tokens(n_tokens, acts.acts_ND.shape[0], "collected", "collect more")
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        yield acts.acts_ND[s:e], acts.window_N[s:e].numpy(), acts.pos_N[s:e].numpy()


def chunks_from_file(path: Path, batch_size: int, n_tokens: int, start: int = 0) -> Iterator[Chunk]:
    """Chunks of collect's single activation file from token `start` on, read slice by slice (never the whole
    file)."""
    with safe_open(str(path), framework="pt") as f:
        acts, window, pos = f.get_slice("acts"), f.get_slice("window"), f.get_slice("pos")
        n = check_n_tokens(
            n_tokens, acts.get_shape()[0], "train", "collect more with --collect.n-train-tokens"
        )
        for s in range(start, n, batch_size):
            e = min(n, s + batch_size)
            yield acts[s:e], window[s:e].numpy(), pos[s:e].numpy()


def chunks_from_store(
    store: ActivationStore, batch_size: int, n_tokens: int, start: int = 0
) -> Iterator[Chunk]:
    """Chunks of a sharded activation store from token `start` on, one shard in memory at a time (shards before
    `start` are not read)."""
    n = check_n_tokens(n_tokens, store.n_rows, "train", "collect more with --collect.n-train-tokens")
    for i, file in enumerate(store.files):
        first, end = int(store.offsets[i]), min(n, int(store.offsets[i + 1]))
        if first >= n:
            break
        if end <= start:
            continue
        acts = store.read_shard(i)
        with safe_open(str(store.folder / file), framework="np") as f:
            window, pos = f.get_tensor("window"), f.get_tensor("pos")
        for s in range(0, end - first, batch_size):
            e = min(end - first, s + batch_size)
            if first + s >= start:
                yield acts[s:e], window[s:e], pos[s:e]
