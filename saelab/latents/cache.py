"""Sparse latent cache: an SAE's latent activations over the tokens of one split, stored by latent.

Layout of the cache folder (`latents/` in a run):

    cache.json               format, provenance (sha256 of the SAE and of the data), split, token count, shards
    shard-00000.safetensors  latents [start, end): `indptr` [end-start+1] int64 splits `token_idx` [nnz] int32 and
                             `values` [nnz] float16 (or float32, `cache.value_dtype`) by latent: 6 (8) bytes per
                             nonzero; each latent's tokens ascending; read back as float32
    tokens.safetensors       `window` [N] int32 and `pos` [N] int32: where cached token i came from
    stats.safetensors        per-latent count, frequency, mean and max activation, activation quantiles

`LatentCache.open` reads cache.json and the statistics only; `latent(f)` reads latent f's slice of one shard with
safetensors' `get_slice`, never the rest of the cache. `open` refuses a cache built from another SAE (or other
data) when given the hash it expects. The cache is built in bounded memory by `latent_build.build_cache`.

Run alone: `python -m saelab.latents.cache runs/r1/latents` prints the cache's summary.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = "saelab-latent-cache/2"
LATENTS = "latents"
"""The run's latent cache folder, relative to the run folder."""
MANIFEST = "cache.json"
TOKENS = "tokens.safetensors"
STATS = "stats.safetensors"


class CacheError(ValueError):
    """The latent cache is missing, unreadable, or cannot be built as asked; the message says the fix."""


class CacheMismatchError(CacheError):
    """The cache was built from another SAE or other data than the ones it is read with."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: the latents [start, end) and their nonzeros."""

    file: str
    start: int
    end: int
    nnz: int


@dataclass(frozen=True)
class CacheInfo:
    """The cache's manifest (`cache.json`)."""

    d_sae: int
    """Latents (columns)."""
    n_tokens: int
    """Cached tokens (rows)."""
    nnz: int
    """Nonzero activations stored."""
    dataset_split: str
    """`train` or `eval`: the windows the tokens come from."""
    sae_sha256: str
    """sha256 of the SAE weights file the latents were computed with."""
    data_sha256: str
    """sha256 of the token windows (tokens, exclusion mask, split); empty when unknown."""
    shards: tuple[ShardInfo, ...]
    bytes_per_nonzero: float
    """Size of the shard files (headers and indptr included) per stored nonzero."""
    format: str = FORMAT
    value_dtype: str = "float32"
    """On-disk dtype of `values` (caches written before the setting existed hold float32)."""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> CacheInfo:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise CacheError(f"{path} is not a {FORMAT} manifest; rebuild the cache with `saelab cache`")
        d["shards"] = tuple(ShardInfo(**s) for s in d["shards"])
        return cls(**d)


@dataclass(frozen=True)
class LatentStats:
    """Per-latent statistics over the cached tokens."""

    count: np.ndarray
    """[F] int64 tokens on which the latent fires."""
    frequency: np.ndarray
    """[F] fraction of tokens on which the latent fires."""
    max_act: np.ndarray
    """[F] largest activation (0 for latents that never fire)."""
    mean_act: np.ndarray
    """[F] mean activation over the tokens where it fires (0 for latents that never fire)."""
    quantiles_FQ: np.ndarray
    """[F, Q] activation quantiles over the tokens where the latent fires (nearest rank; 0 where it never
    fires)."""
    quantiles_exact: np.ndarray
    """[F] bool: False where the latent fired on more than `buffer_nnz` tokens and its quantiles come from an
    evenly strided subsample of its activations (memory stays bounded)."""
    levels: tuple[float, ...]
    """Quantile levels (the columns of `quantiles_FQ`)."""
    n_tokens: int

    def save(self, path: Path) -> None:
        arrays = {
            "count": self.count,
            "frequency": self.frequency,
            "max_act": self.max_act,
            "mean_act": self.mean_act,
            "quantiles": self.quantiles_FQ,
            "quantiles_exact": self.quantiles_exact.astype(np.uint8),
        }
        # one metadata entry: safetensors writes several in no fixed order, and the file's sha256 must not vary
        meta = {"stats": json.dumps({"levels": list(self.levels), "n_tokens": self.n_tokens})}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LatentStats:
        t = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
        meta = json.loads(meta["stats"]) if "stats" in meta else meta  # caches written before one entry
        return cls(
            t["count"],
            t["frequency"],
            t["max_act"],
            t["mean_act"],
            t["quantiles"],
            t["quantiles_exact"].astype(bool),
            tuple(json.loads(meta["levels"]) if isinstance(meta["levels"], str) else meta["levels"]),
            int(meta["n_tokens"]),
        )


