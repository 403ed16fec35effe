"""TopK SAE training on collected activations, with AuxK for dead latents.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
- inputs scaled by one factor so that E||x||^2 = d_in; the factor is folded back into the biases on save, so the
  saved SAE takes raw activations;
- b_dec starts at the geometric median of a sample (the activations have a large mean; a zero start learns slowly);
- decoder rows unit-norm: gradient projected onto the tangent space, rows renormalised after each step;
- AuxK (Appendix A.2): the detached residual x - x_hat is reconstructed from the top-`auxk_k` pre-activations of
  latents that have not fired for `dead_tokens` tokens; that loss is normalised by the residual's variance and
  weighted by `auxk_coef` (OpenAI's 1/32);
- Adam, 5% linear warm-up, linear decay to 0 over the last 20% of steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.activations import check_finite
from saelab.config import TrainConfig
from saelab.sae import SAEConfig, SparseCode, TopKSAE, build


@dataclass(frozen=True)
class TrainResult:
    """A trained SAE (taking raw activations) and its training summary."""

    sae: TopKSAE
    steps: int
    tokens: int
    final_loss: float
    dead_fraction: float
    """Share of latents that did not fire in the last `dead_tokens` training tokens."""


def geometric_median(x_ND: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    med = x_ND.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x_ND - med).norm(dim=1).clamp_min(1e-6)
        med = (w[:, None] * x_ND).sum(dim=0) / w.sum()
    return med


def lr_factor(step: int, total: int) -> float:
    warmup = max(1, int(0.05 * total))
    decay_start = int(0.8 * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def auxk_loss(
    sae: TopKSAE, pre_BF: torch.Tensor, resid_BD: torch.Tensor, dead_F: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, Appendix A.2), normalised by the residual's variance."""
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return pre_BF.new_zeros(())
    masked_BF = pre_BF.masked_fill(~dead_F, 0.0)
    acts, idx = masked_BF.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    resid_hat_BD = sae.decode(SparseCode(acts, idx)) - sae.b_dec_D
    var = (resid_BD - resid_BD.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-8)
    return (resid_hat_BD - resid_BD).pow(2).sum(dim=-1).mean() / var


def train(
    acts_ND: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    hookpoint: str = "",
    model: str = "",
    log_path: Path | None = None,
    log_every: int = 10,
) -> TrainResult:
    """Train a TopK SAE on `acts_ND` (rows = tokens) and return it with its biases folded for raw inputs."""
    check_finite(acts_ND, "training activations")
    N, D = acts_ND.shape
    sae_cfg = SAEConfig(cfg.architecture, D, D * cfg.expansion, cfg.k, hookpoint, model)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = build(sae_cfg)
    device = acts_ND.device
    sae.to(device)

    # One global scale: E||x||^2 = D after scaling (folded back below).
    scale = math.sqrt(D / acts_ND[: min(N, 65536)].pow(2).sum(dim=1).mean().item())
    with torch.no_grad():
        sample = acts_ND[torch.randperm(N, generator=gen)[: min(N, 8192)]] * scale
        sae.b_dec_D.copy_(geometric_median(sample))

    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = N // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{N} activations is fewer than one batch of {cfg.batch_size}; collect more tokens")
    total = steps_per_epoch * cfg.epochs
    k_aux = cfg.auxk_k or D // 2
    since_fired_F = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
    log_file = log_path.open("w") if log_path else None
    step, loss_val = 0, float("nan")
    bar = tqdm(total=total, desc="train", unit="step", leave=False)
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(N, generator=gen).to(device)
            for b in range(steps_per_epoch):
                x_BD = acts_ND[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]] * scale
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, total)
                out = sae(x_BD)
                resid_BD = x_BD - out.x_hat_BD
                mse = resid_BD.pow(2).sum(dim=-1).mean()
                fired_F = torch.zeros_like(since_fired_F, dtype=torch.bool)
                fired_F[out.code.top_idx_BK.flatten()] = True
                since_fired_F = torch.where(fired_F, 0, since_fired_F + x_BD.shape[0])
                dead_F = since_fired_F >= cfg.dead_tokens
                aux = auxk_loss(sae, out.pre_acts_BF, resid_BD.detach(), dead_F, k_aux)
                loss = mse + cfg.auxk_coef * aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.project_decoder_grad()
                opt.step()
                sae.normalize_decoder()
                loss_val = loss.item()
                if log_file and step % log_every == 0:
                    var = (x_BD - x_BD.mean(dim=0)).pow(2).sum(dim=-1).mean()
                    rec = {
                        "step": step,
                        "tokens": (step + 1) * cfg.batch_size,
                        "loss": loss_val,
                        "mse": mse.item(),
                        "auxk": aux.item(),
                        "ev": (1 - mse / var).item(),
                        "dead_fraction": float(dead_F.float().mean()),
                        "lr": opt.param_groups[0]["lr"],
                    }
                    log_file.write(json.dumps(rec) + "\n")
                    bar.set_postfix(
                        loss=f"{loss_val:.3g}", ev=f"{rec['ev']:.3f}", dead=f"{rec['dead_fraction']:.3f}"
                    )
                step += 1
                bar.update()
    finally:
        bar.close()
        if log_file:
            log_file.close()

    with torch.no_grad():  # fold the input scale: z_raw = z / scale, x_hat_raw = x_hat / scale
        sae.b_dec_D.div_(scale)
        sae.b_enc_F.div_(scale)
    return TrainResult(sae, step, step * cfg.batch_size, loss_val, float(dead_F.float().mean()))
