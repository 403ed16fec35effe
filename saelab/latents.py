"""Sparse latent cache: the SAE's latent activations over the collected tokens, stored per latent.

Layout (`latents.safetensors`): compressed sparse columns. `indptr` [F+1] int64 splits `token_idx` [nnz] int32 and
`values` [nnz] float32 by latent (8 bytes per nonzero), so one latent reads as a slice; `window` and `pos` [N] say
where each cached token came from. Per-latent statistics (`stats.json`): firing frequency, max and mean activation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from saelab.activations import Activations
from saelab.sae import SAE


@dataclass(frozen=True)
class LatentStats:
    """Per-latent statistics over the cached tokens."""

    frequency: np.ndarray
    """[F] fraction of tokens on which the latent fires."""
    max_act: np.ndarray
    """[F] largest activation."""
    mean_act: np.ndarray
    """[F] mean activation over the tokens where it fires (0 for latents that never fire)."""
    n_tokens: int

    def save(self, path: Path) -> None:
        data = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> LatentStats:
        d = json.loads(path.read_text())
        return cls(
            np.asarray(d["frequency"]), np.asarray(d["max_act"]), np.asarray(d["mean_act"]), d["n_tokens"]
        )


@dataclass(frozen=True)
class LatentCache:
    """Sparse latent activations, readable one latent at a time."""

    indptr: np.ndarray
    token_idx: np.ndarray
    values: np.ndarray
    window_N: np.ndarray
    pos_N: np.ndarray
    stats: LatentStats

    @property
    def d_sae(self) -> int:
        return len(self.indptr) - 1

    def latent(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices, activations) of latent `f`, in token order."""
        a, b = int(self.indptr[f]), int(self.indptr[f + 1])
        return self.token_idx[a:b], self.values[a:b]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stats.save(folder / "stats.json")
        tensors = {
            "indptr": self.indptr,
            "token_idx": self.token_idx,
            "values": self.values,
            "window": self.window_N,
            "pos": self.pos_N,
        }
        tmp = folder / "latents.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.rename(folder / "latents.safetensors")

    @classmethod
    def load(cls, folder: Path) -> LatentCache:
        path = folder / "latents.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `saelab cache` first")
        t = load_file(str(path))
        return cls(
            t["indptr"],
            t["token_idx"],
            t["values"],
            t["window"],
            t["pos"],
            LatentStats.load(folder / "stats.json"),
        )


@torch.no_grad()
def build_cache(sae: SAE, acts: Activations, batch_size: int) -> LatentCache:
    """Encode every collected activation and store the nonzero latents per latent."""
    F = sae.cfg.d_sae
    N = acts.acts_ND.shape[0]
    rows, cols, vals = [], [], []
    device = next(sae.parameters()).device
    for start in tqdm(range(0, N, batch_size), desc="cache latents", unit="batch", leave=False):
        x = acts.acts_ND[start : start + batch_size].to(device=device, dtype=torch.float32)
        code = sae.encode(x)
        nz = code.top_acts_BK > 0
        r = torch.arange(start, start + x.shape[0], device=device)[:, None].expand_as(nz)
        rows.append(r[nz].cpu())
        cols.append(code.top_idx_BK[nz].cpu())
        vals.append(code.top_acts_BK[nz].float().cpu())
    row, col, val = torch.cat(rows).numpy(), torch.cat(cols).numpy(), torch.cat(vals).numpy()
    order = np.lexsort((row, col))  # by latent, then by token
    row, col, val = row[order], col[order], val[order]
    counts = np.bincount(col, minlength=F)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    max_act = np.zeros(F, dtype=np.float32)
    np.maximum.at(max_act, col, val)
    sums = np.bincount(col, weights=val, minlength=F)
    mean_act = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    stats = LatentStats(counts / N, max_act, mean_act, N)
    return LatentCache(
        indptr,
        row.astype(np.int32),
        val.astype(np.float32),
        acts.window_N.numpy().astype(np.int32),
        acts.pos_N.numpy().astype(np.int32),
        stats,
    )
