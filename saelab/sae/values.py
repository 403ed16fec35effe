"""The typed values of the SAE interface (`saelab.sae.base.SAE`): the sparse code `encode` gives and `decode`
takes, what `forward` returns, and the inputs and result of `training_loss`, each a NamedTuple with its fields
documented; `sparse_code` packs dense latents into a `SparseCode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class SparseCode(NamedTuple):
    """Active latents of a batch, padded to a rectangle.

    Row b's active latents are `top_idx_BK[b, j]` with values `top_acts_BK[b, j] > 0`. K is k for TopK; where rows
    have varying numbers of active latents (batchtopk and matryoshka at inference, relu, jumprelu), K is the
    largest count in the batch and shorter rows are padded with zero values at inactive latents. So
    `top_acts_BK > 0` marks real activity, and decoding the padding adds nothing.
    """

    top_acts_BK: torch.Tensor
    top_idx_BK: torch.Tensor


class ForwardOutput(NamedTuple):
    """Result of `SAE.forward` (inference)."""

    x_hat_BD: torch.Tensor
    """Reconstruction."""
    code: SparseCode
    """Active latents."""
    pre_acts_BF: torch.Tensor
    """ReLU'd pre-activations of all latents (for AuxK)."""


class LossInputs(NamedTuple):
    """What the trainer knows at a step beyond the batch."""

    dead_F: torch.Tensor
    """Latents that have not fired for `dead_tokens` training tokens (AuxK revives them)."""
    k_aux: int
    """Latents in the AuxK reconstruction."""
    auxk_coef: float
    """AuxK weight (architectures without AuxK ignore it)."""
    l1_coef: float = 0.0
    """relu: weight of the decoder-norm-weighted L1 penalty, warm-up already applied."""
    l0_coef: float = 0.0
    """jumprelu: weight of the L0 penalty, warm-up already applied."""
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Data-parallel training: sums a tensor over the ranks, so statistics of the batch (AuxK's residual
    variance) are those of the whole batch rather than of this rank's share."""
    target_BD: torch.Tensor | None = None
    """Transcoder: the batch's target [B, O] (scaled as in training), row for row with x; None for an SAE."""


class TrainLoss(NamedTuple):
    """One training step's objective and what the trainer logs."""

    total: torch.Tensor
    """The loss to minimise."""
    mse: torch.Tensor
    """Mean over tokens of ||x - x_hat||^2 with the whole dictionary."""
    aux: torch.Tensor
    """AuxK loss before its coefficient (0 without dead latents or AuxK)."""
    sparsity: torch.Tensor
    """Sparsity penalty after its coefficient (L1 or L0; 0 for the k-sparse architectures)."""
    l0: torch.Tensor
    """Mean number of active training latents per token (detached)."""
    count_F: torch.Tensor
    """Tokens of the batch each latent was active on (float)."""
    act_sum_F: torch.Tensor
    """Sum of each latent's training activations over the batch (detached)."""

    @property
    def fired_F(self) -> torch.Tensor:
        """Latents active on at least one token of the batch."""
        return self.count_F > 0


def sparse_code(z_BF: torch.Tensor) -> SparseCode:
    """The padded `SparseCode` of dense non-negative latents (K = the largest row count, at least 1)."""
    K = max(1, int((z_BF > 0).sum(dim=1).max())) if z_BF.shape[0] else 1
    acts, idx = z_BF.topk(K, dim=-1, sorted=False)
    return SparseCode(acts, idx)


def auxk_error(
    resid_hat_BD: torch.Tensor,
    resid_BD: torch.Tensor,
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Squared error of the residual's reconstruction over the residual's variance (Gao et al. 2024, A.2); the
    variance is the whole batch's when `sum_ranks` sums over data-parallel ranks."""
    stats = torch.cat(
        [resid_BD.sum(dim=0), resid_BD.pow(2).sum().view(1), resid_BD.new_full((1,), len(resid_BD))]
    )
    if sum_ranks is not None:
        stats = sum_ranks(stats.detach().clone())
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    var = ((sq - total.pow(2).sum() / n) / n).clamp_min(1e-8)
    return (resid_hat_BD - resid_BD).pow(2).sum(dim=-1).mean() / var
