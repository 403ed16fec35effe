"""Trainer: every architecture learns a planted sparse dictionary, the input scale is folded correctly, AuxK revives
dead latents, BatchTopK's threshold keeps the training sparsity, bad configs and inputs are clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from support_train import planted, planted_directions

from saelab.activations.store import ActivationError
from saelab.config import ConfigError, JumpReLUConfig, MatryoshkaConfig, ResampleConfig, TrainConfig
from saelab.eval.core import reconstruction_metrics
from saelab.sae import base as sae_lib
from saelab.sae.base import SAEError
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.train import memory
from saelab.train.trainer import (
    TrainError,
    auxk_loss,
    geometric_median,
    input_scale,
    lr_factor,
    sae_config,
    sparsity_factor,
    train,
    train_many,
)


def test_learns_planted_dictionary(tmp_path: Path) -> None:
    x = planted()
    cfg = TrainConfig(expansion=4, k=4, lr=3e-3, batch_size=256, epochs=8)
    result = train(x[:5000], cfg, seed=0, log_path=tmp_path / "log.jsonl")
    m = reconstruction_metrics(result.sae, [x[5000:]], 0.1)
    assert m["explained_variance"] > 0.9
    assert m["l0"] <= 4
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["ev"] > rows[0]["ev"]


# Planted data: 48 true directions, 3 active per token (L0 = 3), width 96. The L1 SAE needs longer training for
# its sparsity to emerge; its penalty and JumpReLU's threshold are set for data of this scale.
PLANTED_RUNS = {
    # architecture: (extra config, min EV, L0 range)
    "topk": ({}, 0.9, (3.9, 4.0)),
    "batchtopk": ({}, 0.85, (3.4, 4.6)),
    "matryoshka": ({"matryoshka": MatryoshkaConfig((0.25, 1.0))}, 0.82, (3.4, 4.6)),
    "relu": ({"l1_coef": 1.0, "epochs": 16}, 0.85, (3.0, 20.0)),
    "jumprelu": ({"l0_coef": 0.3, "jumprelu": JumpReLUConfig(init_threshold=1.0)}, 0.8, (2.5, 5.0)),
}


@pytest.mark.parametrize("arch", sorted(PLANTED_RUNS))
def test_every_architecture_learns_planted_data(arch: str) -> None:
    extra, min_ev, (lo, hi) = PLANTED_RUNS[arch]
    x = planted()
    cfg = TrainConfig(**{"expansion": 4, "k": 4, "lr": 3e-3, "batch_size": 256, "epochs": 8, **extra})
    result = train(x[:5000], dataclasses.replace(cfg, architecture=arch), seed=0)
    assert result.sae.architecture == arch and not result.sae.training
    m = reconstruction_metrics(result.sae, [x[5000:]], 0.1)  # held-out tokens, inference path
    assert m["explained_variance"] > min_ev
    assert lo <= m["l0"] <= hi
    # The dictionary is learnt: every planted direction has a decoder row along it. Up to the surplus half of the
    # 96 latents may idle (48 directions).
    rows_FD = result.sae.W_dec_FD.detach()
    best_cos = (planted_directions() @ (rows_FD / rows_FD.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert best_cos.min() > 0.8 and best_cos.mean() > 0.93
    assert m["dead_fraction"] <= 0.5


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_reproduces_training_sparsity_on_held_out_data(arch: str) -> None:
    """Inference replaces the batch by the learned threshold: mean L0 on unseen tokens stays close to k."""
    x = planted(n=7000, seed=1)
    cfg = TrainConfig(architecture=arch, expansion=4, k=6, lr=3e-3, batch_size=256, epochs=6)
    sae = train(x[:5000], cfg, seed=0).sae
    l0 = float((sae.dense_latents(x[5000:]) > 0).sum(1).float().mean())
    assert l0 == pytest.approx(6, rel=0.15)


def train_capturing_fold(
    x: torch.Tensor, cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> tuple[sae_lib.SAE, sae_lib.SAE, float]:
    """(returned SAE, a copy of the SAE as trained just before the fold, the input scale)."""
    cls = sae_lib.REGISTRY[cfg.architecture]
    fold = cls.fold_input_scale
    seen: dict[str, Any] = {}

    def spy(self: sae_lib.SAE, scale: float) -> None:
        seen["trained"], seen["scale"] = copy.deepcopy(self), scale
        fold(self, scale)

    monkeypatch.setattr(cls, "fold_input_scale", spy)
    folded = train(x, cfg, seed=0).sae
    return folded, seen["trained"], seen["scale"]


@pytest.mark.parametrize("arch", sorted(PLANTED_RUNS))
def test_scale_is_folded_into_the_returned_sae(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folded SAE on raw inputs gives the latents (up to the scale) and reconstructions that the SAE as trained
    gives on scaled inputs (biases, BatchTopK's threshold and JumpReLU's thresholds all fold)."""
    x = planted(n=2000)
    cfg = TrainConfig(
        architecture=arch,
        expansion=2,
        k=3,
        epochs=1,
        batch_size=256,
        l1_coef=1.0,
        jumprelu=JumpReLUConfig(init_threshold=1.0),
    )
    s, trained, scale = train_capturing_fold(x, cfg, monkeypatch)
    assert scale == pytest.approx(float((x.shape[1] / x.pow(2).sum(1).mean()).sqrt()), rel=1e-5)
    raw, scaled = x[:256], x[:256] * scale
    torch.testing.assert_close(s(raw).x_hat_BD * scale, trained(scaled).x_hat_BD, rtol=1e-4, atol=1e-3)
    z_raw, z_scaled = s.dense_latents(raw), trained.dense_latents(scaled)
    assert (z_raw > 0).sum(1).float().mean() >= 1  # latents fire, so the check has teeth
    assert (
        (z_raw > 0) == (z_scaled > 0)
    ).float().mean() > 0.999  # same active latents (ties at a threshold aside)
    torch.testing.assert_close(z_raw * scale, z_scaled, rtol=1e-4, atol=2e-3)


