"""Trainer: learns a planted sparse dictionary, folds the input scale correctly, AuxK revives dead latents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.activations import ActivationError
from saelab.config import TrainConfig
from saelab.evaluate import reconstruction_metrics
from saelab.train import auxk_loss, geometric_median, lr_factor, train


def planted(n: int = 6000, d: int = 24, n_feat: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of random unit directions, plus a large mean and scale (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 4 + 1
    x = torch.einsum("nk,nkd->nd", coef, dirs[idx])
    return 50 * x + 30 * torch.randn(d, generator=g)


def test_learns_planted_dictionary(tmp_path: Path) -> None:
    x = planted()
    cfg = TrainConfig(expansion=4, k=4, lr=3e-3, batch_size=256, epochs=8)
    result = train(x[:5000], cfg, seed=0, log_path=tmp_path / "log.jsonl")
    m = reconstruction_metrics(result.sae, [x[5000:]], 0.1)
    assert m["explained_variance"] > 0.9
    assert m["l0"] <= 4
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["ev"] > rows[0]["ev"]


def test_scale_is_folded_into_the_saved_sae() -> None:
    """The folded SAE on raw inputs gives the same latents (up to the scale) and reconstructions as training saw."""
    x = planted(n=2000)
    result = train(x, TrainConfig(expansion=2, k=3, epochs=1, batch_size=256), seed=0)
    s = result.sae
    scale = (x.shape[1] / x.pow(2).sum(1).mean()).sqrt()
    out_raw = s(x[:64])
    # An unfolded copy (biases multiplied back) applied to scaled inputs must agree after unscaling.
    with torch.no_grad():
        s.b_dec_D *= scale
        s.b_enc_F *= scale
    out_scaled = s(x[:64] * scale)
    torch.testing.assert_close(out_raw.x_hat_BD * scale, out_scaled.x_hat_BD, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        out_raw.code.top_acts_BK * scale, out_scaled.code.top_acts_BK, rtol=1e-4, atol=1e-3
    )


def test_auxk_loss_only_with_dead_latents_and_reaches_them() -> None:
    torch.manual_seed(0)
    from saelab.sae import SAEConfig, build

    s = build(SAEConfig("topk", 8, 32, 2))
    x = torch.randn(16, 8)
    out = s(x)
    resid = (x - out.x_hat_BD).detach()
    none_dead = torch.zeros(32, dtype=torch.bool)
    assert auxk_loss(s, out.pre_acts_BF, resid, none_dead, 4).item() == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    loss = auxk_loss(s, out.pre_acts_BF, resid, dead, 4)
    loss.backward()
    assert loss.item() > 0
    assert s.W_enc_DF.grad is not None
    assert s.W_enc_DF.grad[:, :10].abs().sum() > 0  # the dead latents' encoders get a gradient


def test_no_dead_latents_on_planted_data() -> None:
    result = train(
        planted(n=4000), TrainConfig(expansion=2, k=4, epochs=4, batch_size=256, dead_tokens=3000), 0
    )
    assert result.dead_fraction < 0.1


def test_nan_activations_are_refused() -> None:
    x = planted(n=600)
    x[17, 3] = float("nan")
    with pytest.raises(ActivationError, match="NaN/inf"):
        train(x, TrainConfig(), seed=0)


def test_lr_schedule_warmup_and_decay() -> None:
    total = 100
    assert lr_factor(0, total) < lr_factor(4, total) == 1.0
    assert lr_factor(50, total) == 1.0
    assert lr_factor(99, total) < 0.1


def test_geometric_median_resists_outliers() -> None:
    x = torch.zeros(101, 3)
    x[:5] = 1000.0
    assert geometric_median(x).norm() < 1.0
