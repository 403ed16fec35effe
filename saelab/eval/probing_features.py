"""Sparse probing's features: each text's mean, over its kept positions (leading positions and special tokens
excluded, as in training), of the hookpoint activation (`lm`) and of the SAE's dense latents (`sae`).

`tokenize` cuts the texts to `ctx_len` tokens; `pooled_features` runs them through the model in batches, longest
first, and pools both feature sets at once. Used by `saelab.eval.probing.run_probing` and `saelab.eval.scr_tpp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.eval.probing_tasks import ProbingError
from saelab.models.loading import LoadedModel, capture, forward_until
from saelab.sae.base import SAE


class PoolingSettings(Protocol):
    """What pooling reads from a config (`ProbingConfig` and `ScrTppSettings` have it)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def exclude_first(self) -> int: ...
    @property
    def exclude_special(self) -> bool: ...


class PooledFeatures(NamedTuple):
    """Per-text means over kept positions."""

    lm_ND: np.ndarray
    """Activations at the hookpoint, float32 [N, d_in]."""
    sae_NF: np.ndarray
    """SAE dense latents, float32 [N, d_sae]."""
    n_kept_N: np.ndarray
    """Positions averaged per text."""


def tokenize(tokenizer: Any, texts: Sequence[str], ctx_len: int) -> list[list[int]]:
    """Token ids of each text, no special tokens added (as the data stage), truncated to `ctx_len`."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=ctx_len)["input_ids"]
    return [list(x) for x in ids]


@torch.no_grad()
def pooled_features(
    lm: LoadedModel, sae: SAE, hookpoint: str, ids: Sequence[Sequence[int]], cfg: PoolingSettings
) -> PooledFeatures:
    """Mean hookpoint activation and mean SAE latents over each text's kept positions, batched (longest texts
    first, each batch cut to its longest text and right-padded: a causal model's kept positions never see the
    padding)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    special = sorted(set(lm.tokenizer.all_special_ids)) if cfg.exclude_special else []
    order = np.argsort([-len(x) for x in ids], kind="stable")
    n, D, F_ = len(ids), sae.cfg.d_in, sae.cfg.d_sae
    lm_ND, sae_NF, kept_N = np.zeros((n, D), np.float32), np.zeros((n, F_), np.float32), np.zeros(n, np.int64)
    sae_device = sae.W_dec_FD.device
    for start in tqdm(range(0, n, cfg.batch_size), desc="probing features", unit="batch", leave=False):
        batch = order[start : start + cfg.batch_size]
        tokens_BT = np.full((len(batch), len(ids[batch[0]])), pad, dtype=np.int64)
        keep_BT = np.zeros(tokens_BT.shape, dtype=bool)
        for row, i in enumerate(batch):
            tokens_BT[row, : len(ids[i])] = ids[i]
            keep_BT[row, cfg.exclude_first : len(ids[i])] = True
        keep_BT &= ~np.isin(tokens_BT, special)
        if not keep_BT.any(axis=1).all():
            raise ProbingError(
                f"{int((~keep_BT.any(axis=1)).sum())} texts keep no position after excluding the first "
                f"{cfg.exclude_first} and special tokens; use texts of more than {cfg.exclude_first} real tokens"
            )
        with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, torch.as_tensor(tokens_BT, device=lm.device))
        a_BTD = store[hookpoint].float()
        if a_BTD.shape[-1] != D:
            raise ProbingError(
                f"SAE d_in={D} does not match the width {a_BTD.shape[-1]} of {hookpoint}; probe the SAE at the "
                "hookpoint (and with the model) it was trained on"
            )
        keep = torch.as_tensor(keep_BT, device=a_BTD.device)
        row_M = keep.nonzero()[:, 0]  # M = kept positions of the batch
        counts_B = keep.sum(dim=1, keepdim=True).float()
        x_MD = a_BTD[keep]
        z_MF = sae.dense_latents(x_MD.to(sae_device)).float().to(x_MD.device)
        lm_ND[batch] = (
            torch.zeros(len(batch), D, device=x_MD.device).index_add_(0, row_M, x_MD) / counts_B
        ).cpu()
        sae_NF[batch] = (
            torch.zeros(len(batch), F_, device=z_MF.device).index_add_(0, row_M, z_MF) / counts_B
        ).cpu()
        kept_N[batch] = counts_B.squeeze(1).long().cpu().numpy()
    return PooledFeatures(lm_ND, sae_NF, kept_N)
