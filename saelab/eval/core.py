"""SAE evaluation on held-out windows, with SAEBench's core-metric definitions (`evals/core`).

Reconstruction metrics run over the kept positions of `n_windows` held-out windows (leading positions and special
tokens excluded, as recorded in the result):
- MSE = sum (x - x_hat)^2 / n_tokens;
- explained variance, conventional: 1 - sum (x - x_hat)^2 / sum (x - mean_tokens(x))^2 (mean per dimension) — the
  headline; legacy (SAEBench paper): per-token 1 - ||x - x_hat||^2 / ||x - batch_mean||^2, averaged;
- cosine similarity of x and x_hat, averaged over tokens; L0 = mean number of active latents per token; L1 = mean
  sum of latent activations per token;
- shrinkage: L2 ratio = mean over tokens of ||x_hat|| / ||x|| (SAEBench and SAELens average the per-token ratio),
  relative reconstruction bias = E||x_hat||^2 / E[x . x_hat] pooled over all tokens (SAEBench averages one ratio
  per batch, which makes it depend on the batch size);
- dead latents: never fire on the evaluation tokens; dense: fire on more than `dense_threshold` of them.
Downstream scores splice the SAE into the forward at the hookpoint (excluded positions keep their activation):
- CE-loss score = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean); zero ablation zeroes the hookpoint at
  every position, BOS included, as SAEBench and SAELens do (the SAE replaces the kept positions only);
- KL score = (KL_zero_ablation - KL_sae) / KL_zero_ablation, KL = sum p_clean (log p_clean - log p_new) per token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.activations.store import iter_window_batches
from saelab.config import EvalConfig
from saelab.data.windows import TokenWindows
from saelab.models.loading import LoadedModel, hookpoint_width, replace_output
from saelab.run import atomic
from saelab.run.records import decode
from saelab.sae.base import SAE, SAEError, check_width

METRICS = "eval/metrics.json"
"""The run's SAE's core metrics, relative to the run folder."""


@dataclass(frozen=True)
class Provenance:
    """What an eval record was computed from, saved beside its metrics so a copied file stays attributable."""

    sae: str = "sae"
    """The SAE's name: `sae` for the run's own, else the folder it was loaded from."""
    sae_config: dict[str, Any] | None = None
    sae_sha256: str | None = None
    """Hash of the SAE's config and parameters (`sae.params_sha256`), whatever format it was loaded from."""
    data_sha256: str | None = None
    model_sha256: str | None = None
    hookpoint: str | None = None


@dataclass(frozen=True)
class EvalResult:
    """Core metrics of one SAE on held-out tokens."""

    mse: float
    explained_variance: float
    """Conventional EV (variance about the per-dimension mean)."""
    explained_variance_legacy: float
    """SAEBench paper's per-token EV, for comparison with published numbers."""
    cosine_similarity: float
    l0: float
    l1: float
    """Mean over tokens of the sum of latent activations."""
    l2_ratio: float
    """Mean over tokens of ||x_hat|| / ||x|| (SAEBench, SAELens): below 1 means the SAE shrinks its
    reconstructions."""
    relative_reconstruction_bias: float
    """E||x_hat||^2 / E[x . x_hat] (SAEBench; Wright & Sharkey 2024): 1 is unbiased, below 1 is shrinkage."""
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero_ablation: float
    ce_loss_score: float
    kl_sae: float
    kl_zero_ablation: float
    kl_score: float
    n_tokens: int
    """Tokens in the reconstruction metrics."""
    n_ce_tokens: int
    """Tokens in the CE / KL scores."""
    excluded: str
    """Which positions were left out."""
    log10_frequency: list[float]
    """Per-latent log10 firing frequency on the eval tokens (-inf for dead latents written as null)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["log10_frequency"] = [None if not np.isfinite(v) else v for v in self.log10_frequency]
        return d

    def save(self, path: Path, provenance: Provenance) -> None:
        """Write `to_json()` and what it was computed from (the SAE's name and config, hashes of the SAE, data and
        model)."""
        atomic.write_json(path, {**self.to_json(), **asdict(provenance)})

    @classmethod
    def load(cls, path: Path) -> tuple[EvalResult, Provenance]:
        """The metrics and provenance `save` wrote."""
        data = json.loads(path.read_text(encoding="utf-8"))
        return decode(cls, data, path.name), decode(Provenance, data, path.name)


def load_run_metrics(run_folder: Path) -> tuple[EvalResult, Provenance] | None:
    """The run's eval metrics, or None when the eval stage has not written them."""
    path = run_folder / METRICS
    return EvalResult.load(path) if path.exists() else None


