"""Parity of saelab's core metrics with SAELens's own evaluation, on an SAE trained by SAELens (slow; peers).

What runs where:
- .venv-peers/saelens (tests/peer_scripts/peer_saelens_eval.py): SAELens's `SAETrainer` trains a TopK SAE on
  activations of the real bundled model (SmolLM2-135M-Instruct at `model.layers.15`) and saves it with its own
  `save_inference_model`; `sae_lens.evals.run_evals`, unmodified, then evaluates the saved SAE on this test's
  evaluation windows, through SAELens's `HookedProxyLM` over saelab's dequantised model folder (HF_HUB_OFFLINE=1).
- here: `import_sae` reads that SAELens folder; `reconstruction_metrics` and `downstream_scores` evaluate it on the
  same windows with the same weights.

Tokens and masks: 8 windows of 64 tokens of the bundled Wikipedia corpus (16 more train the SAE), each opening with
BOS, as SAELens's ActivationsStore prepends it, and holding EOS between documents. SAELens excludes tokens by id
only: it is given the tokenizer's special ids (BOS, EOS/PAD, UNK: the ids saelab's `exclude_special` drops; SAELens's
own default would keep UNK), and saelab drops the same ids with exclude_first=0. BOS at position 0 (the attention
sink, residual norm ~25,000) is thus out on both sides as a special token, and position 1, which saelab leaves out
by default (exclude_first=2), is in on both sides, for this parity check only (one position-1 token here has norm
~1,700, ten times the median, and weighs on MSE and explained variance; the SAE was trained without positions 0-1).
SAELens's batches (4 windows) are saelab's batches.

Same definition, compared directly (|saelab - SAELens| <= 1e-3; relative for MSE and L1, which are in activation
units and ~1e2-1e4 here, where 1e-3 absolute would test float32 summation order, not definitions): MSE, explained
variance (SAELens's `ExplainedVarianceCalculator` measures variance about the mean, as saelab does), legacy explained
variance (per token, about the batch mean, over the same batches), cosine similarity, L0, L1, the L2 ratio (mean of
the per-token ||x_hat|| / ||x||), dead and dense fractions and per-latent firing frequency, CE clean, CE with the
SAE, CE with zero ablation (the hookpoint zeroed at every position, BOS included) and the CE-loss score.

Defined differently, so the comparable quantity is computed from the same per-token values and compared instead
(the headline values of both are printed beside them):
- Relative reconstruction bias: SAELens computes E||x_hat||^2 / E[x . x_hat] per batch and averages the batches;
  saelab pools all tokens (a batch-size-free number). Compared: saelab's `reconstruction_metrics` on each batch
  alone, averaged.
- KL with the SAE and with zero ablation: SAELens's KL covers all T positions of a window, the last one (which has no
  CE target) too; saelab's covers the T-1 positions its CE covers. Compared: SAELens's own per-token KL, averaged
  over saelab's positions; the KL score follows.
- Also checked: SAELens's pooled l2_norm_out / l2_norm_in against E||x_hat|| / E||x|| computed here, and the
  zero-ablation CE of the model run here with the hookpoint zeroed by the test itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saelab.activations.store import iter_window_batches
from saelab.config import DataConfig, EvalConfig
from saelab.data.windows import BUNDLED_WIKIPEDIA, TokenWindows, build_windows
from saelab.eval.core import downstream_scores, reconstruction_metrics
from saelab.models.loading import BUNDLED_SMOLLM2, LoadedModel, load_model, replace_output
from saelab.sae.base import SAE
from saelab.sae.formats import import_sae

pytestmark = [pytest.mark.slow, pytest.mark.peers]

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-peers" / "saelens"
HOOKPOINT = "model.layers.15"
CTX, N_EVAL, N_TRAIN, BATCH = 64, 8, 16, 4
SAE_SPEC = {
    "d_sae": 1152,
    "k": 16,
    "lr": 4e-3,
    "train_batch": 256,
    "train_steps": 30,
    "train_exclude_first": 2,
    "seed": 0,
}
TOL = 1e-3
DENSE = EvalConfig().dense_threshold
PEER_TIMEOUT_S = 480


@dataclass(frozen=True)
class Row:
    """One metric on both sides."""

    metric: str
    saelab: float
    saelens: float
    kind: str
    """'same' (one definition), 'comparable' (computed alike from per-token values) or 'headline' (each side's own
    definition; shown, not compared)."""
    relative: bool = False
    """Compare |saelab - SAELens| / |SAELens|: for quantities in activation units."""

    @property
    def diff(self) -> float:
        d = abs(self.saelab - self.saelens)
        return d / abs(self.saelens) if self.relative else d


@dataclass(frozen=True)
class Parity:
    rows: list[Row]
    saelab_frequency: np.ndarray
    saelens_density: np.ndarray


def table(rows: list[Row]) -> str:
    lines = [f"{'metric':<44} {'saelab':>13} {'SAELens':>13} {'diff':>10}  kind"]
    for r in rows:
        diff = f"{r.diff:.2e}{'r' if r.relative else ''}"
        lines.append(f"{r.metric:<44} {r.saelab:>13.6f} {r.saelens:>13.6f} {diff:>10}  {r.kind}")
    return "\n".join(lines)


def require_saelens_env() -> None:
    if not (VENV / ".installed").exists():
        msg = ".venv-peers/saelens is missing or unfinished; `make peers` builds it"
        if os.environ.get("SAELAB_REQUIRE_PEERS") == "1":
            pytest.fail(f"{msg} (SAELAB_REQUIRE_PEERS=1 requires it)")
        pytest.skip(msg)


def parity_windows(tokenizer: Any) -> TokenWindows:
    """Eval windows first, then training windows: BOS, then 63 corpus tokens; keep = not a special token."""
    cfg = DataConfig(dataset=BUNDLED_WIKIPEDIA, ctx_len=CTX - 1, max_docs=40, exclude_first=0)
    corpus = build_windows(cfg, tokenizer, seed=0)
    order = np.arange(N_EVAL + N_TRAIN)
    assert len(corpus.tokens) >= len(order)
    bos = np.full((len(order), 1), tokenizer.bos_token_id, dtype=corpus.tokens.dtype)
    tokens = np.concatenate([bos, corpus.tokens[order]], axis=1)
    keep = np.concatenate([np.zeros_like(bos, dtype=bool), corpus.keep[order]], axis=1)
    assert not keep[:N_EVAL, 1:].all(), "no special token inside the eval windows: the mask would go untested"
    return TokenWindows(tokens, keep, order[:N_EVAL], order[N_EVAL:])


def run_saelens(
    lm: LoadedModel, windows: TokenWindows, folder: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model_folder = Path(lm.model.name_or_path)
    assert (model_folder / "model.safetensors").exists(), f"saelab's model cache {model_folder} is missing"
    as_long = {
        split: torch.as_tensor(windows.tokens[idx], dtype=torch.long)
        for split, idx in (("eval", windows.eval_idx), ("train", windows.train_idx))
    }
    save_file(as_long, str(folder / "tokens.safetensors"))
    spec = {
        "model_folder": str(model_folder),
        "model_name": BUNDLED_SMOLLM2,
        "hookpoint": HOOKPOINT,
        "tokens": str(folder / "tokens.safetensors"),
        "ignore_tokens": sorted(set(lm.tokenizer.all_special_ids)),  # what saelab's exclude_special drops
        "eval_batch_prompts": BATCH,
        "sae_folder": str(folder / "sae"),
        "metrics": str(folder / "metrics.json"),
        "per_token": str(folder / "per_token.safetensors"),
        **SAE_SPEC,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    cmd = [str(VENV / "bin" / "python"), "tests/peer_scripts/peer_saelens_eval.py", str(folder / "spec.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"the SAELens script failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return json.loads((folder / "metrics.json").read_text()), load_file(str(folder / "per_token.safetensors"))


@torch.no_grad()
def zero_ablation_everywhere(lm: LoadedModel, windows: TokenWindows) -> tuple[float, float]:
    """SAELens's zero ablation (the hookpoint zeroed at every position, BOS included): mean CE and KL(clean || new)
    per token over saelab's positions (predictions made at kept positions)."""
    ce_sum = kl_sum = 0.0
    n = 0
    for start in range(0, len(windows.eval_idx), BATCH):
        batch = windows.eval_idx[start : start + BATCH]
        ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long)
        mask = torch.as_tensor(windows.keep[batch])[:, :-1]
        logp_clean = F.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        with replace_output(lm.model, HOOKPOINT, torch.zeros_like):
            logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        ce_sum += float(ce[mask].double().sum())
        kl_sum += float(kl[mask].double().sum())
        n += int(mask.sum())
    return ce_sum / n, kl_sum / n


