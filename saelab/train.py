"""SAE training on collected activations, for every architecture in `sae.REGISTRY`.

`train(acts_ND, TrainConfig(...), seed)` returns the trained SAE (taking raw activations) and a summary; the CLI's
`saelab train` calls it through the pipeline. The architecture supplies its objective (`SAE.training_loss`:
reconstruction, AuxK, L1 / L0 penalty); this module holds what every architecture shares (Gao et al. 2024,
"Scaling and evaluating sparse autoencoders", unless noted):
- inputs scaled by one factor so that E||x||^2 = d_in; the factor is folded back on return (`fold_input_scale`),
  so the returned SAE takes raw activations;
- b_dec starts at the geometric median of a sample (the activations have a large mean; a zero start learns slowly);
- unit-norm decoder rows where the architecture has them: gradient projected onto the tangent space, rows
  renormalised after each step;
- dead-latent tracking for AuxK (Appendix A.2): a latent that has not fired for `dead_tokens` tokens is dead;
- Adam, 5% linear learning-rate warm-up, linear decay to 0 over the last 20% of steps; the L1 / L0 coefficient
  warms up linearly over `sparsity_warmup_fraction` of the steps (Anthropic, April 2024; Gemma Scope).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from tqdm.auto import tqdm

from saelab.activations import check_finite
from saelab.config import TrainConfig
from saelab.sae import REGISTRY, SAE, LossInputs, SAEConfig, TrainLoss, auxk_loss, build

__all__ = ["TrainError", "TrainResult", "auxk_loss", "geometric_median", "lr_factor", "sae_config", "train"]


class TrainError(ValueError):
    """Training cannot go on (too little data, diverged); the message says what to change."""


@dataclass(frozen=True)
class TrainResult:
    """A trained SAE (taking raw activations) and its training summary."""

    sae: SAE
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


def sparsity_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up of the L1 / L0 coefficient from 0 to 1 over the first `warmup_fraction` of the steps."""
    warmup = warmup_fraction * total
    return 1.0 if warmup < 1 else min(1.0, (step + 1) / warmup)


def sae_config(cfg: TrainConfig, d_in: int, hookpoint: str = "", model: str = "") -> SAEConfig:
    """The SAE's config: width from `expansion`, and the TrainConfig fields its architecture takes."""
    params = {name: getattr(cfg, name) for name in REGISTRY[cfg.architecture].params}
    return SAEConfig(cfg.architecture, d_in, d_in * cfg.expansion, hookpoint=hookpoint, model=model, **params)


def input_scale(acts_ND: torch.Tensor) -> float:
    """One global factor with E||x * scale||^2 = d_in (from up to 65,536 rows)."""
    return math.sqrt(acts_ND.shape[1] / acts_ND[:65536].pow(2).sum(dim=1).mean().item())


def train(
    acts_ND: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    hookpoint: str = "",
    model: str = "",
    log_path: Path | None = None,
    log_every: int = 10,
) -> TrainResult:
    """Train an SAE of `cfg.architecture` on `acts_ND` (rows = tokens); returned folded for raw inputs."""
    check_finite(acts_ND, "training activations")
    n_rows, D = acts_ND.shape
    if n_rows < cfg.batch_size:
        raise TrainError(
            f"{n_rows} activations is fewer than one batch of {cfg.batch_size}; collect more tokens"
        )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = build(sae_config(cfg, D, hookpoint, model)).to(acts_ND.device).train()
    scale = input_scale(acts_ND)
    with torch.no_grad():
        sample = acts_ND[torch.randperm(n_rows, generator=gen)[:8192]] * scale
        sae.b_dec_D.copy_(geometric_median(sample))
    log_file = log_path.open("w") if log_path else None
    try:
        steps, loss_val, dead_fraction = _fit(sae, acts_ND, scale, cfg, gen, log_file, log_every)
    finally:
        if log_file:
            log_file.close()
    sae.fold_input_scale(scale)
    return TrainResult(sae.eval(), steps, steps * cfg.batch_size, loss_val, dead_fraction)


def _fit(
    sae: SAE,
    acts_ND: torch.Tensor,
    scale: float,
    cfg: TrainConfig,
    gen: torch.Generator,
    log_file: IO[str] | None,
    log_every: int,
) -> tuple[int, float, float]:
    """The optimisation loop; returns (steps, last loss, dead fraction)."""
    N = acts_ND.shape[0]
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = N // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    k_aux = cfg.auxk_k or acts_ND.shape[1] // 2
    since_fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=acts_ND.device)
    step, loss_val = 0, float("nan")
    bar = tqdm(total=total, desc=f"train {sae.architecture}", unit="step", leave=False)
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(N, generator=gen).to(acts_ND.device)
            for b in range(steps_per_epoch):
                x_BD = acts_ND[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]] * scale
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, total)
                warm = sparsity_factor(step, total, cfg.sparsity_warmup_fraction)
                dead_F = since_fired_F >= cfg.dead_tokens
                inputs = LossInputs(dead_F, k_aux, cfg.auxk_coef, cfg.l1_coef * warm, cfg.l0_coef * warm)
                loss = sae.training_loss(x_BD, inputs)
                opt.zero_grad(set_to_none=True)
                loss.total.backward()
                sae.project_decoder_grad()
                opt.step()
                sae.normalize_decoder()
                since_fired_F = torch.where(loss.fired_F, 0, since_fired_F + x_BD.shape[0])
                loss_val = _finite(loss.total.item(), step)
                if log_file and step % log_every == 0:
                    rec = _log_record(step, cfg, x_BD, loss, dead_F, opt.param_groups[0]["lr"])
                    log_file.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{loss_val:.3g}", ev=f"{rec['ev']:.3f}", l0=f"{rec['l0']:.1f}")
                step += 1
                bar.update()
    finally:
        bar.close()
    return step, loss_val, float((since_fired_F >= cfg.dead_tokens).float().mean())


def _finite(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise TrainError(f"training diverged at step {step} (loss {loss}); lower train.lr")
    return loss


def _log_record(
    step: int, cfg: TrainConfig, x_BD: torch.Tensor, loss: TrainLoss, dead_F: torch.Tensor, lr: float
) -> dict[str, float]:
    var = (x_BD - x_BD.mean(dim=0)).pow(2).sum(dim=-1).mean()
    return {
        "step": step,
        "tokens": (step + 1) * cfg.batch_size,
        "loss": loss.total.item(),
        "mse": loss.mse.item(),
        "auxk": loss.aux.item(),
        "sparsity": loss.sparsity.item(),
        "l0": (loss.latents_BF > 0).sum(dim=1).float().mean().item(),
        "ev": (1 - loss.mse / var).item(),
        "dead_fraction": float(dead_F.float().mean()),
        "lr": lr,
    }
