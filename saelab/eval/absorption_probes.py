"""First-letter absorption, steps 3-5: the letter probes on LM activations, the k-sparse probes on SAE
latents that find each letter's main and split latents, and each word's absorption."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.eval.absorption_config import (
    ACTIVE_EPS,
    PROBE_END_LR,
    PROBE_LR,
    SPARSE_PROBE_L1,
    SPARSE_PROBE_WEIGHT_DECAY,
    AbsorptionConfig,
    AbsorptionError,
)
from saelab.metrics import confusion, f1
from saelab.sae.base import SAE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- probes


def fit_ovr_probe(
    rows_to_x: Callable[[torch.Tensor], torch.Tensor],
    Y_NC: torch.Tensor,
    dim: int,
    *,
    epochs: int,
    lr: float,
    end_lr: float,
    batch_size: int,
    weight_decay: float,
    l1: float,
    gen: torch.Generator,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes (weights [C, dim], biases [C]) trained as SAEBench's `train_multi_probe`: BCE with
    pos_weight = negatives / positives per class, optional L1 on the weights (mean over probes of sum |w|), Adam with
    weight decay and the learning rate decayed exponentially from `lr` to `end_lr` over the epochs.
    `rows_to_x(rows)` gives the inputs of those rows."""
    n, C = Y_NC.shape
    device = Y_NC.device
    W_CD = torch.zeros(C, dim, device=device, requires_grad=True)
    b_C = torch.zeros(C, device=device, requires_grad=True)
    pos_C = Y_NC.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - pos_C) / pos_C)
    opt = torch.optim.Adam([W_CD, b_C], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            rows = perm[start : start + batch_size]
            logits = rows_to_x(rows) @ W_CD.T + b_C
            loss = loss_fn(logits, Y_NC[rows.to(device)])
            if l1 > 0:
                loss = loss + l1 * W_CD.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return W_CD.detach(), b_C.detach()


def fit_nested_logistic(
    x_NK: torch.Tensor, y_N: torch.Tensor, C: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """For k = 1..K, binary logistic regression on the first k columns with the objective of scikit-learn's
    `LogisticRegression(class_weight="balanced")`: L2 penalty 1 / (2C) on the weights, none on the intercept, sample
    weights n / (2 n_class). All K fits run together as damped Newton steps in float64.
    Returns weights [K, K] (row k - 1 holds the k-column fit, zero past column k) and intercepts [K]."""
    n, K = x_NK.shape
    n_pos = float(y_N.sum())
    if n_pos in (0.0, float(n)):
        raise AbsorptionError(
            "a k-sparse probe needs words of the letter and of other letters in the train split"
        )
    dev = x_NK.device
    y = y_N.double().to(dev)
    s_N = torch.where(y > 0, n / (2 * n_pos), n / (2 * (n - n_pos)))
    mask_MP = torch.ones(K, K + 1, dtype=torch.float64, device=dev)  # model m: columns 0..m and the intercept
    mask_MP[:, :K] = torch.ones(K, K, dtype=torch.float64, device=dev).tril()
    x_MNP = (
        torch.cat([x_NK.double(), torch.ones(n, 1, dtype=torch.float64, device=dev)], 1)[None]
        * mask_MP[:, None]
    )
    reg_P = torch.full((K + 1,), 1.0 / C, dtype=torch.float64, device=dev)
    reg_P[-1] = 0.0

    def objective(theta_MP: torch.Tensor) -> torch.Tensor:
        z_MN = torch.einsum("mnp,mp->mn", x_MNP, theta_MP)
        return (s_N * (F.softplus(z_MN) - y * z_MN)).sum(-1) + 0.5 * (reg_P * theta_MP**2).sum(-1)

    theta_MP = torch.zeros(K, K + 1, dtype=torch.float64, device=dev)
    for _ in range(100):
        p_MN = torch.sigmoid(torch.einsum("mnp,mp->mn", x_MNP, theta_MP))
        grad_MP = torch.einsum("mnp,mn->mp", x_MNP, s_N * (p_MN - y)) + reg_P * theta_MP
        hess_MPP = torch.einsum("mnp,mn,mnq->mpq", x_MNP, s_N * p_MN * (1 - p_MN), x_MNP)
        hess_MPP = hess_MPP + torch.diag_embed(reg_P + (1 - mask_MP))  # unused columns keep a zero step
        step_MP = torch.linalg.solve(hess_MPP, grad_MP)
        # Backtracking: per model the largest of 1, 1/2, ..., 2^-19 that does not raise the objective, else 0.
        f0_M = objective(theta_MP)
        t_M = torch.zeros(K, dtype=torch.float64, device=dev)
        for t in 0.5 ** np.arange(20):
            todo_M = t_M == 0
            if not bool(todo_M.any()):
                break
            t_M = torch.where(todo_M & (objective(theta_MP - t * step_MP) <= f0_M), t, t_M)
        theta_MP = theta_MP - t_M[:, None] * step_MP
        if float((t_M[:, None] * step_MP).abs().max()) < 1e-10:
            break
    return theta_MP[:, :K].float(), theta_MP[:, K].float()


def binary_f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    return f1(confusion(y_true.cpu().numpy().astype(np.int64), y_pred.cpu().numpy().astype(np.int64)))


def split_features(f1_by_k: Sequence[float], jump: float) -> int:
    """SAEBench's feature-split rule: k grows from 1 while F1 rises by more than `jump` over the last accepted k;
    returns the last accepted k (at least 1)."""
    best, k_star = -math.inf, 0
    for k, score in enumerate(f1_by_k, 1):
        if score <= best + jump:
            break
        best, k_star = score, k
    return max(k_star, 1)


# ----------------------------------------------------------------------------------------------- SAE side


@dataclass(frozen=True)
class SparseLatents:
    """SAE latents of N rows in CSR form: row r's active latents are col_M[ptr[r]:ptr[r+1]] with values val_M."""

    ptr_N1: torch.Tensor
    col_M: torch.Tensor
    val_M: torch.Tensor
    d_sae: int

    @classmethod
    @torch.no_grad()
    def encode(cls, sae: SAE, x_ND: torch.Tensor, batch_size: int = 1024) -> SparseLatents:
        device = sae.W_dec_FD.device
        counts, cols, vals = [], [], []
        for start in range(0, len(x_ND), batch_size):
            z_BF = sae.dense_latents(x_ND[start : start + batch_size].to(device))
            r, c = (z_BF > 0).nonzero(as_tuple=True)
            counts.append(torch.bincount(r, minlength=z_BF.shape[0]))
            cols.append(c)
            vals.append(z_BF[r, c])
        ptr = F.pad(torch.cat(counts).cumsum(0), (1, 0))
        return cls(ptr, torch.cat(cols), torch.cat(vals), sae.cfg.d_sae)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), d_sae] latents of `rows`."""
        rows = rows.to(self.ptr_N1.device)
        starts, counts = self.ptr_N1[rows], self.ptr_N1[rows + 1] - self.ptr_N1[rows]
        local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts)
        offset = torch.arange(int(counts.sum()), device=rows.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts
        )
        idx = torch.repeat_interleave(starts, counts) + offset
        out = torch.zeros(len(rows), self.d_sae, dtype=self.val_M.dtype, device=self.val_M.device)
        out[local, self.col_M[idx]] = self.val_M[idx]
        return out

    def columns(self, ids_K: torch.Tensor) -> torch.Tensor:
        """[N, K] activations of the latents `ids_K` (distinct) on every row."""
        where_F = torch.full((self.d_sae,), -1, dtype=torch.long, device=self.col_M.device)
        where_F[ids_K.to(self.col_M.device)] = torch.arange(len(ids_K), device=self.col_M.device)
        rows_M = torch.repeat_interleave(
            torch.arange(len(self.ptr_N1) - 1, device=self.ptr_N1.device), self.ptr_N1.diff()
        )
        sel = where_F[self.col_M] >= 0
        out = torch.zeros(len(self.ptr_N1) - 1, len(ids_K), dtype=self.val_M.dtype, device=self.val_M.device)
        out[rows_M[sel], where_F[self.col_M[sel]]] = self.val_M[sel]
        return out


def main_latents(
    train: SparseLatents,
    Y_train_NC: torch.Tensor,
    test: SparseLatents,
    Y_test_NC: torch.Tensor,
    cfg: AbsorptionConfig,
    gen: torch.Generator,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Per class: (main latents, test F1 of the k-sparse probe for k = 1..max_k) by k-sparse probing (step 4)."""
    if len(Y_train_NC) <= cfg.sparse_probe_batch_size:
        log.warning(
            "absorption: %d train words fit in one L1-probe batch (%d): its latent ranking favours latents that "
            "fire on few words; lower absorption.sparse_probe_batch_size or raise absorption.vocab_size",
            len(Y_train_NC),
            cfg.sparse_probe_batch_size,
        )
    V_CF, _ = fit_ovr_probe(
        train.dense,
        Y_train_NC,
        train.d_sae,
        epochs=cfg.sparse_probe_epochs,
        lr=PROBE_LR,
        end_lr=PROBE_END_LR,
        batch_size=cfg.sparse_probe_batch_size,
        weight_decay=SPARSE_PROBE_WEIGHT_DECAY,
        l1=SPARSE_PROBE_L1,
        gen=gen,
        desc="absorption: L1 probe on latents",
    )
    top_CK = V_CF.topk(min(cfg.max_k, train.d_sae), dim=1).indices
    out = []
    for c in range(Y_train_NC.shape[1]):
        z_train, z_test = train.columns(top_CK[c]), test.columns(top_CK[c])
        W_KK, b_K = fit_nested_logistic(z_train, Y_train_NC[:, c])
        scores_NK = z_test @ W_KK.T.to(z_test.device) + b_K.to(z_test.device)
        f1s = [binary_f1(Y_test_NC[:, c] > 0, scores_NK[:, k] > 0) for k in range(scores_NK.shape[1])]
        k_star = split_features(f1s, cfg.f1_jump_threshold)
        out.append((tuple(int(i) for i in top_CK[c, :k_star]), tuple(f1s)))
    return out


