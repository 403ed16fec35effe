"""Dead-latent resampling: latents forced dead stay dead without it and fire again with either method; the
re-initialisation follows Anthropic's recipe; the consistency score flags dead, weak and collapsing latents and
leaves healthy ones alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from support_train import planted, same_state

from saelab.config import ResampleConfig, TrainConfig
from saelab.sae import base as sae_lib
from saelab.sae.base import TrainLoss
from saelab.train.resample import (
    ConsistencyResampler,
    encoder_scale,
    latent_dim,
    reinit_latents_,
    sample_by_loss,
)
from saelab.train.trainer import train

BLOCK = 32  # latents 0..31 of 96 are forced dead
BASE = {
    "expansion": 4,
    "k": 4,
    "lr": 3e-3,
    "batch_size": 256,
    "epochs": 8,
    "auxk_coef": 0.0,
    "dead_tokens": 2000,
}


def kill_block(step: int, sae: sae_lib.SAE, loss: TrainLoss) -> None:
    """After the first step, push the block's encoder biases so low that no input can make them fire."""
    if step == 1:
        with torch.no_grad():
            sae.b_enc_F[:BLOCK] = -50.0


def block_fired(sae: sae_lib.SAE, x: torch.Tensor) -> int:
    return int((sae.dense_latents(x)[:, :BLOCK] > 0).any(dim=0).sum())


@pytest.mark.parametrize(
    ("arch", "resample", "extra"),
    [
        ("topk", "none", {}),
        ("topk", "anthropic", {}),
        ("topk", "consistency", {}),
        ("relu", "none", {"l1_coef": 1.0}),
        ("relu", "anthropic", {"l1_coef": 1.0}),  # Anthropic's own setting: encoder norm 0.2 x the mean
    ],
)
def test_forced_dead_latents_are_revived_only_by_resampling(
    tmp_path: Path, arch: str, resample: str, extra: dict[str, float]
) -> None:
    x = planted()
    cfg = TrainConfig(
        architecture=arch,
        resample=ResampleConfig(method=resample, every=20, tokens=2048),  # type: ignore[arg-type]
        **BASE,
        **extra,
    )
    result = train(x[:5000], cfg, seed=0, step_hook=kill_block, log_path=tmp_path / "log.jsonl")
    fired = block_fired(result.sae, x[5000:])  # held-out tokens, inference path
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    if resample == "none":
        assert fired == 0 and result.dead_fraction >= BLOCK / 96
        assert result.resample_events == () and not any("event" in r for r in records)
        return
    assert fired >= 0.9 * BLOCK
    first = result.resample_events[0]
    assert first.method == resample and first.resampled >= BLOCK and first.fired_after >= 0.9 * BLOCK
    events = [r for r in records if r.get("event") == "resample"]
    assert [(e["step"], e["resampled"]) for e in events] == [
        (e.step, e.resampled) for e in result.resample_events
    ]
    summary = records[-1]
    assert summary["event"] == "resample_summary"
    assert summary["resampled_fired"] == sum(e.fired_after for e in result.resample_events)
    metrics = [r for r in records if "event" not in r]
    assert metrics[-1]["resampled"] == sum(e.resampled for e in result.resample_events)


@pytest.mark.parametrize("resample", ["anthropic", "consistency"])
def test_healthy_training_is_left_alone(resample: str) -> None:
    """No dead or unstable latents on planted data: no event, and the very same SAE as without resampling.
    (The encoder starts tied at scale 1: from the default 0.577 the surplus latents of this data go idle.)"""
    x = planted(n=3000)
    healthy = {**BASE, "auxk_coef": 1 / 32, "encoder_init_scale": 1.0}
    cfg = TrainConfig(resample=ResampleConfig(every=10, tokens=1024), **healthy)  # type: ignore[arg-type]
    plain = train(x, cfg, seed=0)
    resampling = dataclasses.replace(cfg.resample, method=resample)  # type: ignore[arg-type]
    with_resampling = train(x, dataclasses.replace(cfg, resample=resampling), seed=0)
    assert with_resampling.resample_events == ()
    assert same_state(plain.sae, with_resampling.sae)


