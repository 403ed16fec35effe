"""Latent cache (stores latents, not reconstructions) and example sampling (disjoint sets, counted skips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.activations import Activations
from saelab.config import ConfigError, SampleConfig
from saelab.latents import LatentCache, build_cache
from saelab.sae import SAEConfig, build
from saelab.sampling import SampleSet, choose_latents, sample


def fixture_cache(n_windows: int = 40, ctx: int = 32, d: int = 8, F: int = 24, k: int = 3):
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", d, F, k))
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.linspace(-2.0, 0.5, F))  # a spread of firing frequencies
    pos = torch.arange(2, ctx).repeat(n_windows)
    window = torch.arange(n_windows).repeat_interleave(ctx - 2)
    acts = Activations(torch.randn(len(pos), d), window.int(), pos.int())
    tokens = np.random.default_rng(0).integers(0, 50, size=(n_windows, ctx)).astype(np.int32)
    return sae, acts, tokens


def test_cache_holds_latents_with_encode_l0(tmp_path: Path) -> None:
    sae, acts, _ = fixture_cache()
    cache = build_cache(sae, acts, batch_size=100)
    assert cache.d_sae == sae.cfg.d_sae  # latents, not a d_in-wide reconstruction
    dense = sae.dense_latents(acts.acts_ND).detach().numpy()
    assert len(cache.values) == int((dense > 0).sum())  # cached L0 equals encode()'s L0
    for f in range(cache.d_sae):
        idx, vals = cache.latent(f)
        np.testing.assert_allclose(vals, dense[idx, f], rtol=1e-6)
        assert (dense[:, f] > 0).sum() == len(idx)
    np.testing.assert_allclose(cache.stats.frequency, (dense > 0).mean(0))
    np.testing.assert_allclose(cache.stats.max_act, dense.max(0), rtol=1e-6)
    cache.save(tmp_path)
    again = LatentCache.load(tmp_path)
    np.testing.assert_array_equal(again.indptr, cache.indptr)
    np.testing.assert_array_equal(again.values, cache.values)
    assert (again.token_idx.dtype.itemsize + again.values.dtype.itemsize) <= 8  # bytes per nonzero


def test_sampling_sets_are_disjoint_and_labelled() -> None:
    sae, acts, tokens = fixture_cache()
    cache = build_cache(sae, acts, batch_size=100)
    cfg = SampleConfig(n_latents=6, example_ctx_len=8, min_examples=8, n_examples_train=4, n_examples_test=4,
                       n_quantiles=2, n_non_activating=4)  # fmt: skip
    s = sample(cache, tokens, lambda t: f"t{t} ", cfg, seed=0)
    assert s.latents, s.skipped
    for le in s.latents:
        train = {e.example_id for e in le.train}
        test = {e.example_id for e in le.test_pos}
        neg = {e.example_id for e in le.test_neg}
        assert train.isdisjoint(test) and train.isdisjoint(neg) and test.isdisjoint(neg)
        assert all(e.activating for e in le.train + le.test_pos)
        assert not any(e.activating for e in le.test_neg)
        assert min(e.max_act for e in le.train) >= max(e.max_act for e in le.test_pos) - 1e-6
        assert {e.quantile for e in le.test_pos} == {0, 1}
        e = le.train[0]
        assert list(e.tokens) == tokens[e.window, e.start : e.start + 8].tolist()
        assert e.token_strs[0] == f"t{e.tokens[0]} "
    assert len(s.latents) + len(s.skipped) == len(
        choose_latents(cache.stats.frequency, 6, 8 / len(acts.pos_N))
    )


def test_rare_latents_are_skipped_and_counted() -> None:
    sae, acts, tokens = fixture_cache()
    cache = build_cache(sae, acts, batch_size=100)
    cfg = SampleConfig(n_latents=24, example_ctx_len=8, min_examples=100, n_examples_train=4, n_examples_test=4,
                       n_quantiles=2, n_non_activating=4)  # fmt: skip
    s = sample(cache, tokens, str, cfg, seed=0)
    assert s.n_ineligible > 0  # rare latents are counted, not dropped silently
    assert s.skipped  # latents firing on >= 100 tokens but in fewer than 100 examples
    assert any("min_examples" in why for why in s.skipped.values())
    assert s.n_ineligible + len(s.skipped) + len(s.latents) == cache.d_sae


def test_sample_set_round_trip(tmp_path: Path) -> None:
    sae, acts, tokens = fixture_cache()
    cache = build_cache(sae, acts, batch_size=100)
    cfg = SampleConfig(n_latents=3, example_ctx_len=8, min_examples=8, n_examples_train=4, n_examples_test=4,
                       n_quantiles=2, n_non_activating=4)  # fmt: skip
    s = sample(cache, tokens, str, cfg, seed=0)
    s.save(tmp_path / "s.json")
    again = SampleSet.load(tmp_path / "s.json")
    assert again.latents == s.latents and again.skipped == s.skipped


def test_min_examples_must_cover_disjoint_sets() -> None:
    with pytest.raises(ConfigError, match="disjoint"):
        SampleConfig(min_examples=5, n_examples_train=4, n_examples_test=4)