class ReconstructionStats:
    """The reconstruction metrics of one SAE, accumulated batch by batch (memory does not grow with the tokens).

    Per-token quantities (squared error, norms, dot products: sums over D) are computed in the activations'
    float32; every sum over tokens, and the per-dimension sums behind the total variance, accumulate in float64.
    Definitions in the module docstring; `explained_variance_legacy` centres each token on its own batch's mean,
    so it depends on the batches given (the others do not)."""

    def __init__(self, sae: SAE, dense_threshold: float) -> None:
        self.sae = sae
        self.dense_threshold = dense_threshold
        self.sq_err = self.cos_sum = self.legacy_sum = self.l0_sum = self.l1_sum = 0.0
        self.ratio_sum = self.xhat_sq_sum = self.dot_sum = 0.0
        self.n = 0
        self.dim_sum = torch.zeros(sae.cfg.out_width, dtype=torch.float64)
        self.dim_sq = torch.zeros(sae.cfg.out_width, dtype=torch.float64)
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x_in: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Account for one batch of tokens `x_in` [n, D] (kept positions only); a transcoder's metrics are of its
        `target` [n, O], the same tokens' rows at the target hookpoint (`saelab.eval.transcoder`)."""
        xh, code = self.sae.reconstruct(x_in)
        x = x_in if target is None else target
        err_sq_B = (x - xh).pow(2).sum(-1)
        x_norm_B = x.pow(2).sum(-1).sqrt()
        xh_norm_B = xh.pow(2).sum(-1).sqrt()
        dot_B = (x * xh).sum(-1)
        self.sq_err += float(err_sq_B.sum(dtype=torch.float64))
        self.dim_sum += x.sum(0, dtype=torch.float64).cpu()
        self.dim_sq += x.pow(2).sum(0, dtype=torch.float64).cpu()
        # F.cosine_similarity's definition, from the norms already computed: x.xh / max(|x| |xh|, 1e-8)
        cos_B = dot_B / (x_norm_B * xh_norm_B).clamp_min(1e-8)
        self.cos_sum += float(cos_B.sum(dtype=torch.float64))
        centred_B = (x - x.mean(0)).pow(2).sum(-1).clamp_min(1e-12)
        self.legacy_sum += float((1 - err_sq_B / centred_B).sum(dtype=torch.float64))
        self.ratio_sum += float((xh_norm_B / x_norm_B.clamp_min(1e-12)).sum(dtype=torch.float64))
        self.xhat_sq_sum += float(xh_norm_B.pow(2).sum(dtype=torch.float64))
        self.dot_sum += float(dot_B.sum(dtype=torch.float64))
        active = code.top_acts_BK > 0
        n_active = int(active.sum())
        self.l0_sum += n_active
        self.l1_sum += float(code.top_acts_BK.sum(dtype=torch.float64))
        self.fired.index_add_(0, code.top_idx_BK[active].cpu(), torch.ones(n_active, dtype=torch.float64))
        self.n += x.shape[0]

    def result(self) -> dict[str, Any]:
        """The metrics over every token added so far."""
        n = self.n
        if n == 0:
            raise SAEError("no tokens to evaluate: every position of the eval windows was excluded")
        total_var = float((self.dim_sq - self.dim_sum.pow(2) / n).sum())  # sum over tokens of ||x - mean||^2
        freq = (self.fired / n).numpy()
        with np.errstate(divide="ignore"):
            log_freq = np.log10(freq)
        return {
            "mse": self.sq_err / n,
            "explained_variance": 1 - self.sq_err / total_var,
            "explained_variance_legacy": self.legacy_sum / n,
            "cosine_similarity": self.cos_sum / n,
            "l0": self.l0_sum / n,
            "l1": self.l1_sum / n,
            "l2_ratio": self.ratio_sum / n,
            "relative_reconstruction_bias": self.xhat_sq_sum / self.dot_sum,
            "dead_fraction": float((freq == 0).mean()),
            "dense_fraction": float((freq > self.dense_threshold).mean()),
            "n_tokens": n,
            "log10_frequency": log_freq.tolist(),
        }


def reconstruction_metrics(
    sae: SAE, batches: Iterable[torch.Tensor], dense_threshold: float
) -> dict[str, Any]:
    """`ReconstructionStats` over token batches (each [n, D], kept positions only)."""
    stats = ReconstructionStats(sae, dense_threshold)
    for x in batches:
        stats.add(x)
    return stats.result()


