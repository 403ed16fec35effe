"""Activation collection: residual-stream activations at a hookpoint, forward stopped after the hooked layer.

Only positions kept by the data stage's mask (no leading position, no special token) enter the activation file, so
the massive activations at position 0 never reach training. The file holds `acts` [N, d_in] and `window`/`pos`
[N] (where each row came from), written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saelab.data import TokenWindows
from saelab.models import LoadedModel, capture, forward_until


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
        tmp = path.with_name(path.name + ".tmp")
        save_file({"acts": self.acts_ND, "window": self.window_N, "pos": self.pos_N}, str(tmp))
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> Activations:
        if not path.exists():
            raise ActivationError(f"{path} is missing; run `saelab collect` first")
        t = load_file(str(path))
        return cls(t["acts"], t["window"], t["pos"])


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


def collect(
    lm: LoadedModel,
    windows: TokenWindows,
    hookpoint: str,
    n_tokens: int,
    batch_size: int,
    store_dtype: torch.dtype = torch.float32,
) -> Activations:
    """Collect at least `n_tokens` kept-position activations from the training windows (in order)."""
    keep_per_window = windows.keep[windows.train_idx].sum(axis=1)
    n_windows = int(np.searchsorted(np.cumsum(keep_per_window), n_tokens) + 1)
    if n_windows > len(windows.train_idx):
        raise ActivationError(
            f"asked for {n_tokens} training tokens but the training split holds {int(keep_per_window.sum())}; "
            "lower --collect.n-train-tokens or use a larger corpus"
        )
    idx = windows.train_idx[:n_windows]
    acts, win, pos = [], [], []
    for batch, a_BTD in iter_window_batches(lm, windows, idx, hookpoint, batch_size, "collect"):
        keep = torch.as_tensor(windows.keep[batch], device=a_BTD.device)
        acts.append(a_BTD[keep].to(store_dtype).cpu())
        w, p = keep.cpu().nonzero(as_tuple=True)
        win.append(torch.as_tensor(batch, dtype=torch.int32)[w])
        pos.append(p.to(torch.int32))
    out = Activations(torch.cat(acts), torch.cat(win), torch.cat(pos))
    check_finite(out.acts_ND, "collected activations")
    return out


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse NaN / inf activations with a message saying how many and where to look."""
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=-1).nonzero().flatten()
        raise ActivationError(
            f"{what} contain {int(bad.sum())} NaN/inf values in {len(rows)} rows (first row {int(rows[0])}); "
            "check the model dtype (try --model.dtype float32) and the input tokens"
        )
