"""SAE invariants for every architecture, the architectures' definitions against direct references, and
checkpoint handling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from saelab.sae import base as sae_lib
from saelab.sae.base import REGISTRY, LossInputs, SAEConfig, SAEError, build
from saelab.sae.topk import BatchTopKSAE, TopKSAE

ARCHS = sorted(REGISTRY)
PARAMS: dict[str, dict[str, Any]] = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4, "matryoshka_prefix_fractions": (0.25, 0.5, 1.0)},
    "relu": {},
    "jumprelu": {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.5},
}


def make(arch: str = "topk", d_in: int = 16, d_sae: int = 64, **params: Any) -> sae_lib.SAE:
    torch.manual_seed(0)
    s = build(SAEConfig(arch, d_in, d_sae, **{**PARAMS[arch], **params}))
    with torch.no_grad():
        s.b_enc_F.normal_()
        s.b_dec_D.normal_()
        if isinstance(s, BatchTopKSAE):
            s.threshold.fill_(1.0)  # as if trained: inference uses the threshold
    return s


def no_dead(d_sae: int = 64) -> LossInputs:
    return LossInputs(torch.zeros(d_sae, dtype=torch.bool), 8, 0.0, l1_coef=0.0, l0_coef=0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_decode_of_encode_and_shapes(arch: str) -> None:
    s = make(arch)
    x = torch.randn(32, 16) * 2
    out = s(x)
    code = s.encode(x)
    torch.testing.assert_close(out.x_hat_BD, s.decode(code))
    x_hat, rcode = s.reconstruct(x)
    torch.testing.assert_close(x_hat, out.x_hat_BD)
    torch.testing.assert_close(s.decode(rcode), out.x_hat_BD)
    assert out.x_hat_BD.shape == (32, 16) and out.pre_acts_BF.shape == (32, 64)
    assert code.top_acts_BK.shape == code.top_idx_BK.shape and code.top_acts_BK.shape[0] == 32
    assert (code.top_acts_BK >= 0).all()
    z = s.dense_latents(x)
    assert z.shape == (32, 64)
    assert ((z > 0).sum(1) == (code.top_acts_BK > 0).sum(1)).all()  # padding never counts as activity
    torch.testing.assert_close(s.decode_dense(z), out.x_hat_BD)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_training_latents_equal_inference_latents(arch: str) -> None:
    """Where training and inference select the same way, the training path gives the same latents."""
    s = make(arch)
    x = torch.randn(32, 16) * 2
    torch.testing.assert_close(s.train_latents(s.linear(x)), s.dense_latents(x))


def test_topk_has_exactly_k_active_latents() -> None:
    s = make("topk", k=5)
    with torch.no_grad():
        s.b_enc_F.fill_(100.0)  # every pre-activation positive: no ReLU clipping inside the top k
    z = s.dense_latents(torch.randn(50, 16) * 3)
    assert ((z != 0).sum(dim=1) == 5).all()
    assert (z >= 0).all()


def test_variable_width_code_is_padded_with_zeros() -> None:
    s = make("relu")
    x = torch.randn(40, 16) * 2
    code, z = s.encode(x), s.dense_latents(x)
    counts = (z > 0).sum(1)
    assert counts.min() < counts.max()  # rows really differ
    assert code.top_acts_BK.shape[1] == counts.max()
    torch.testing.assert_close(code.top_acts_BK.sum(1), z.sum(1))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_decoder_rows_unit_norm_after_projection_step(arch: str) -> None:
    s = make(arch)
    x = torch.randn(64, 16)
    opt = torch.optim.SGD(s.parameters(), lr=0.5)
    s.training_loss(x, no_dead()).total.backward()
    s.project_decoder_grad()
    opt.step()
    s.normalize_decoder()
    torch.testing.assert_close(s.W_dec_FD.norm(dim=1), torch.ones(64))


def test_relu_decoder_is_unconstrained_and_l1_weighs_decoder_norms() -> None:
    s = make("relu")
    torch.testing.assert_close(s.W_dec_FD.norm(dim=1), torch.full((64,), 0.1))  # Anthropic's init norm
    with torch.no_grad():
        s.W_dec_FD.mul_(torch.linspace(0.5, 3.0, 64)[:, None])
    before = s.W_dec_FD.detach().clone()
    s.normalize_decoder()
    torch.testing.assert_close(s.W_dec_FD, before)
    x = torch.randn(32, 16)
    z = torch.relu(s.linear(x)).detach()
    got = s.sparsity_penalty(s.linear(x), z, no_dead()._replace(l1_coef=2.0))
    expected = 2.0 * sum(float(z[b, i]) * float(before[i].norm()) for b in range(32) for i in range(64)) / 32
    assert got.item() == pytest.approx(expected, rel=1e-5)


# --- BatchTopK and Matryoshka ---------------------------------------------------------------------------------


def test_batchtopk_training_keeps_the_k_times_batch_largest_of_the_batch() -> None:
    s = make("batchtopk")
    with torch.no_grad():
        s.threshold.zero_()  # untrained
    x = torch.randn(32, 16) * 2
    x[0] *= 10  # one loud token takes more than k latents: the selection is over the batch, not per row
    z = s.train_latents(s.linear(x)).detach()
    pre = torch.relu(s.linear(x)).detach()
    kth = pre.flatten().topk(4 * 32).values.min()
    assert int((z > 0).sum()) == 4 * 32
    torch.testing.assert_close(z, pre * (pre >= kth))
    assert (z[0] > 0).sum() > 4
    assert float(s.threshold) == pytest.approx(float(kth))  # first update: the smallest kept activation


def test_batchtopk_threshold_is_a_moving_average_of_the_smallest_kept_activation() -> None:
    s = make("batchtopk")
    with torch.no_grad():
        s.threshold.zero_()
    mins = []
    for scale in (1.0, 2.0, 3.0):
        x = torch.randn(32, 16) * scale
        mins.append(torch.relu(s.linear(x)).flatten().topk(4 * 32).values.min().item())
        s.train_latents(s.linear(x))
    d = s.threshold_decay
    expected = d * (d * mins[0] + (1 - d) * mins[1]) + (1 - d) * mins[2]
    assert float(s.threshold) == pytest.approx(expected, rel=1e-5)


def reference_matryoshka_loss(s: sae_lib.SAE, x: torch.Tensor, fractions: tuple[float, ...]) -> torch.Tensor:
    """Direct definition: one BatchTopK over the whole batch, then for every prefix m the squared error of
    z[:, :m] W_dec[:m] + b_dec, averaged over tokens, summed over prefixes."""
    pre = torch.relu((x - s.b_dec_D) @ s.W_enc_DF + s.b_enc_F)
    B, F = pre.shape
    keep = torch.zeros(B * F, dtype=torch.bool)
    keep[pre.flatten().argsort(descending=True)[: s.cfg.k * B]] = True
    z = pre * keep.view(B, F)
    total = torch.zeros(())
    for f in fractions:
        m = round(f * F)
        x_hat = z[:, :m] @ s.W_dec_FD[:m] + s.b_dec_D
        total = total + ((x - x_hat) ** 2).sum(-1).mean()
    return total


def test_matryoshka_loss_matches_the_reference_definition() -> None:
    fractions = (0.25, 0.5, 1.0)
    s = make("matryoshka", matryoshka_prefix_fractions=fractions)
    x = torch.randn(32, 16) * 2
    x[:4] *= 5  # uneven rows: a top-k per level or per row would select differently
    loss = s.training_loss(x, no_dead())
    torch.testing.assert_close(loss.total, reference_matryoshka_loss(s, x, fractions))
    assert int(loss.count_F.sum()) == 4 * 32  # ONE global selection: k*B latents in all
    full = ((x - s.decode_dense(s.train_latents(s.linear(x)))) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss.mse, full)


def test_matryoshka_gradients_match_the_reference_definition() -> None:
    fractions = (0.25, 0.5, 1.0)
    s = make("matryoshka", matryoshka_prefix_fractions=fractions)
    x = torch.randn(32, 16) * 2
    s.training_loss(x, no_dead()).total.backward()
    got = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
    s.zero_grad()
    reference_matryoshka_loss(s, x, fractions).backward()
    for n, p in s.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5)


# --- JumpReLU ---------------------------------------------------------------------------------------------------


def identity_jumprelu(n: int, theta: float, eps: float) -> sae_lib.SAE:
    """A JumpReLU SAE whose pre-activations equal its input (W_enc = I, zero biases)."""
    s = build(SAEConfig("jumprelu", n, n, jumprelu_bandwidth=eps, jumprelu_init_threshold=theta))
    with torch.no_grad():
        s.W_enc_DF.copy_(torch.eye(n))
    return s


@pytest.mark.parametrize("term", ["jumprelu", "l0"])
def test_jumprelu_threshold_gradient_matches_finite_differences(term: str) -> None:
    """The pseudo-derivative estimates the derivative of the expected loss: on pre-activations spread densely
    around theta, it equals a finite difference of the loss over a step wider than the spacing. Applying the
    threshold gradient twice (a known peer bug) doubles it and fails here."""
    theta, eps, h = 1.0, 0.02, 0.01
    pre = torch.linspace(0.0, 2.0, 200_001)[:, None].repeat(1, 3)  # 3 latents, same grid

    def loss(s: sae_lib.SAE) -> torch.Tensor:
        raw = s.linear(pre)
        if term == "jumprelu":
            return s.train_latents(raw).sum()
        return s.sparsity_penalty(raw, s.train_latents(raw), no_dead(3)._replace(l0_coef=1.0)) * pre.shape[0]

    s = identity_jumprelu(3, theta, eps)
    loss(s).backward()
    assert s.log_threshold_F.grad is not None
    grad_theta = s.log_threshold_F.grad / theta  # d/dlog(theta) = theta * d/dtheta
    up, down = identity_jumprelu(3, theta + h, eps), identity_jumprelu(3, theta - h, eps)
    fd = (loss(up) - loss(down)).detach() / (2 * h) / 3  # per latent
    torch.testing.assert_close(grad_theta, torch.full((3,), float(fd)), rtol=0.01, atol=0)


def test_jumprelu_gradients_match_the_hand_derived_pseudo_derivative() -> None:
    """Through the whole training loss: d/dtheta_i = sum_b dL/dz_bi * (-theta_i/eps) K_bi from the reconstruction
    plus l0_coef * (-1/eps) * mean_b K_bi from the L0 term; d/dpre = dL/dz * H(pre - theta) only."""
    eps, l0_coef = 0.5, 0.3
    s = make("jumprelu", jumprelu_bandwidth=eps, jumprelu_init_threshold=0.8)
    x = torch.randn(64, 16) * 2
    s.training_loss(x, no_dead()._replace(l0_coef=l0_coef)).total.backward()

    raw = s.linear(x).detach()
    theta = s.threshold_F.detach()
    z = (raw * (raw > theta)).requires_grad_()
    ((x - (z @ s.W_dec_FD + s.b_dec_D)) ** 2).sum(-1).mean().backward()
    assert z.grad is not None
    kernel = ((raw - theta).abs() < eps / 2).float()
    d_theta = (z.grad * -(theta / eps) * kernel).sum(0) + l0_coef * (-1 / eps) * kernel.mean(0)
    assert kernel.sum() > 10  # the window is populated, so the check has teeth
    assert s.log_threshold_F.grad is not None and s.W_enc_DF.grad is not None
    torch.testing.assert_close(s.log_threshold_F.grad, theta * d_theta, rtol=1e-4, atol=1e-6)
    d_pre = z.grad * (raw > theta)  # the L0 term sends nothing to the encoder
    torch.testing.assert_close(s.W_enc_DF.grad, (x - s.b_dec_D.detach()).T @ d_pre, rtol=1e-4, atol=1e-5)


def test_jumprelu_threshold_stays_fp32_when_the_sae_is_cast() -> None:
    s = make("jumprelu")
    with torch.no_grad():
        s.log_threshold_F.add_(torch.linspace(0, 1e-3, 64))  # differences below bf16's resolution
    before = s.log_threshold_F.detach().clone()
    s = s.to(torch.bfloat16)
    assert s.W_enc_DF.dtype == torch.bfloat16
    assert s.log_threshold_F.dtype == torch.float32
    assert torch.equal(s.log_threshold_F.detach(), before)
    out = s(torch.randn(8, 16, dtype=torch.bfloat16))
    assert torch.isfinite(out.x_hat_BD.float()).all()


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    s = make(arch)
    if arch == "jumprelu":
        with torch.no_grad():
            s.log_threshold_F.uniform_(-2, 1)  # learned state must survive
    sae_lib.save(s, tmp_path)
    loaded = sae_lib.load(tmp_path)
    assert type(loaded) is type(s) and not loaded.training
    x = torch.randn(8, 16) * 2
    torch.testing.assert_close(loaded(x).x_hat_BD, s(x).x_hat_BD)
    torch.testing.assert_close(loaded.dense_latents(x), s.dense_latents(x))
    assert not list(tmp_path.glob("*.tmp"))
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert saved["architecture"] == arch
    assert {k for k in saved if k not in ("architecture", "d_in", "d_sae", "hookpoint", "model")} == set(
        PARAMS[arch]
    )


@pytest.mark.bad_input
def test_loading_as_another_architecture_is_an_error(tmp_path: Path) -> None:
    sae_lib.save(make("topk"), tmp_path)
    assert isinstance(sae_lib.load(tmp_path, architecture="topk"), TopKSAE)
    with pytest.raises(SAEError, match="is a topk SAE, not relu"):
        sae_lib.load(tmp_path, architecture="relu")


@pytest.mark.bad_input
def test_relabelled_checkpoint_is_an_error(tmp_path: Path) -> None:
    """topk and relu SAEs have the same tensors: the weights' own metadata catches an edited cfg.json."""
    sae_lib.save(make("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "relu"}))
    with pytest.raises(SAEError, match="k=4 is not a parameter of a relu SAE"):
        sae_lib.load(tmp_path)
    del cfg["k"]
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "relu"}))
    with pytest.raises(SAEError, match="saved by a topk SAE"):
        sae_lib.load(tmp_path)


