"""`relu`: z = ReLU(pre) with an L1 penalty on z_i * ||W_dec_i|| and an unconstrained decoder (Anthropic,
"Towards Monosemanticity", April 2024 update)."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, LossInputs, SparseCode, register, sparse_code


@register
class ReLUSAE(SAE):
    """ReLU SAE with the decoder-norm-weighted L1 penalty and an unconstrained decoder (Anthropic, April 2024)."""

    architecture = "relu"
    uses_auxk = False
    unit_norm_decoder = False
    decoder_init_norm = 0.1  # Anthropic's April 2024 update: decoder rows start at norm 0.1
    resample_encoder_scale = 0.2  # Anthropic 2023's resampling ("Towards Monosemanticity"), a ReLU SAE

    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        return sparse_code(pre_BF)

    def train_latents(self, raw_BF: torch.Tensor) -> torch.Tensor:
        return torch.relu(raw_BF)

    def sparsity_penalty(self, raw_BF: torch.Tensor, z_BF: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
        """lambda * sum_i z_i ||W_dec_i||, averaged over tokens (the norm enters so shrinking z cannot pay)."""
        return inputs.l1_coef * (z_BF * self.W_dec_FD.norm(dim=1)).sum(dim=-1).mean()