@dataclass
class LatentCache:
    """A latent cache on disk, read one latent at a time (see module docstring)."""

    folder: Path
    info: CacheInfo
    stats: LatentStats
    _handles: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: Path, sae_sha256: str | None = None, data_sha256: str | None = None) -> LatentCache:
        """Open the cache in `folder`; with `sae_sha256` / `data_sha256`, refuse one built from anything else."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            old = (folder / "latents.safetensors").exists()
            why = "was written by an older saelab" if old else "is missing"
            raise CacheError(f"{path} {why}; run `saelab cache --run-dir {folder.parent}`")
        info = CacheInfo.load(path)
        for what, want, got in (
            ("SAE", sae_sha256, info.sae_sha256),
            ("data", data_sha256, info.data_sha256),
        ):
            if want is not None and got and want != got:
                raise CacheMismatchError(
                    f"the latent cache in {folder} was built from another {what} (sha256 {got[:12]}…, this "
                    f"{what} is {want[:12]}…); re-run `saelab cache --run-dir {folder.parent}` to rebuild it"
                )
        return cls(folder, info, LatentStats.load(folder / STATS))

    @property
    def d_sae(self) -> int:
        return self.info.d_sae

    @property
    def n_tokens(self) -> int:
        return self.info.n_tokens

    @property
    def nnz(self) -> int:
        return self.info.nnz

    def _shard(self, f: int) -> tuple[Any, int]:
        """(open shard holding latent f, f's row in it)."""
        if not 0 <= f < self.d_sae:
            raise IndexError(f"latent {f} out of range [0, {self.d_sae})")
        i = bisect.bisect_right([s.start for s in self.info.shards], f) - 1
        if i not in self._handles:
            self._handles[i] = safe_open(str(self.folder / self.info.shards[i].file), framework="np")
        return self._handles[i], f - self.info.shards[i].start

    def latent(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices [n] int32, activations [n] float32) of latent `f`, in token order; reads only its slice."""
        handle, row = self._shard(f)
        a, b = (int(x) for x in handle.get_slice("indptr")[row : row + 2])
        if a == b:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        return handle.get_slice("token_idx")[a:b], handle.get_slice("values")[a:b].astype(np.float32)

    @cached_property
    def _token_map(self) -> dict[str, np.ndarray]:
        return load_file(str(self.folder / TOKENS))

    @property
    def window_N(self) -> np.ndarray:
        """[N] window index of each cached token."""
        return self._token_map["window"]

    @property
    def pos_N(self) -> np.ndarray:
        """[N] position inside its window of each cached token."""
        return self._token_map["pos"]

    def dense(self) -> np.ndarray:
        """[N, F] float32 dense latents (for tests and small caches: this loads everything)."""
        out = np.zeros((self.n_tokens, self.d_sae), dtype=np.float32)
        for s in self.info.shards:
            t = load_file(str(self.folder / s.file))
            lat = np.repeat(np.arange(s.start, s.end), np.diff(t["indptr"]))
            out[t["token_idx"], lat] = t["values"]
        return out

    def summary(self) -> dict[str, Any]:
        alive = self.stats.count > 0
        return {
            "d_sae": self.d_sae,
            "n_tokens": self.n_tokens,
            "nnz": self.nnz,
            "l0": self.nnz / max(1, self.n_tokens),
            "dead_latents": int((~alive).sum()),
            "dataset_split": self.info.dataset_split,
            "shards": len(self.info.shards),
            "bytes_per_nonzero": self.info.bytes_per_nonzero,
            "sae_sha256": self.info.sae_sha256,
        }


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    log.info("%s", json.dumps(LatentCache.open(Path(sys.argv[1])).summary(), indent=2))