def build_rows(
    sl: dict[str, Any],
    per_token: dict[str, torch.Tensor],
    recon: dict[str, Any],
    down: dict[str, Any],
    batches: list[torch.Tensor],
    sae: SAE,
    zero_all: tuple[float, float],
    keep_BT: torch.Tensor,
) -> list[Row]:
    keep_T1 = keep_BT[:, :-1]

    def sl_kl_over_saelab_positions(name: str) -> float:
        return float(per_token[name][:, :-1][keep_T1].double().mean())

    with torch.no_grad():
        x = torch.cat(batches)
        x_hat = sae(x).x_hat_BD
    pooled_l2 = float(x_hat.norm(dim=-1).double().mean() / x.norm(dim=-1).double().mean())
    per_batch_bias = float(
        np.mean([reconstruction_metrics(sae, [b], DENSE)["relative_reconstruction_bias"] for b in batches])
    )
    ce_zero_all, kl_zero_all = zero_all
    kl_sae_sl = sl_kl_over_saelab_positions("kl_div_with_sae")
    kl_zero_sl = sl_kl_over_saelab_positions("kl_div_with_ablation")
    density = np.asarray(sl["feature_density"])
    return [
        Row("mse", recon["mse"], sl["mse"], "same", relative=True),
        Row("explained_variance", recon["explained_variance"], sl["explained_variance"], "same"),
        Row("explained_variance_legacy", recon["explained_variance_legacy"], sl["explained_variance_legacy"], "same"),
        Row("cosine_similarity", recon["cosine_similarity"], sl["cossim"], "same"),
        Row("l0", recon["l0"], sl["l0"], "same"),
        Row("l1", recon["l1"], sl["l1"], "same", relative=True),
        Row("l2_ratio", recon["l2_ratio"], sl["l2_ratio"], "same"),
        Row("ce_zero_ablation", down["ce_zero_ablation"], sl["ce_loss_with_ablation"], "same"),
        Row("ce_loss_score", down["ce_loss_score"], sl["ce_loss_score"], "same"),
        Row("dead_fraction", recon["dead_fraction"], float((density == 0).mean()), "same"),
        Row(f"dense_fraction (> {DENSE})", recon["dense_fraction"], float((density > DENSE).mean()), "same"),
        Row("ce_clean", down["ce_clean"], sl["ce_loss_without_sae"], "same"),
        Row("ce_sae", down["ce_sae"], sl["ce_loss_with_sae"], "same"),
        Row("l2_ratio pooled E|x_hat|/E|x|", pooled_l2, sl["l2_norm_out"] / sl["l2_norm_in"], "comparable"),
        Row("rel_recon_bias, mean over batches", per_batch_bias, sl["relative_reconstruction_bias"], "comparable"),
        Row("kl_sae, T-1 positions", down["kl_sae"], kl_sae_sl, "comparable"),
        Row("ce_zero_ablation, the test's own zeroing", ce_zero_all, sl["ce_loss_with_ablation"], "comparable"),
        Row("kl_zero_ablation, everywhere, T-1 positions", kl_zero_all, kl_zero_sl, "comparable"),
        Row(
            "ce_loss_score, zeroed everywhere",
            (ce_zero_all - down["ce_sae"]) / (ce_zero_all - down["ce_clean"]),
            sl["ce_loss_score"],
            "comparable",
        ),
        Row(
            "kl_score, everywhere, T-1 positions",
            (kl_zero_all - down["kl_sae"]) / kl_zero_all,
            (kl_zero_sl - kl_sae_sl) / kl_zero_sl,
            "comparable",
        ),
        Row("relative_reconstruction_bias", recon["relative_reconstruction_bias"], sl["relative_reconstruction_bias"], "headline"),
        Row("kl_sae", down["kl_sae"], sl["kl_div_with_sae"], "headline"),
        Row("kl_zero_ablation", down["kl_zero_ablation"], sl["kl_div_with_ablation"], "headline"),
        Row("kl_score", down["kl_score"], sl["kl_div_score"], "headline"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Parity:
    require_saelens_env()
    started = time.perf_counter()
    folder = tmp_path_factory.mktemp("eval_parity")
    lm = load_model(BUNDLED_SMOLLM2, device="cpu")
    windows = parity_windows(lm.tokenizer)
    sl, per_token = run_saelens(lm, windows, folder)
    peer_s = time.perf_counter() - started

    sae = import_sae(folder / "sae")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hookpoint) == ("topk", SAE_SPEC["k"], HOOKPOINT)
    keep_BT = torch.as_tensor(windows.keep[windows.eval_idx])
    # The recorded per-token values are the ones SAELens averaged: its own mask gives back its own headline.
    for name, value in per_token.items():
        mask = keep_BT if value.shape[1] == CTX else keep_BT[:, :-1]
        assert float(value[mask].double().mean()) == pytest.approx(sl[name], rel=1e-6), name

    batches = [
        a_BTD[torch.as_tensor(windows.keep[b])]
        for b, a_BTD in iter_window_batches(lm, windows, windows.eval_idx, HOOKPOINT, BATCH, "parity")
    ]
    recon = reconstruction_metrics(sae, batches, DENSE)
    down = downstream_scores(lm, [sae], windows, windows.eval_idx, HOOKPOINT, BATCH)[0]
    zero_all = zero_ablation_everywhere(lm, windows)
    rows = build_rows(sl, per_token, recon, down, batches, sae, zero_all, keep_BT)
    print(f"\n{table(rows)}\nSAELens side {peer_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    frequency = np.asarray([10.0**v for v in recon["log10_frequency"]])
    return Parity(rows, frequency, np.asarray(sl["feature_density"]))


def assert_rows(rows: list[Row], kind: str) -> None:
    selected = [r for r in rows if r.kind == kind]
    assert selected
    off = [r.metric for r in selected if not r.diff <= TOL]
    assert not off, f"{off} differ by more than {TOL}:\n{table(rows)}"


def test_metrics_with_one_definition_equal_saelens(parity: Parity) -> None:
    assert_rows(parity.rows, "same")
    # How often each latent fires: the same count on both sides (1e-3 is under one token of the ~490).
    np.testing.assert_allclose(parity.saelab_frequency, parity.saelens_density, rtol=0, atol=TOL)


def test_metrics_defined_differently_equal_saelens_when_computed_alike(parity: Parity) -> None:
    assert_rows(parity.rows, "comparable")


def test_the_sae_is_trained_and_the_comparison_is_not_degenerate(parity: Parity) -> None:
    """A dead or untrained SAE would make most metrics agree trivially."""
    by_name = {r.metric: r for r in parity.rows}
    assert by_name["explained_variance"].saelab > 0.2
    assert by_name["cosine_similarity"].saelab > 0.7
    assert by_name["l0"].saelab == pytest.approx(SAE_SPEC["k"], abs=0.5)
    assert by_name["dead_fraction"].saelab < 0.5
    assert 0.3 < by_name["ce_loss_score, zeroed everywhere"].saelab < 1.0