@torch.no_grad()
def downstream_scores(
    lm: LoadedModel,
    saes: list[SAE],
    windows: TokenWindows,
    idx: np.ndarray,
    hookpoint: str,
    batch_size: int,
) -> list[dict[str, Any]]:
    """CE-loss and KL scores with each SAE spliced in, against clean and zero-ablation forwards (computed once for
    all SAEs)."""
    shared = {"ce_clean": 0.0, "ce_zero_ablation": 0.0, "kl_zero_ablation": 0.0}
    per_sae = [{"ce_sae": 0.0, "kl_sae": 0.0} for _ in saes]
    n = 0
    for start in tqdm(range(0, len(idx), batch_size), desc="eval CE/KL", unit="batch", leave=False):
        batch = idx[start : start + batch_size]
        ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long, device=lm.device)
        keep = torch.as_tensor(windows.keep[batch], device=lm.device)
        mask = keep[:, :-1]  # predictions made at spliced positions
        targets = ids[:, 1:][mask]
        clean = _Clean(_log_probs(lm, ids, mask), targets)
        shared["ce_clean"] += clean.ce
        with replace_output(lm.model, hookpoint, torch.zeros_like):  # every position, BOS included (SAEBench)
            ce, kl = clean.ce_kl(_log_probs(lm, ids, mask))
        shared["ce_zero_ablation"] += ce
        shared["kl_zero_ablation"] += kl
        for sae, totals in zip(saes, per_sae, strict=True):
            with replace_output(lm.model, hookpoint, lambda x, keep=keep, sae=sae: _splice(x, keep, sae)):
                ce, kl = clean.ce_kl(_log_probs(lm, ids, mask))
            totals["ce_sae"] += ce
            totals["kl_sae"] += kl
        n += int(mask.sum())
    results = []
    for totals in per_sae:
        out: dict[str, Any] = {k: v / n for k, v in {**shared, **totals}.items()}
        out["ce_loss_score"] = (out["ce_zero_ablation"] - out["ce_sae"]) / (
            out["ce_zero_ablation"] - out["ce_clean"]
        )
        out["kl_score"] = (out["kl_zero_ablation"] - out["kl_sae"]) / out["kl_zero_ablation"]
        out["n_ce_tokens"] = n
        results.append(out)
    return results


class _Clean:
    """The clean forward's log-probabilities [M, V] at the M predictions that count, and what every other forward
    is compared with: its summed cross-entropy, its probabilities and their sum of p log p (for the KL)."""

    def __init__(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        self.targets = targets
        self.ce = _ce(logp, targets)
        self.p = logp.exp()
        self.p_logp = (self.p * logp).sum(-1)

    def ce_kl(self, logp: torch.Tensor) -> tuple[float, float]:
        """Summed cross-entropy of the targets under `logp`, and summed KL(clean || logp)."""
        kl = self.p_logp - (self.p * logp).sum(-1)
        return _ce(logp, self.targets), float(kl.sum(dtype=torch.float64))


def _ce(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return float(-logp.gather(-1, targets[:, None]).sum(dtype=torch.float64))


def _splice(x: torch.Tensor, keep: torch.Tensor, sae: SAE) -> torch.Tensor:
    """The hookpoint's output with kept positions replaced by the SAE's reconstruction."""
    new = x.clone()
    new[keep] = sae.reconstruct(x[keep].float())[0].to(x.dtype)
    return new


def _log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [M, V] of the next token at the M positions `mask` [B, T-1] selects."""
    logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1][mask]
    return torch.log_softmax(logits.float(), dim=-1)


def eval_tokens(
    lm: LoadedModel, windows: TokenWindows, hookpoint: str, cfg: EvalConfig
) -> Iterator[torch.Tensor]:
    """The hookpoint's activations [n, D] at the kept positions of the held-out windows, one forward batch at a
    time (each forward stopped at the hookpoint)."""
    idx = windows.eval_idx[: cfg.n_windows]
    for batch, a_BTD in iter_window_batches(lm, windows, idx, hookpoint, cfg.batch_size, "eval recon"):
        yield a_BTD[torch.as_tensor(windows.keep[batch], device=a_BTD.device)]


def evaluate(lm: LoadedModel, sae: SAE, windows: TokenWindows, hookpoint: str, cfg: EvalConfig) -> EvalResult:
    """All core metrics on the held-out windows (see module docstring)."""
    return evaluate_many(lm, [sae], windows, hookpoint, cfg)[0]


@torch.no_grad()
def evaluate_many(
    lm: LoadedModel, saes: list[SAE], windows: TokenWindows, hookpoint: str, cfg: EvalConfig
) -> list[EvalResult]:
    """`evaluate` for several SAEs on the same tokens: the activations are collected once, and the clean and
    zero-ablation forwards of the CE/KL scores run once for all SAEs."""
    width = hookpoint_width(lm, hookpoint)
    for sae in saes:
        check_width(sae, width, hookpoint)
    stats = [ReconstructionStats(sae, cfg.dense_threshold) for sae in saes]
    for x in eval_tokens(lm, windows, hookpoint, cfg):
        for s in stats:
            s.add(x)
    recon = [s.result() for s in stats]
    ce_idx = windows.eval_idx[: cfg.n_ce_windows]
    down = downstream_scores(lm, saes, windows, ce_idx, hookpoint, cfg.ce_batch_size)
    excluded = "leading positions and special tokens (see data config: exclude_first, exclude_special)"
    return [EvalResult(**r, **d, excluded=excluded) for r, d in zip(recon, down, strict=True)]
