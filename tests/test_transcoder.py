"""Transcoders and skip transcoders (issue 20): every registered architecture reads one hookpoint and reconstructs
another, its loss against the target; the skip path; folding the two training scales; training on planted pairs;
the config a checkpoint records, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from saelab.activations.paired import PairedTensorSource
from saelab.config import ConfigError, ResampleConfig, TrainConfig
from saelab.sae import base as sae_lib
from saelab.sae.base import LossInputs, SAEConfig, SAEError, build
from saelab.sae.registry import REGISTRY
from saelab.train.trainer import TrainError, sae_config, train_many

D_IN, D_OUT, F = 12, 20, 48


def tc_config(arch: str, skip: bool = False) -> SAEConfig:
    cfg = TrainConfig(architecture=arch, k=6, expansion=F // D_IN, target_hookpoint="t", skip=skip)
    return sae_config(cfg, D_IN, "in", "m", ("t", D_OUT))


def randomised(cfg: SAEConfig, seed: int = 0) -> sae_lib.SAE:
    """A transcoder with every parameter and buffer away from its start (thresholds positive)."""
    torch.manual_seed(seed)
    sae = build(cfg)
    with torch.no_grad():
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            if name == "log_threshold_F":
                t.copy_(torch.rand_like(t).mul(0.5).add(0.05).log())
            elif name == "threshold":
                t.fill_(0.3)
            else:
                t.copy_(torch.randn_like(t) * (0.3 if t.dim() == 2 else 1.0))
    return sae


def planted_pairs(n: int = 6000, linear: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: sparse combinations of input directions plus a mean; y: the same coefficients on other (output)
    directions, plus `linear` times a fixed dense linear map of x (what a skip path can carry)."""
    g = torch.Generator().manual_seed(seed)
    n_feat, active = 40, 3
    dirs_in = torch.nn.functional.normalize(torch.randn(n_feat, D_IN, generator=g), dim=1)
    dirs_out = torch.nn.functional.normalize(torch.randn(n_feat, D_OUT, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 4 + 1
    x = torch.einsum("nk,nkd->nd", coef, dirs_in[idx]) * 5 + 3 * torch.randn(D_IN, generator=g)
    y = torch.einsum("nk,nkd->nd", coef, dirs_out[idx]) * 2 + 1 * torch.randn(D_OUT, generator=g)
    if linear:
        y = y + linear * (x - x.mean(0)) @ (torch.randn(D_IN, D_OUT, generator=g) / D_IN**0.5)
    return x, y


def fvu(sae: sae_lib.SAE, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        y_hat = sae.reconstruct(x)[0]
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", list(REGISTRY))
@pytest.mark.parametrize("skip", [False, True])
def test_every_architecture_as_a_transcoder_writes_the_target_width_and_forward_is_decode_encode_plus_skip(
    arch: str, skip: bool
) -> None:
    sae = randomised(tc_config(arch, skip)).eval()
    x = torch.randn(32, D_IN) * 2
    out = sae(x)
    assert out.x_hat_BD.shape == (32, D_OUT)
    expected = sae.decode(sae.encode(x)) + (x @ sae.W_skip_DO if skip else 0)
    torch.testing.assert_close(out.x_hat_BD, expected)
    torch.testing.assert_close(sae.reconstruct(x)[0], expected)
    assert (sae.W_skip_DO is not None) == skip
    with pytest.raises(SAEError, match="transcoder reads d_in=12"):
        sae.encode(torch.randn(4, D_OUT))


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_the_training_loss_is_against_the_target_with_the_skip_path_learning(arch: str) -> None:
    sae = randomised(tc_config(arch, skip=True)).train()
    sae.use_sparse_kernels(False)  # the dense reference path: latents from train_latents, decoded densely
    x, y = torch.randn(64, D_IN) * 2, torch.randn(64, D_OUT)
    inputs = LossInputs(torch.zeros(F, dtype=torch.bool), 6, 0.0, 0.1, 0.1, None, y)
    loss = sae.training_loss(x, inputs)
    with torch.no_grad():
        y_hat = sae.decode_dense(sae.train_latents(sae.linear(x))) + x @ sae.W_skip_DO
    torch.testing.assert_close(loss.mse, (y - y_hat).pow(2).sum(-1).mean())
    loss.total.backward()
    assert sae.W_skip_DO.grad is not None and sae.W_skip_DO.grad.abs().sum() > 0
    with pytest.raises(SAEError, match="given no target"):
        sae.training_loss(x, inputs._replace(target_BD=None))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_kernels_give_a_transcoder_the_dense_paths_loss_and_gradients(arch: str) -> None:
    x, y = torch.randn(64, D_IN) * 2, torch.randn(64, D_OUT)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True  # AuxK on: its residual is the target's
    grads = []
    for sparse in (True, False):
        sae = randomised(tc_config(arch, skip=True)).train()
        sae.use_sparse_kernels(sparse)
        loss = sae.training_loss(x, LossInputs(dead, 8, 1 / 32, target_BD=y))
        loss.total.backward()
        grads.append((loss.total.detach(), {n: p.grad for n, p in sae.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], msg=name)


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_folding_the_two_training_scales_gives_raw_targets_from_raw_inputs(arch: str) -> None:
    """The pitfall of METRICS.md for two scales: the folded transcoder on raw x equals the unfolded one on
    x * s_in, divided by s_out, latents included."""
    sae = randomised(tc_config(arch, skip=True)).eval()
    x = torch.randn(64, D_IN) * 7
    s_in, s_out = 0.37, 2.9
    with torch.no_grad():
        y_scaled, code = sae.reconstruct(x * s_in)
        z_scaled = sae.dense_latents(x * s_in)
    sae.fold_scales(s_in, s_out)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x)[0], y_scaled / s_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.dense_latents(x), z_scaled / s_out, rtol=1e-4, atol=1e-4)


def train_pairs(cfgs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor) -> list[sae_lib.SAE]:
    source = PairedTensorSource(x, y, hookpoints=["in", "out"])
    results = train_many(source, cfgs, 0, slots=[0] * len(cfgs), target_slots=[1] * len(cfgs))
    return [r.sae for r in results]


def test_a_transcoder_learns_a_planted_map_and_a_skip_transcoder_carries_its_linear_part() -> None:
    x, y = planted_pairs(8000, linear=3.0)
    (x, xt), (y, yt) = x.split([6000, 2000]), y.split([6000, 2000])  # held-out pairs of the same maps
    base = TrainConfig(k=3, expansion=4, lr=4e-3, batch_size=256, epochs=6, target_hookpoint="out",
                       checkpoint_every=0, log_every=1000)  # fmt: skip
    plain, skip = train_pairs([base, dataclasses.replace(base, skip=True)], x, y)
    assert plain.cfg.d_out == D_OUT and plain.cfg.target_hookpoint == "out" and skip.cfg.skip
    f_plain, f_skip = fvu(plain, xt, yt), fvu(skip, xt, yt)
    assert f_plain < 0.6  # far below 1 (predicting the mean): the sparse map is learnt from the input
    assert f_skip < 0.5 * f_plain  # the dense linear part goes through the skip path, not the 3 latents
    l0 = float((skip.encode(xt).top_acts_BK > 0).sum(1).float().mean())
    assert l0 <= 3


def test_a_transcoders_checkpoint_records_both_hookpoints_d_out_and_the_skip(tmp_path: Path) -> None:
    sae = randomised(tc_config("jumprelu", skip=True))
    sae_lib.save(sae, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_out"], cfg["hookpoint"], cfg["target_hookpoint"], cfg["skip"]) == (
        D_IN, D_OUT, "in", "t", True,
    )  # fmt: skip
    back = sae_lib.load(tmp_path / "tc")
    x = torch.randn(8, D_IN)
    torch.testing.assert_close(back.reconstruct(x)[0], sae.eval().reconstruct(x)[0])
    # an SAE's cfg.json (and so its params hash) has no transcoder fields
    plain = build(SAEConfig("topk", 8, 32, k=4, hookpoint="h"))
    assert set(plain.cfg.to_json()) == {"architecture", "d_in", "d_sae", "hookpoint", "model", "k"}


@pytest.mark.bad_input
def test_transcoder_settings_without_a_target_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="give --train.target-hookpoint too"):
        TrainConfig(skip=True)
    with pytest.raises(ConfigError, match="resample.method none"):
        TrainConfig(target_hookpoint="layers.1.mlp", resample=ResampleConfig(method="anthropic"))
    with pytest.raises(SAEError, match="config needs d_out > 0"):
        SAEConfig("topk", 8, 32, k=4, skip=True)
    x = torch.randn(600, 8)
    with pytest.raises(TrainError, match="trains on \\(input, target\\) pairs"):
        train_many(x, [TrainConfig(k=4, batch_size=128, target_hookpoint="out")], 0)
