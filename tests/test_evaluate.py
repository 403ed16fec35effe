"""Core metrics: definitions (SAEBench) and the silent-wrong-result pitfalls peers shipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.config import DataConfig, EvalConfig
from saelab.data.windows import build_windows
from saelab.eval.core import downstream_scores, evaluate, reconstruction_metrics
from saelab.models.loading import load_model
from saelab.sae.base import SAEConfig, SAEError, build
from saelab.sae.topk import TopKSAE


class MeanPredictor(TopKSAE):
    """Predicts the per-dimension mean of the data whatever the input."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__(SAEConfig("topk", mean.shape[0], 4 * mean.shape[0], 1))
        with torch.no_grad():
            self.W_dec_FD.zero_()
            self.b_dec_D.copy_(mean)


def test_explained_variance_of_the_mean_predictor_is_exactly_zero() -> None:
    """EV must be measured about the mean, not about zero (SAEBench's and SAELens's old bug)."""
    x = torch.randn(500, 12, dtype=torch.float64).float() + 40.0
    m = reconstruction_metrics(MeanPredictor(x.mean(0)), [x[:200], x[200:]], 0.1)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-5)


def test_metrics_match_direct_formulas() -> None:
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", 10, 40, 3))
    x = torch.randn(300, 10) * 3 + 1
    m = reconstruction_metrics(sae, [x[:100], x[100:]], 0.1)
    xh = sae(x).x_hat_BD.detach()
    err = (x - xh).pow(2).sum()
    assert m["mse"] == pytest.approx(float(err / 300), rel=1e-5)
    assert m["explained_variance"] == pytest.approx(float(1 - err / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, xh, dim=-1).mean()
    assert m["cosine_similarity"] == pytest.approx(float(cos), rel=1e-5)
    z = sae.dense_latents(x).detach()
    assert m["l1"] == pytest.approx(float(z.sum(1).mean()), rel=1e-5)
    assert m["l2_ratio"] == pytest.approx(float((xh.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5)
    assert m["relative_reconstruction_bias"] == pytest.approx(
        float(xh.pow(2).sum() / (x * xh).sum()), rel=1e-5
    )


def test_shrinkage_metrics_of_a_halved_reconstruction() -> None:
    """x_hat = x / 2: the L2 ratio is 1/2, and the relative reconstruction bias E||x_hat||^2 / E[x . x_hat] too."""

    class Half(TopKSAE):
        def reconstruct(self, x):  # type: ignore[override]
            return x / 2, super().reconstruct(x)[1]

    x = torch.randn(300, 10) * 3 + 1
    m = reconstruction_metrics(Half(SAEConfig("topk", 10, 40, 3)), [x[:100], x[100:]], 0.1)
    assert m["l2_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)


def test_downstream_scores_bounds(tiny_model_dir, corpus_file) -> None:
    """A perfect SAE scores 1; an SAE that outputs zeros scores 0 when it replaces every position, since zero
    ablation zeroes every position, BOS included (SAEBench)."""
    lm = load_model(str(tiny_model_dir))
    data = DataConfig(dataset=str(corpus_file), ctx_len=32, exclude_first=0, exclude_special=False)
    windows = build_windows(data, lm.tokenizer, seed=0)
    assert windows.keep[windows.eval_idx[:4]].all()

    class Identity(TopKSAE):
        def reconstruct(self, x):  # type: ignore[override]
            return x, super().reconstruct(x)[1]

    class Zero(TopKSAE):
        def reconstruct(self, x):  # type: ignore[override]
            return torch.zeros_like(x), super().reconstruct(x)[1]

    cfg = SAEConfig("topk", lm.d_model, 4 * lm.d_model, 4)
    both = downstream_scores(
        lm, [Identity(cfg), Zero(cfg)], windows, windows.eval_idx[:4], "model.layers.2", 2
    )
    perfect, zero = both
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["n_ce_tokens"] == int(windows.keep[windows.eval_idx[:4], :-1].sum())


@pytest.mark.bad_input
def test_sae_of_another_width_is_refused(tiny_model_dir, corpus_file) -> None:
    lm = load_model(str(tiny_model_dir))
    windows = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=32), lm.tokenizer, seed=0)
    with pytest.raises(SAEError, match=r"d_in=48 does not match the width 32 of model\.layers\.2"):
        evaluate(lm, build(SAEConfig("topk", 48, 96, 4)), windows, "model.layers.2", EvalConfig(n_windows=2))
    # a residual-width SAE at the MLP's hidden activation (width 64) is refused too
    with pytest.raises(
        SAEError, match=r"d_in=32 does not match the width 64 of model\.layers\.1\.mlp\.act_fn"
    ):
        evaluate(lm, build(SAEConfig("topk", 32, 96, 4)), windows, "model.layers.1.mlp.act_fn", EvalConfig())


def test_sae_at_a_hookpoint_narrower_or_wider_than_d_model(tiny_model_dir, corpus_file) -> None:
    """Eval follows the hookpoint's own width: an SAE on the MLP's hidden activation (64 wide in a d_model 32
    model) gets every metric, its reconstruction spliced into the MLP for the CE/KL scores."""
    lm = load_model(str(tiny_model_dir))
    windows = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=32), lm.tokenizer, seed=0)
    cfg = EvalConfig(n_windows=4, n_ce_windows=2)
    result = evaluate(lm, build(SAEConfig("topk", 64, 128, 8)), windows, "model.layers.1.mlp.act_fn", cfg)
    assert result.n_tokens == int(windows.keep[windows.eval_idx[:4]].sum())
    assert np.isfinite(result.explained_variance) and np.isfinite(result.ce_loss_score)
    assert result.ce_sae != result.ce_clean and 0 < result.l0 <= 8


def test_excluded_positions_never_reach_metrics(tiny_model_dir, corpus_file) -> None:
    lm = load_model(str(tiny_model_dir))
    windows = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=32), lm.tokenizer, seed=0)
    result = evaluate(
        lm,
        build(SAEConfig("topk", 32, 64, 4)),
        windows,
        "model.layers.2",
        EvalConfig(n_windows=4, n_ce_windows=2),
    )
    assert result.n_tokens == int(windows.keep[windows.eval_idx[:4]].sum())
    assert np.isfinite(result.explained_variance)


def test_mark_dominated_flags_sae_beaten_at_no_higher_l0() -> None:
    from saelab.eval.matched_l0 import mark_dominated

    saes = [
        {"l0": 10, "explained_variance": 0.8, "ce_loss_score": 0.90},
        {"l0": 20, "explained_variance": 0.7, "ce_loss_score": 0.95},  # EV beaten by the first at lower L0
        {"l0": 30, "explained_variance": 0.9, "ce_loss_score": 0.90},  # CE beaten by the second at lower L0
        {"l0": 10, "explained_variance": 0.8, "ce_loss_score": 0.90},  # a tie dominates nothing
    ]
    flags = [(e["dominated_ev"], e["dominated_ce"]) for e in mark_dominated(saes)]
    assert flags == [(False, False), (True, False), (False, True), (False, False)]