def test_threshold_learns_and_stays_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=2,
        lr=3e-3,
        epochs=8,
        batch_size=256,
        jumprelu=JumpReLUConfig(init_threshold=1.0),
    )
    s, trained, _ = train_capturing_fold(planted(n=2000), cfg, monkeypatch)
    assert isinstance(s, JumpReLUSAE) and isinstance(trained, JumpReLUSAE)
    assert s.log_threshold_F.dtype == torch.float32
    moved = trained.log_threshold_F.detach() - math.log(1.0)
    assert moved.abs().max() > 0.05 and moved.std() > 0.01  # thresholds learned, each its own way


def test_auxk_loss_only_with_dead_latents_and_reaches_them() -> None:
    torch.manual_seed(0)
    s = sae_lib.build(sae_lib.SAEConfig("topk", 8, 32, 2))
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
    torch.testing.assert_close(
        auxk_loss(s, s.linear(x), resid, dead, 4), loss
    )  # raw pre-activations work too


def test_no_dead_latents_on_planted_data() -> None:
    result = train(
        planted(n=4000), TrainConfig(expansion=2, k=4, epochs=4, batch_size=256, dead_tokens=3000), 0
    )
    assert result.dead_fraction < 0.1


@pytest.mark.bad_input
def test_nan_activations_are_refused() -> None:
    x = planted(n=600)
    x[17, 3] = float("nan")
    with pytest.raises(ActivationError, match="NaN/inf"):
        train(x, TrainConfig(), seed=0)


@pytest.mark.bad_input
def test_too_few_activations_and_too_large_k_are_refused() -> None:
    x = planted(n=600)
    with pytest.raises(TrainError, match="fewer than one batch"):
        train(x, TrainConfig(batch_size=1024), seed=0)
    with pytest.raises(SAEError, match="k must be in"):
        train(x, TrainConfig(expansion=2, k=48, batch_size=256), seed=0)  # d_sae = 48


def test_sae_config_takes_the_architecture_parameters_from_the_train_config() -> None:
    for arch, cls in sae_lib.REGISTRY.items():
        assert set(cls.params_from(TrainConfig(architecture=arch))) == set(cls.params), arch  # type: ignore[arg-type]
    c = sae_config(TrainConfig(architecture="matryoshka", k=8, expansion=2), 16, "layers.3")
    assert (c.d_sae, c.k, c.matryoshka_prefix_fractions, c.hookpoint) == (
        32,
        8,
        (0.0625, 0.25, 1.0),
        "layers.3",
    )
    assert sae_config(TrainConfig(architecture="relu"), 16).k == 0  # k is not a relu parameter


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("l1_coef", -1.0),
        ("l0_coef", -0.1),
        ("sparsity_warmup_fraction", 1.0),
        ("jumprelu.bandwidth", 0.0),
        ("jumprelu.init_threshold", -0.1),
        ("jumprelu.threshold_lr", -1.0),
        ("matryoshka.prefix_fractions", (0.5, 0.25, 1.0)),
        ("matryoshka.prefix_fractions", (0.25, 0.5)),
        ("matryoshka.prefix_fractions", ()),
        ("resample.every", 0),
        ("resample.tokens", 0),
        ("resample.consistency_min_freq", 1.0),
        ("architecture", "gated"),
    ],
)
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    """Nested settings are named by their path, as their flags are (`--train.jumprelu.bandwidth`)."""
    section, _, leaf = field.rpartition(".")
    with pytest.raises(ConfigError, match=f"train.{re.escape(field)} must be"):
        if section:
            TrainConfig(**{section: SECTIONS[section](**{leaf: value})})  # type: ignore[arg-type]
        else:
            TrainConfig(**{field: value})  # type: ignore[arg-type]


