"""TopK SAE invariants and checkpoint handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab import sae as sae_lib
from saelab.sae import SAEConfig, SAEError, build


def make(d_in: int = 16, d_sae: int = 64, k: int = 4) -> sae_lib.TopKSAE:
    torch.manual_seed(0)
    s = build(SAEConfig("topk", d_in, d_sae, k))
    with torch.no_grad():
        s.b_enc_F.normal_()
        s.b_dec_D.normal_()
    return s


def test_forward_equals_decode_of_encode() -> None:
    s = make()
    x = torch.randn(32, 16)
    out = s(x)
    torch.testing.assert_close(out.x_hat_BD, s.decode(s.encode(x)))


def test_topk_has_exactly_k_active_latents() -> None:
    s = make(k=5)
    z = s.dense_latents(torch.randn(50, 16) * 3)
    assert z.shape == (50, 64)
    assert ((z != 0).sum(dim=1) <= 5).all()
    assert ((z != 0).sum(dim=1) == 5).float().mean() > 0.9  # zeros only where ReLU clipped a top-k value
    assert (z >= 0).all()


def test_decoder_rows_unit_norm_after_projection_step() -> None:
    s = make()
    x = torch.randn(64, 16)
    opt = torch.optim.SGD(s.parameters(), lr=0.5)
    loss = (s(x).x_hat_BD - x).pow(2).sum()
    loss.backward()
    s.project_decoder_grad()
    opt.step()
    s.normalize_decoder()
    torch.testing.assert_close(s.W_dec_FD.norm(dim=1), torch.ones(64))


def test_save_load_round_trip(tmp_path: Path) -> None:
    s = make()
    sae_lib.save(s, tmp_path)
    loaded = sae_lib.load(tmp_path)
    x = torch.randn(8, 16)
    torch.testing.assert_close(loaded(x).x_hat_BD, s(x).x_hat_BD)
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_checkpoint_is_an_error_not_untrained_weights(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="missing"):
        sae_lib.load(tmp_path)


def test_corrupt_checkpoint_is_an_error(tmp_path: Path) -> None:
    sae_lib.save(make(), tmp_path)
    data = (tmp_path / "sae.safetensors").read_bytes()
    (tmp_path / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="corrupt"):
        sae_lib.load(tmp_path)


def test_checkpoint_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    sae_lib.save(make(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="does not match"):
        sae_lib.load(tmp_path)


def test_wrong_d_in_is_a_clear_error() -> None:
    with pytest.raises(SAEError, match="d_in=20"):
        make().encode(torch.randn(3, 20))


@pytest.mark.parametrize("k", [0, 64, 100])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(SAEError, match="k must be"):
        SAEConfig("topk", 16, 64, k)


def test_unknown_architecture() -> None:
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        build(SAEConfig("gated", 16, 64, 4))