def word_absorption(
    probe_proj_N: torch.Tensor,
    z_NF: torch.Tensor,
    dec_proj_F: torch.Tensor,
    cos_F: torch.Tensor,
    main: Sequence[int],
    cfg: AbsorptionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction, full absorption) of each word (step 5 of the module docstring).

    probe_proj_N: the LM activation's projection on the unit probe direction; z_NF: SAE latents; dec_proj_F: W_dec_i . p;
    cos_F: cos(W_dec_i, p); main: the letter's main latents. Words with probe_proj <= 0 score 0 on both."""
    proj_NF = z_NF * dec_proj_F
    is_main_F = torch.zeros_like(cos_F, dtype=torch.bool)
    is_main_F[list(main)] = True
    main_proj_N = proj_NF[:, is_main_F].sum(1)
    candidate_NF = (~is_main_F & (cos_F >= cfg.absorber_cos_threshold))[None] & (proj_NF > 0)
    absorber_proj_N = (
        proj_NF.where(candidate_NF, 0.0).topk(min(cfg.max_absorbers, proj_NF.shape[1]), dim=1).values.sum(1)
    )
    absorbed_N = torch.minimum(absorber_proj_N, probe_proj_N - main_proj_N)
    fraction_N = torch.where(main_proj_N <= 0, 1.0, absorbed_N / (absorbed_N + main_proj_N).clamp_min(1e-12))
    needed_N = cfg.projection_threshold * probe_proj_N  # least projection the absorbers must supply
    none_N = (probe_proj_N <= 0) | (main_proj_N >= probe_proj_N) | (absorber_proj_N < needed_N)
    fraction_N = fraction_N.masked_fill(none_N, 0.0).clamp(0.0, 1.0)
    top_proj_N, top_idx_N = proj_NF.max(dim=1)
    full_N = (
        (z_NF[:, is_main_F] < ACTIVE_EPS).all(dim=1)
        & (cos_F[top_idx_N] >= cfg.full_absorption_cos_threshold)
        & (probe_proj_N > 0)
        & (top_proj_N >= needed_N)
    )
    return fraction_N, full_N
