"""The pieces SCR and TPP share (SAEBench `evals/scr_and_tpp`, `evals/sparse_probing/probe_training.py`): linear
probes on mean-pooled LM activations, probe attribution of SAE latents, and ablating the top-n of them.

- Probe: `nn.Linear(d_model, 1)` trained with AdamW (lr 1e-3), BCE-with-logits plus `l1 * sum|w|`, batches of 16,
  20 epochs on the raw pooled activations, as SAEBench trains its SCR/TPP probes. SAEBench keeps the epoch with the
  best *test* accuracy; saelab keeps the last epoch, so no probe sees its test split.
- Attribution (`latent_effects`): with z the per-text mean SAE latents of the probe's train texts,
  effect_i = (mean_pos(z_i) - mean_neg(z_i)) * (W_dec_i . w_probe); TPP first clamps the mean difference at 0
  (latents the positive class uses more), SCR takes |effect|.
- Top n (`top_n`): the n largest effects among the nonzero ones (fewer when fewer are nonzero).
- Ablation (`ablate`): SAEBench zeroes the latents per token and adds back the SAE's error,
  x' = decode(z with S zeroed) + (x - decode(z)) = x - sum_{i in S} z_i W_dec_i, then mean-pools x'. Pooling is
  linear, so pooled(x') = pooled(x) - pooled(z)[:, S] @ W_dec[S]: no per-token activations are kept. SAEBench
  also adds the ablated latents of its masked (zeroed) positions, as encode(0) is not 0 for an SAE with biases,
  against its own note that masked tokens take no part; saelab leaves them out (tests/test_scr_tpp_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from saelab.eval.scr_data import BinarySet


@dataclass(frozen=True)
class ProbeSettings:
    """SAEBench's SCR/TPP probe training settings."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 16
    l1: float = 1e-3


class LinearProbe(NamedTuple):
    """A trained probe: logit = x . w + b."""

    w_D: np.ndarray
    b: float

    def accuracy(self, x_ND: np.ndarray, y_N: np.ndarray) -> float:
        """Share of rows whose logit sign matches the label (logit > 0 is class 1)."""
        pred_N = (x_ND.astype(np.float64) @ self.w_D.astype(np.float64) + self.b) > 0
        return float((pred_N == (y_N == 1)).mean())


def train_probe(x_ND: np.ndarray, y_N: np.ndarray, settings: ProbeSettings, seed: int) -> LinearProbe:
    """SAEBench's SCR/TPP probe on these rows (module docstring); the last epoch's weights."""
    x = torch.as_tensor(x_ND, dtype=torch.float32)
    y = torch.as_tensor(y_N, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.AdamW(probe.parameters(), lr=settings.lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for _ in range(settings.epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), settings.batch_size):
                idx = order[start : start + settings.batch_size]
                loss = loss_fn(probe(x[idx]).squeeze(-1), y[idx]) + settings.l1 * probe.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return LinearProbe(probe.weight.detach()[0].numpy().copy(), float(probe.bias.detach()[0]))


class Rows(NamedTuple):
    """A binary set as rows of the pooled feature matrices: row indices and labels (positives 1)."""

    idx_N: np.ndarray
    y_N: np.ndarray


def rows_of(s: BinarySet, row_of: dict[str, int]) -> Rows:
    idx = [row_of[t] for t in s.positives] + [row_of[t] for t in s.negatives]
    return Rows(np.asarray(idx, dtype=np.int64), np.r_[np.ones(len(s.positives)), np.zeros(len(s.negatives))])


def latent_effects(
    z_NF: np.ndarray, y_N: np.ndarray, probe: LinearProbe, W_dec_FD: np.ndarray, scr: bool
) -> np.ndarray:
    """Probe attribution of every latent (module docstring): [F]."""
    diff_F = z_NF[y_N == 1].mean(axis=0) - z_NF[y_N == 0].mean(axis=0)
    if not scr:
        diff_F = np.maximum(diff_F, 0.0)
    effect_F = diff_F * (W_dec_FD @ probe.w_D)
    return np.abs(effect_F) if scr else effect_F


def top_n(effect_F: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest effects among the nonzero ones, largest first (ties: lower index)."""
    k = min(n, int(np.count_nonzero(effect_F)))
    return np.argsort(-effect_F, kind="stable")[:k]


def ablate(x_ND: np.ndarray, z_NF: np.ndarray, W_dec_FD: np.ndarray, latents_S: np.ndarray) -> np.ndarray:
    """Pooled activations with the latents `latents_S` zero-ablated and the SAE's error kept (module docstring)."""
    if len(latents_S) == 0:
        return x_ND
    return x_ND - z_NF[:, latents_S] @ W_dec_FD[latents_S]


def tpp_negatives(pools: list[tuple[int, ...]], positive: int, rng: np.random.Generator) -> list[int]:
    """SAEBench's TPP negatives for class `positive`: ceil(n / (C - 1)) rows drawn from each other class, then n of
    those (n = the class's row count), all seeded."""
    n = len(pools[positive])
    others = [c for c in range(len(pools)) if c != positive]
    per_class = -(-n // len(others))
    drawn = [pools[c][i] for c in others for i in rng.permutation(len(pools[c]))[:per_class]]
    return [drawn[i] for i in rng.permutation(len(drawn))[:n]]
