"""`jumprelu`: z = pre * H(pre - theta_i), a learned per-latent threshold (fp32, log-parametrised), an L0 penalty,
and straight-through pseudo-derivatives with a rectangle kernel (Rajamanoharan et al. 2024, "Jumping Ahead")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from saelab.sae.base import SAE, LossInputs, SAEConfig, SAEError, SparseCode, register, sparse_code

if TYPE_CHECKING:
    from saelab.config import TrainConfig


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta). d/dpre = H(pre - theta); d/dtheta = -(theta/eps) K((pre - theta)/eps), with K the
    rectangle kernel (Rajamanoharan et al. 2024). No other path reaches theta, so it is counted once."""

    @staticmethod
    def forward(ctx: Any, pre_BF: torch.Tensor, theta_F: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx: Any, grad_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        kernel_BF = _rectangle((pre_BF - theta_F) / ctx.eps)
        grad_theta_F = -(theta_F / ctx.eps) * (kernel_BF * grad_BF).sum(dim=0)
        return grad_BF * (pre_BF > theta_F), grad_theta_F.to(theta_F.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - theta). d/dpre = 0; d/dtheta = -(1/eps) K((pre - theta)/eps) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx: Any, pre_BF: torch.Tensor, theta_F: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        kernel_BF = _rectangle((pre_BF - theta_F) / ctx.eps)
        grad_theta_F = -(1.0 / ctx.eps) * (kernel_BF * grad_BF).sum(dim=0)
        return None, grad_theta_F.to(theta_F.dtype), None


@register
class JumpReLUSAE(SAE):
    """JumpReLU SAE with an L0 penalty and straight-through threshold gradients (Rajamanoharan et al. 2024)."""

    architecture = "jumprelu"
    params: ClassVar[tuple[str, ...]] = ("jumprelu_bandwidth", "jumprelu_init_threshold")
    uses_auxk = False
    has_threshold = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # log-parametrised so the threshold stays positive; kept fp32 even if the module is cast (a bf16
        # threshold silently stops learning: its updates fall below bf16's resolution).
        self.log_threshold_F = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    @classmethod
    def params_from(cls, train: TrainConfig) -> dict[str, Any]:
        return {
            "jumprelu_bandwidth": train.jumprelu.bandwidth,
            "jumprelu_init_threshold": train.jumprelu.init_threshold,
        }

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        if not (cfg.jumprelu_bandwidth > 0 and cfg.jumprelu_init_threshold > 0):
            raise SAEError(
                "a jumprelu SAE needs jumprelu_bandwidth > 0 and jumprelu_init_threshold > 0, got "
                f"{cfg.jumprelu_bandwidth} and {cfg.jumprelu_init_threshold}"
            )

    @property
    def threshold_F(self) -> torch.Tensor:
        return self.log_threshold_F.exp()

    def _apply(self, fn: Any, recurse: bool = True) -> JumpReLUSAE:
        """Casts and moves reach every tensor but the threshold, which only moves (its fp32 values kept exactly)."""
        fp32 = self.log_threshold_F.data
        super()._apply(fn, recurse)
        self.log_threshold_F.data = fp32.to(self.log_threshold_F.device)
        return self

    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        return sparse_code(pre_BF * (pre_BF > self.threshold_F))

    def train_latents(self, raw_BF: torch.Tensor) -> torch.Tensor:
        # Raw pre-activations: a ReLU before would pile every negative one at 0, inside the kernel's window
        # whenever theta < eps/2.
        return _JumpReLU.apply(raw_BF, self.threshold_F, self.cfg.jumprelu_bandwidth)

    def sparsity_penalty(self, raw_BF: torch.Tensor, z_BF: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
        l0_B = _Step.apply(raw_BF, self.threshold_F, self.cfg.jumprelu_bandwidth).sum(dim=-1)
        return inputs.l0_coef * l0_B.mean()

    def param_groups(self, train: TrainConfig) -> list[dict[str, Any]]:
        """The thresholds learn at their own rate (`train.jumprelu.threshold_lr`; 0 = train.lr)."""
        others = [p for name, p in self.named_parameters() if name != "log_threshold_F"]
        return [
            {"params": others, "base_lr": train.lr},
            {"params": [self.log_threshold_F], "base_lr": train.jumprelu.threshold_lr or train.lr},
        ]

    @torch.no_grad()
    def reset_latents_(self, idx_K: torch.Tensor, W_dec_KD: torch.Tensor, W_enc_DK: torch.Tensor) -> None:
        """As every SAE's, and the thresholds restart at their initial value."""
        super().reset_latents_(idx_K, W_dec_KD, W_enc_DK)
        self.log_threshold_F[idx_K] = math.log(self.cfg.jumprelu_init_threshold)

    def threshold_values(self) -> torch.Tensor:
        return self.threshold_F

    @torch.no_grad()
    def load_threshold_(self, threshold: torch.Tensor) -> None:
        self.log_threshold_F.copy_(threshold.expand(self.cfg.d_sae).log())

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.log_threshold_F.sub_(math.log(scale))