@pytest.mark.bad_input
def test_missing_checkpoint_is_an_error_not_untrained_weights(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="missing"):
        sae_lib.load(tmp_path)


@pytest.mark.bad_input
def test_corrupt_checkpoint_is_an_error(tmp_path: Path) -> None:
    sae_lib.save(make(), tmp_path)
    data = (tmp_path / "sae.safetensors").read_bytes()
    (tmp_path / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="corrupt"):
        sae_lib.load(tmp_path)


@pytest.mark.bad_input
def test_checkpoint_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    sae_lib.save(make(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="does not match"):
        sae_lib.load(tmp_path)


# --- bad input and bad configs --------------------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_d_in_is_a_clear_error(arch: str) -> None:
    with pytest.raises(SAEError, match="d_in=20"):
        make(arch).encode(torch.randn(3, 20))


@pytest.mark.bad_input
@pytest.mark.parametrize("arch", ARCHS)
def test_nan_input_is_a_clear_error(arch: str) -> None:
    x = torch.randn(3, 16)
    x[1, 2] = math.nan
    with pytest.raises(SAEError, match="NaN/inf"):
        make(arch)(x)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("k", [0, 64, 100])
def test_k_out_of_range(arch: str, k: int) -> None:
    with pytest.raises(SAEError, match="k must be"):
        SAEConfig(arch, 16, 64, **{**PARAMS[arch], "k": k})


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("arch", "params", "match"),
    [
        ("relu", {"k": 4}, "k=4 is not a parameter of a relu SAE"),
        ("topk", {"k": 4, "jumprelu_bandwidth": 0.1}, "jumprelu_bandwidth=0.1 is not a parameter"),
        ("jumprelu", {}, "jumprelu_bandwidth > 0"),
        ("matryoshka", {"k": 4, "matryoshka_prefix_fractions": (0.5, 0.25, 1.0)}, "prefix_fractions"),
        ("matryoshka", {"k": 4, "matryoshka_prefix_fractions": (0.25, 0.5)}, "ending at 1.0"),
        ("matryoshka", {"k": 4, "matryoshka_prefix_fractions": (0.001, 1.0)}, "non-empty"),
    ],
)
def test_bad_architecture_parameters(arch: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(SAEError, match=match):
        SAEConfig(arch, 16, 64, **params)


@pytest.mark.bad_input
def test_unknown_architecture() -> None:
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        build(SAEConfig("gated", 16, 64, 4))