SECTIONS: dict[str, Any] = {
    "jumprelu": JumpReLUConfig,
    "matryoshka": MatryoshkaConfig,
    "resample": ResampleConfig,
}


def test_variants_override_nested_settings_by_their_path() -> None:
    """`train.variants` names a nested setting as its flag does, without `--train.`; the settings a variant
    does not name are the main SAE's, nested ones included."""
    base = TrainConfig(
        jumprelu=JumpReLUConfig(init_threshold=0.5),
        variants=("architecture=jumprelu jumprelu.bandwidth=0.1 resample.method=anthropic", "k=8"),
    )
    jump, k8 = base.variant_configs()
    assert jump.jumprelu == JumpReLUConfig(bandwidth=0.1, init_threshold=0.5)
    assert (jump.architecture, jump.resample.method, jump.resample.every) == ("jumprelu", "anthropic", 250)
    assert dataclasses.replace(k8, k=base.k) == dataclasses.replace(base, variants=())
    fractions = base.with_overrides("matryoshka.prefix_fractions=0.25,1").matryoshka.prefix_fractions
    assert fractions == (0.25, 1.0)
    assert base.with_overrides("jumprelu.init-threshold=2 auxk-coef=0") == dataclasses.replace(
        base, jumprelu=JumpReLUConfig(init_threshold=2.0), auxk_coef=0.0, variants=()
    )


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("jumprelu_bandwidth=0.1", "'jumprelu_bandwidth=0.1' in .* is not NAME=VALUE of a setting"),
        ("jumprelu.nope=1", "'jumprelu.nope=1' in .* is not NAME=VALUE"),
        ("jumprelu=1", "'jumprelu=1' in .* is not NAME=VALUE"),
        ("batch_size=64", "all SAEs share batch_size, epochs, resume, stream_buffer_rows"),
        ("resample.method=sometimes", "resample.method must be one of none, anthropic, consistency"),
        ("jumprelu.bandwidth=-1", "train.jumprelu.bandwidth must be > 0"),
        ("architecture=gated", "train.architecture must be a registered architecture"),
    ],
)
def test_bad_variants_are_named(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(variants=(override,))


def test_lr_schedule_warmup_and_decay() -> None:
    total = 100
    assert lr_factor(0, total) < lr_factor(4, total) == 1.0
    assert lr_factor(50, total) == 1.0
    assert lr_factor(99, total) < 0.1


def test_sparsity_coefficient_warmup() -> None:
    assert sparsity_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert sparsity_factor(4, 100, 0.1) == pytest.approx(0.5)
    assert sparsity_factor(9, 100, 0.1) == sparsity_factor(50, 100, 0.1) == 1.0
    assert sparsity_factor(0, 100, 0.0) == 1.0


def test_geometric_median_resists_outliers() -> None:
    x = torch.zeros(101, 3)
    x[:5] = 1000.0
    assert geometric_median(x).norm() < 1.0


def test_train_many_equals_training_each_alone(tmp_path: Path) -> None:
    """One shared stream of batches: each SAE ends exactly as it would trained alone, with its own log."""
    x = planted(n=2048, d=16)
    base = TrainConfig(expansion=4, k=3, lr=3e-3, batch_size=128, epochs=2, dead_tokens=512, log_every=4)
    cfgs = [
        base,
        dataclasses.replace(base, architecture="batchtopk", k=5, lr=1e-3),
        dataclasses.replace(base, architecture="relu", expansion=2, l1_coef=1.0),
        dataclasses.replace(base, architecture="jumprelu"),
        dataclasses.replace(
            base, architecture="matryoshka", resample=ResampleConfig(method="anthropic", every=8)
        ),
    ]
    logs = [tmp_path / f"{i}.jsonl" for i in range(len(cfgs))]
    together = train_many(x, cfgs, seed=0, log_paths=logs)
    for cfg, got, log in zip(cfgs, together, logs, strict=True):
        alone = train(x, cfg, seed=0, log_path=tmp_path / "alone.jsonl")
        assert got.steps == alone.steps == 32
        for name, value in alone.sae.state_dict().items():
            assert torch.equal(got.sae.state_dict()[name], value), (cfg.architecture, name)
        assert log.read_text() == (tmp_path / "alone.jsonl").read_text()
    assert len({log.read_text() for log in logs}) == len(cfgs)


@pytest.mark.bad_input
def test_train_many_refuses_configs_that_cannot_share_batches() -> None:
    base = TrainConfig(expansion=2, k=2, batch_size=128)
    with pytest.raises(TrainError, match=r"same train\.batch_size"):
        train_many(planted(n=600, d=8), [base, dataclasses.replace(base, batch_size=64)], seed=0)
    with pytest.raises(TrainError, match="at least one"):
        train_many(planted(n=600, d=8), [], seed=0)


def test_threshold_lr_moves_jumprelu_thresholds_at_their_own_rate() -> None:
    """Adam moves a parameter by about lr per step: with threshold_lr = 10 x lr the thresholds travel ~10x as far
    while the other weights stay on train.lr."""
    x = planted(n=1024, d=16)
    base = TrainConfig(architecture="jumprelu", expansion=2, lr=1e-3, batch_size=128, epochs=1)
    init = sae_lib.build(sae_config(base, 16)).threshold_F.detach().clone()
    unfold = math.log(
        input_scale(x)
    )  # the returned SAE takes raw inputs: its thresholds were divided by this

    def travel(cfg: TrainConfig) -> float:
        sae = train(x, cfg, seed=0).sae
        return float((sae.threshold_F.log() + unfold - init.log()).abs().mean())

    slow, fast = travel(base), travel(dataclasses.replace(base, jumprelu=JumpReLUConfig(threshold_lr=1e-2)))
    assert fast > 5 * slow > 0


def test_encoder_init_scale_scales_the_starting_encoder() -> None:
    """The SAE after one step at lr ~0 (the warm-up's first step) still holds the scaled start."""
    x = planted(n=512, d=16)
    base = TrainConfig(expansion=2, k=2, batch_size=512, epochs=1, lr=1e-12)
    one, half = (train(x, dataclasses.replace(base, encoder_init_scale=s), seed=0).sae for s in (1.0, 0.5))
    torch.testing.assert_close(half.W_enc_DF, one.W_enc_DF * 0.5, rtol=1e-4, atol=1e-6)


@pytest.mark.bad_input
def test_saes_too_large_for_the_memory_are_refused_before_any_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemAvailable:  4000000 kB\n")  # 3.8 GiB
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    x = planted(n=2000, d=16)
    wide = TrainConfig(expansion=1_000_000, k=4, batch_size=128, epochs=1)  # 5.3e8 parameters: 7.9 GiB, + 7.6
    with pytest.raises(TrainError, match=r"^train.expansion 1000000 needs at least 15.5 GiB on cpu .* but 3.8 GiB "
                       r"is available \(MemAvailable in .*meminfo\); lower --train.expansion"):  # fmt: skip
        train(x, wide, seed=0)
    with pytest.raises(TrainError, match=r"^2 SAEs \(expansion up to 1000000\) needs at least"):
        train_many(x, [dataclasses.replace(wide, expansion=4), wide], seed=0)
    meminfo.write_text("MemTotal:  8000000 kB\n")  # no figure to compare with: no check
    assert memory.available_bytes(torch.device("cpu")) is None


def test_training_bytes_counts_weights_gradients_adam_moments_and_a_batch_of_latents() -> None:
    cfg = sae_config(TrainConfig(expansion=4, k=4), d_in=16)
    n_params = 2 * 16 * 64 + 64 + 16  # W_enc, W_dec, b_enc, b_dec
    assert memory.training_bytes(cfg, 128) == (4 * 4 * n_params + 128 * 64 * 4, n_params)


def test_cpu_step_threads_one_after_matmul_trains_the_same_sae_and_restores_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cpu_step_threads="one-after-matmul"` runs a TopK step on one thread after its selection matmul (which keeps
    the caller's threads) and leaves the caller's thread count as it was; the SAE is the default setting's."""
    x = planted(n=2048, d=16)
    cfg = TrainConfig(expansion=4, k=3, lr=3e-3, batch_size=128, epochs=1, checkpoint_every=0)
    old, real = torch.get_num_threads(), torch.set_num_threads
    counts: list[int] = []
    real(2)
    try:
        default = train(x, cfg, seed=0).sae.state_dict()
        monkeypatch.setattr(torch, "set_num_threads", lambda n: counts.append(n) or real(n))
        one = train(x, dataclasses.replace(cfg, cpu_step_threads="one-after-matmul"), seed=0).sae.state_dict()
        assert torch.get_num_threads() == 2
    finally:
        real(old)
    assert 1 in counts and 2 in counts  # one thread for the step, two for its matmul and after it
    for name, value in default.items():
        torch.testing.assert_close(one[name], value, rtol=1e-5, atol=1e-6, msg=name)