def test_reinit_follows_anthropic() -> None:
    """Decoder row = unit direction of a sampled input minus b_dec; encoder = that direction with norm
    scale x mean norm of the kept latents; bias 0; Adam moments of those latents 0, the others untouched."""
    torch.manual_seed(0)
    sae = sae_lib.build(sae_lib.SAEConfig("topk", 8, 32, 2))
    opt = torch.optim.Adam(sae.parameters())
    x = torch.randn(64, 8)
    sae.training_loss(x, sae_lib.LossInputs(torch.zeros(32, dtype=torch.bool), 4, 0.0)).total.backward()
    opt.step()
    with torch.no_grad():
        sae.b_dec_D.fill_(0.5)
    kept = torch.ones(32, dtype=torch.bool)
    idx = torch.tensor([3, 7, 20])
    kept[idx] = False
    mean_norm = sae.W_enc_DF[:, kept].norm(dim=0).mean()
    before = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in sae.named_parameters()}
    inputs = torch.randn(4, 8) * 3
    reinit_latents_(sae, opt, idx, inputs, torch.Generator().manual_seed(0), enc_scale=0.2)
    directions = (inputs - 0.5) / (inputs - 0.5).norm(dim=1, keepdim=True)
    for i in idx.tolist():
        match = (directions - sae.W_dec_FD[i]).norm(dim=1).argmin()  # the input it was drawn from
        torch.testing.assert_close(sae.W_dec_FD[i], directions[match])
        torch.testing.assert_close(sae.W_enc_DF[:, i], directions[match] * 0.2 * mean_norm)
        assert sae.b_enc_F[i] == 0
    for name, p in sae.named_parameters():
        dim = latent_dim(name)
        for key in ("exp_avg", "exp_avg_sq"):
            now, old = opt.state[p][key], before[name][key]
            if dim is None:
                assert torch.equal(now, old), name
                continue
            assert (now.index_select(dim, idx) == 0).all(), name
            keep = kept.nonzero().flatten()
            assert torch.equal(now.index_select(dim, keep), old.index_select(dim, keep)), name


def test_inputs_are_drawn_in_proportion_to_squared_loss() -> None:
    loss = torch.tensor([0.0, 1.0, 2.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    picks = torch.cat([sample_by_loss(loss, 1, gen) for _ in range(4000)])
    counts = torch.bincount(picks, minlength=4)
    assert counts[0] == counts[3] == 0
    assert counts[2] / counts[1] == pytest.approx(4.0, rel=0.15)  # 2^2 : 1^2
    assert sorted(sample_by_loss(loss, 2, gen).tolist()) == [1, 2]  # distinct while enough inputs have loss


def test_latent_dimension_from_the_shape_suffix() -> None:
    assert [latent_dim(n) for n in ("W_enc_DF", "W_dec_FD", "b_enc_F", "b_dec_D", "log_threshold_F")] == [
        1,
        0,
        0,
        None,
        0,
    ]
    assert encoder_scale(TrainConfig(architecture="relu")) == 0.2
    assert encoder_scale(TrainConfig(architecture="topk")) == 1.0
    assert encoder_scale(TrainConfig(resample=ResampleConfig(encoder_scale=0.5))) == 0.5


def fake_loss(z_BF: torch.Tensor) -> TrainLoss:
    zero = torch.zeros(())
    count_F = (z_BF > 0).sum(dim=0).float()
    return TrainLoss(zero, zero, zero, zero, count_F.sum() / z_BF.shape[0], count_F, z_BF.sum(dim=0))


def test_consistency_score_flags_dead_weak_and_collapsing_latents() -> None:
    """Latents: 0 steady (5%), 1 never fires, 2 fires at 5% with a tiny activation, 3 fires at 20% then stops,
    4 steady and dense (50%). After the collapse, 3 is flagged at once by the short window, long before its
    long-window frequency falls below `resample.consistency_min_freq`."""
    cfg = TrainConfig(
        batch_size=200,
        dead_tokens=4000,
        resample=ResampleConfig(consistency_min_freq=1e-4, consistency_z=3.0),
    )
    r = ConsistencyResampler(cfg, 5, torch.device("cpu"), seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(60):
        u = torch.rand(200, 5, generator=gen)
        z = torch.zeros(200, 5)
        z[:, 0] = (u[:, 0] < 0.05).float()
        z[:, 2] = (u[:, 2] < 0.05).float() * 1e-4
        z[:, 3] = (u[:, 3] < 0.2).float() * (step < 40)
        z[:, 4] = (u[:, 4] < 0.5).float() * 2.0
        r.observe(fake_loss(z), z.amax(dim=0) > 0, lambda t: t)
    scores = r.scores()
    assert scores[0] < 0 and scores[4] < 0
    assert scores[1] > 0 and scores[2] > 0 and scores[3] > 0
    f_long_3 = float(r.f_long_F[3] / (1 - (1 - r.a_long) ** r.steps_F[3]))
    assert f_long_3 > 10 * cfg.resample.consistency_min_freq  # flagged as unstable, not (yet) as dead
    assert r.choose(torch.zeros(5, dtype=torch.long)).tolist() == [False, True, True, True, False]


def test_consistency_leaves_young_latents_alone() -> None:
    """Statistics of fewer than `dead_tokens` tokens are not judged (nor are re-initialised latents')."""
    cfg = TrainConfig(batch_size=200, dead_tokens=4000)
    r = ConsistencyResampler(cfg, 3, torch.device("cpu"), seed=0)
    for _ in range(10):  # 2000 tokens
        r.observe(fake_loss(torch.zeros(200, 3)), torch.zeros(3, dtype=torch.bool), lambda t: t)
    assert not r.choose(torch.zeros(3, dtype=torch.long)).any()
