"""Latent cache (stores latents, streams in bounded memory, refuses another SAE) and example sampling (disjoint
sets, quantile draws, hard negatives, counted skips, recorded class balance)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.activations.store import Activations
from saelab.config import CacheConfig, ConfigError, SampleConfig
from saelab.latents.build import CacheProgress, Chunk, build_cache, chunks_from_activations
from saelab.latents.cache import CacheError, CacheMismatchError, LatentCache
from saelab.latents.sampling import SampleSet, choose_latents, sample
from saelab.sae.base import SAE, SAEConfig, build

SMALL = CacheConfig(buffer_nnz=256, shard_nnz=1024)
"""Buffers small enough that the fixture spills several runs, writes several shards and has latents with more
nonzeros than one merge block (copied run by run)."""


def fixture_acts(n_windows: int = 40, ctx: int = 32, d: int = 8, F: int = 24, k: int = 3):
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", d, F, k))
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.linspace(-2.0, 0.5, F))  # a spread of firing frequencies
    pos = torch.arange(2, ctx).repeat(n_windows)
    window = torch.arange(n_windows).repeat_interleave(ctx - 2)
    acts = Activations(torch.randn(len(pos), d), window.int(), pos.int())
    tokens = np.random.default_rng(0).integers(0, 50, size=(n_windows, ctx)).astype(np.int32)
    return sae, acts, tokens


def make_cache(folder: Path, sae: SAE, acts: Activations, cfg: CacheConfig = SMALL, sha: str = "sae-a"):
    return build_cache(sae, chunks_from_activations(acts, 100, cfg.n_tokens), folder, cfg, sha, "data-a")


def fixture_cache(folder: Path, **kw: int) -> tuple[LatentCache, np.ndarray]:
    sae, acts, tokens = fixture_acts(**kw)
    return make_cache(folder, sae, acts), tokens


SAMPLE = SampleConfig(n_latents=6, example_ctx_len=8, min_examples=8, n_examples_train=4, n_examples_test=4,
                      n_quantiles=2, n_non_activating=4)  # fmt: skip


@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
def test_per_latent_read_equals_dense_encode(tmp_path: Path, value_dtype: str) -> None:
    sae, acts, _ = fixture_acts()
    cache = make_cache(tmp_path / "c", sae, acts, dataclasses.replace(SMALL, value_dtype=value_dtype))  # type: ignore[arg-type]
    assert cache.info.value_dtype == value_dtype
    assert len(cache.info.shards) > 1 and not cache.stats.quantiles_exact.all()  # every merge path ran
    assert cache.d_sae == sae.cfg.d_sae  # latents, not a d_in-wide reconstruction
    dense = sae.dense_latents(acts.acts_ND).detach().numpy()
    assert cache.nnz == int((dense > 0).sum())  # cached L0 equals encode()'s L0
    stored = dense.astype(value_dtype).astype(np.float32)  # what the on-disk dtype keeps
    for f in range(cache.d_sae):
        idx, vals = cache.latent(f)
        np.testing.assert_array_equal(idx, np.flatnonzero(dense[:, f] > 0))  # every token, ascending
        assert vals.dtype == np.float32 and (vals > 0).all()
        np.testing.assert_array_equal(vals, stored[idx, f])
    np.testing.assert_array_equal(cache.dense(), stored)
    np.testing.assert_array_equal(cache.window_N, acts.window_N.numpy())
    np.testing.assert_array_equal(cache.pos_N, acts.pos_N.numpy())
    st = cache.stats
    np.testing.assert_allclose(st.frequency, (dense > 0).mean(0))
    np.testing.assert_allclose(st.max_act, dense.max(0), rtol=1e-6)
    fired = [dense[dense[:, f] > 0, f] for f in range(cache.d_sae)]
    np.testing.assert_allclose(st.mean_act, [v.mean() for v in fired], rtol=1e-5)
    for g in np.flatnonzero(st.quantiles_exact):
        want = np.quantile(fired[g], st.levels, method="nearest")
        np.testing.assert_allclose(st.quantiles_FQ[g], want, rtol=1e-6, err_msg=str(g))
    for g in np.flatnonzero(~st.quantiles_exact):  # subsampled: within the range, ordered
        assert np.all(np.diff(st.quantiles_FQ[g]) >= 0) and st.quantiles_FQ[g, -1] <= st.max_act[g]


def test_one_latent_reads_only_its_shard(tmp_path: Path) -> None:
    cache, _ = fixture_cache(tmp_path / "c")
    want = [cache.latent(f) for f in range(cache.d_sae)]
    last = cache.info.shards[-1]
    for shard in cache.info.shards[:-1]:
        (
            cache.folder / shard.file
        ).unlink()  # the rest of the cache is gone; the last shard's latents still read
    (cache.folder / "tokens.safetensors").unlink()
    again = LatentCache.open(cache.folder)
    for f in range(last.start, last.end):
        np.testing.assert_array_equal(again.latent(f)[1], want[f][1])


@pytest.mark.parametrize(("value_dtype", "per_nonzero"), [("float16", 6), ("float32", 8)])
def test_bytes_per_nonzero_on_disk(tmp_path: Path, value_dtype: str, per_nonzero: int) -> None:
    sae, acts, _ = fixture_acts(n_windows=400, F=64, k=8)
    cfg = CacheConfig(shard_nnz=1 << 16, value_dtype=value_dtype)  # type: ignore[arg-type]
    cache = make_cache(tmp_path / "c", sae, acts, cfg)
    payload = 0
    for shard in cache.info.shards:
        size = (cache.folder / shard.file).stat().st_size
        header = 8 + int.from_bytes((cache.folder / shard.file).read_bytes()[:8], "little")
        indptr = 8 * (shard.end - shard.start + 1)
        assert size - header - indptr == per_nonzero * shard.nnz  # int32 token index + the value
        payload += size
    assert cache.nnz > 90_000
    assert payload / cache.nnz == pytest.approx(cache.info.bytes_per_nonzero)
    # indptr and headers are per latent / per shard, not per nonzero
    assert per_nonzero < cache.info.bytes_per_nonzero < per_nonzero + 0.02
    if value_dtype == "float16":  # the default meets the bound with the overhead included
        assert CacheConfig().value_dtype == "float16" and cache.info.bytes_per_nonzero <= 8


@pytest.mark.bad_input
def test_activations_beyond_float16_are_refused_and_kept_for_float32(tmp_path: Path) -> None:
    sae, acts, _ = fixture_acts()
    big = Activations(acts.acts_ND * 1e5, acts.window_N, acts.pos_N)
    with pytest.raises(
        CacheError, match=r"beyond float16's 65504; pass --cache.value-dtype float32 --cache.resume"
    ):
        make_cache(tmp_path / "c", sae, big, dataclasses.replace(SMALL, value_dtype="float16"))
    progress = CacheProgress()
    cfg = dataclasses.replace(SMALL, value_dtype="float32", resume=True)
    cache = build_cache(
        sae, chunks_from_activations(big, 100), tmp_path / "c", cfg, "sae-a", "data-a", progress
    )
    assert progress.encoded_chunks == 0 and progress.resumed_tokens == big.acts_ND.shape[0]
    assert cache.stats.max_act.max() > 65504


def random_chunks(n_tokens: int, d: int, batch: int) -> Iterator[Chunk]:
    gen = torch.Generator().manual_seed(0)
    for s in range(0, n_tokens, batch):
        b = min(batch, n_tokens - s)
        idx = np.arange(s, s + b)
        yield torch.randn(b, d, generator=gen), (idx // 32).astype(np.int32), (idx % 32).astype(np.int32)


def peak_build_bytes(tmp: Path, sae: SAE, n_tokens: int, cfg: CacheConfig) -> tuple[int, LatentCache]:
    tracemalloc.start()
    cache = build_cache(sae, random_chunks(n_tokens, sae.cfg.d_in, 512), tmp, cfg, "s")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, cache


def test_build_memory_is_bounded_as_n_tokens_grows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", 16, 64, 8))
    cfg = CacheConfig(buffer_nnz=8192, shard_nnz=16384)
    small, _ = peak_build_bytes(tmp_path / "a", sae, 8_000, cfg)
    large, cache = peak_build_bytes(tmp_path / "b", sae, 64_000, cfg)
    assert cache.nnz == 64_000 * 8 and len(cache.info.shards) > 8
    # 8x the tokens (512k nonzeros = 6 MB if held at once); the peak stays that of the buffers
    assert large < 1.5 * small + 200_000, (small, large)
    assert large < 1_500_000, large


@pytest.mark.bad_input
def test_n_tokens_takes_a_prefix_and_refuses_more_than_available(tmp_path: Path) -> None:
    sae, acts, _ = fixture_acts()
    n = acts.acts_ND.shape[0]
    cache = make_cache(tmp_path / "c", sae, acts, CacheConfig(n_tokens=500))
    assert cache.n_tokens == 500 and cache.window_N.tolist() == acts.window_N[:500].tolist()
    with pytest.raises(CacheError, match=rf"more than the {n} tokens.*--cache.n-tokens {n}"):
        make_cache(tmp_path / "d", sae, acts, CacheConfig(n_tokens=n + 1))


@pytest.mark.bad_input
def test_cache_of_another_sae_is_refused(tmp_path: Path) -> None:
    cache, _ = fixture_cache(tmp_path / "latents")
    LatentCache.open(cache.folder, "sae-a", "data-a")  # the SAE and data it was built from
    with pytest.raises(CacheMismatchError, match=r"another SAE .*re-run `saelab cache --run-dir"):
        LatentCache.open(cache.folder, "sae-b")
    with pytest.raises(CacheMismatchError, match="another data"):
        LatentCache.open(cache.folder, "sae-a", "data-b")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latents.safetensors").write_bytes(b"")
    with pytest.raises(CacheError, match="older saelab; run `saelab cache"):
        LatentCache.open(tmp_path / "old")


def test_sampling_sets_are_disjoint_and_labelled(tmp_path: Path) -> None:
    cache, tokens = fixture_cache(tmp_path / "c")
    s = sample(cache, tokens, lambda t: f"t{t} ", SAMPLE, seed=0)
    assert s.latents, s.skipped
    for le in s.latents:
        train = {e.example_id for e in le.train}
        test = {e.example_id for e in le.test_pos}
        neg = {e.example_id for e in le.test_neg}
        train_neg = {e.example_id for e in le.train_neg}
        assert train.isdisjoint(test) and train.isdisjoint(neg) and test.isdisjoint(neg)
        assert (
            train_neg.isdisjoint(neg | train | test) and len(train_neg) == SAMPLE.n_non_activating_train > 0
        )
        assert all(e.activating for e in le.train + le.test_pos)
        assert not any(e.activating for e in le.test_neg + le.train_neg)
        assert min(e.max_act for e in le.train) >= max(e.max_act for e in le.test_pos) - 1e-6
        e = le.train[0]
        assert list(e.tokens) == tokens[e.window, e.start : e.start + 8].tolist()
        assert e.token_strs[0] == f"t{e.tokens[0]} "
        idx, vals = cache.latent(le.latent)  # example activations are the cached ones, token by token
        at = {(int(cache.window_N[i]), int(cache.pos_N[i])): float(v) for i, v in zip(idx, vals)}
        assert list(e.acts) == [at.get((e.window, e.start + j), 0.0) for j in range(8)]
    assert len(s.latents) + len(s.skipped) == len(choose_latents(cache.stats.count, 6, 8))
    s.save(tmp_path / "s.json")
    assert SampleSet.load(tmp_path / "s.json").latents == s.latents  # train_neg survives the round trip


def test_quantile_draw_takes_from_every_quantile(tmp_path: Path) -> None:
    cache, tokens = fixture_cache(tmp_path / "c", n_windows=200)
    cfg = SampleConfig(n_latents=4, example_ctx_len=8, min_examples=60, n_examples_train=10, n_examples_test=10,
                       n_quantiles=5, n_non_activating=4)  # fmt: skip
    s = sample(cache, tokens, str, cfg, seed=0)
    assert len(s.latents) >= 2, s.skipped
    for le in s.latents:
        qs = [e.quantile for e in le.test_pos]
        assert sorted(qs) == [q for q in range(5) for _ in range(2)]  # 2 from each of 5 quantiles
        acts = sorted(ex.max_act for ex in le.test_pos)
        by_q = {q: [e.max_act for e in le.test_pos if e.quantile == q] for q in range(5)}
        for q in range(4):  # each quantile's draws lie at or below the next one's
            assert max(by_q[q]) <= min(by_q[q + 1]) + 1e-6, (le.latent, by_q)
        assert acts[0] < acts[-1]


@pytest.mark.bad_input
def test_skipped_latents_are_counted_with_reasons(tmp_path: Path) -> None:
    cache, tokens = fixture_cache(tmp_path / "c")
    cfg = SampleConfig(n_latents=24, example_ctx_len=8, min_examples=100, n_examples_train=4, n_examples_test=4,
                       n_quantiles=2, n_non_activating=4)  # fmt: skip
    s = sample(cache, tokens, str, cfg, seed=0)
    assert s.n_ineligible > 0  # rare latents are counted, not dropped silently
    assert s.skipped  # latents firing on >= 100 tokens but in fewer than 100 examples
    assert any("min_examples" in why for why in s.skipped.values())
    assert s.n_ineligible + len(s.skipped) + len(s.latents) == cache.d_sae
    dead = int(np.flatnonzero(cache.stats.count == 0)[0]) if (cache.stats.count == 0).any() else None
    if dead is None:  # make one: a latent the SAE can never select
        sae, acts, tokens = fixture_acts()
        with torch.no_grad():
            sae.b_enc_F[0] = -1e4
        cache = make_cache(tmp_path / "d", sae, acts)
        dead = 0
    s = sample(cache, tokens, str, SampleConfig(**{**SAMPLE.__dict__, "latents": (dead, 16)}), seed=0)
    assert s.n_dead >= 1 and "never fires on the" in s.skipped[dead]
    assert [le.latent for le in s.latents] == [16]


def test_class_balance_recorded_in_artifact(tmp_path: Path) -> None:
    cache, tokens = fixture_cache(tmp_path / "c")
    cfg = SampleConfig(**{**SAMPLE.__dict__, "n_non_activating": 7})
    s = sample(cache, tokens, str, cfg, seed=0)
    s.save(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    n = len(s.latents)
    assert data["class_balance"] == {"n_activating": 4 * n, "n_non_activating": 7 * n,
                                     "activating_fraction": 4 / 11}  # fmt: skip
    assert all(le["class_balance"] == {"n_activating": 4, "n_non_activating": 7} for le in data["latents"])
    assert data["cache"]["sae_sha256"] == "sae-a" and data["n_skipped"] == len(s.skipped)
    again = SampleSet.load(tmp_path / "s.json")
    assert again.latents == s.latents and again.skipped == s.skipped
    assert again.class_balance == s.class_balance and again.n_dead == s.n_dead


def bag_of_tokens(texts: list[str]) -> np.ndarray:
    """A small real embedder for fast tests: unit-length token-count vectors."""
    out = np.zeros((len(texts), 50), dtype=np.float32)
    for i, t in enumerate(texts):
        for tok in t.split():
            out[i, int(tok) % 50] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def mean_similarity(s: SampleSet, embed, which: str) -> float:
    sims = []
    for le in s.latents:
        centre = embed([e.text for e in (*le.train, *le.test_pos)]).mean(0)
        sims += list(embed([e.text for e in getattr(le, which)]) @ (centre / np.linalg.norm(centre)))
    return float(np.mean(sims))


def test_similar_negatives_are_nearer_than_random(tmp_path: Path) -> None:
    cache, tokens = fixture_cache(tmp_path / "c", n_windows=120)
    cfg = SampleConfig(
        **{**SAMPLE.__dict__, "n_candidates": 1000}
    )  # the whole grid: the same latents qualify
    rand = sample(cache, tokens, lambda t: f"{t} ", cfg, seed=0, embed=bag_of_tokens)
    cfg_sim = SampleConfig(**{**cfg.__dict__, "non_activating_source": "similar"})
    sim = sample(cache, tokens, lambda t: f"{t} ", cfg_sim, seed=0, embed=bag_of_tokens)
    assert [le.latent for le in sim.latents] == [le.latent for le in rand.latents]
    assert all(not e.activating for le in sim.latents for e in le.test_neg)
    assert mean_similarity(sim, bag_of_tokens, "test_neg") > mean_similarity(rand, bag_of_tokens, "test_neg")


@pytest.mark.bad_input
def test_min_examples_must_cover_disjoint_sets() -> None:
    with pytest.raises(ConfigError, match="disjoint"):
        SampleConfig(min_examples=5, n_examples_train=4, n_examples_test=4)


TOPICS = [
    "football match goal team player stadium coach league scored referee",
    "recipe oven flour sugar butter bake kitchen dough salt pepper",
    "bank loan interest market stock investor profit tax budget credit",
    "planet star orbit telescope galaxy comet moon solar nebula astronaut",
]
WORDS = " ".join(TOPICS).split()


@pytest.mark.slow
def test_similar_negatives_are_nearer_on_real_minilm(tmp_path: Path) -> None:
    """Latent 0 fires on "goal" only, which occurs in football windows: MiniLM's nearest non-activating examples
    are football text without "goal" (hard negatives), nearer to the activating ones than random negatives."""
    from saelab.autointerp.embed import Embedder

    rng = np.random.default_rng(0)
    n_windows, ctx = 160, 32
    topic_W = np.arange(n_windows) % 4
    tokens = np.stack([rng.integers(0, 10, ctx) + 10 * t for t in topic_W]).astype(np.int32)
    goal = WORDS.index("goal")
    flat = tokens.reshape(-1)
    x = np.zeros((len(flat), 8), dtype=np.float32)
    x[np.arange(len(flat)), np.where(flat == goal, 0, 1 + flat % 7)] = np.where(flat == goal, 2.0, 1.0)
    sae = build(SAEConfig("topk", 8, 8, 1))
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(8))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    idx = torch.arange(len(flat))
    acts = Activations(torch.from_numpy(x), (idx // ctx).int(), (idx % ctx).int())
    cache = make_cache(tmp_path / "c", sae, acts, CacheConfig())
    cfg = SampleConfig(latents=(0,), example_ctx_len=8, min_examples=20, n_examples_train=10, n_examples_test=10,
                       n_quantiles=2, n_non_activating=20, n_candidates=400)  # fmt: skip
    embedder = Embedder()
    words = lambda t: WORDS[t] + " "  # noqa: E731
    rand = sample(cache, tokens, words, cfg, seed=0, embed=embedder.embed)
    sim_cfg = SampleConfig(**{**cfg.__dict__, "non_activating_source": "similar"})
    sim = sample(cache, tokens, words, sim_cfg, seed=0, embed=embedder.embed)
    (le_sim,), (le_rand,) = sim.latents, rand.latents
    assert all("goal" in e.text for e in le_sim.train + le_sim.test_pos)
    assert not any("goal" in e.text or e.activating for e in le_sim.test_neg)
    football = [topic_W[e.window] == 0 for e in le_sim.test_neg]
    assert np.mean(football) >= 0.8, football  # hard negatives: the same topic without the latent's token
    assert np.mean([topic_W[e.window] == 0 for e in le_rand.test_neg]) < 0.5
    assert (
        mean_similarity(sim, embedder.embed, "test_neg")
        > mean_similarity(rand, embedder.embed, "test_neg") + 0.1
    )


class Crash(Exception):
    pass


def crash_after(chunks: Iterator[Chunk], n: int) -> Iterator[Chunk]:
    for i, chunk in enumerate(chunks):
        if i == n:
            raise Crash
        yield chunk


@pytest.mark.fault
@pytest.mark.resume
@pytest.mark.parametrize("source", ["iterable", "function"])
def test_cache_build_crashed_then_resumed_equals_one_build(tmp_path: Path, source: str) -> None:
    """A build stopped mid-way (here by an exception in the chunk source; test_kill_resume.py SIGKILLs the CLI)
    and resumed writes the same files as one build, encoding only the chunks after its last spilled run."""
    sae, acts, _ = fixture_acts()
    full = make_cache(tmp_path / "full", sae, acts)
    with pytest.raises(Crash):
        build_cache(
            sae, crash_after(chunks_from_activations(acts, 100), 7), tmp_path / "r", SMALL, "sae-a", "data-a"
        )
    # a SIGKILL during a checkpoint leaves its temporary file beside the last complete one
    (tmp_path / "r.tmp" / "progress.npz.0123abcd.tmp").write_bytes(b"half a checkpoint")
    resumed_cfg = dataclasses.replace(SMALL, resume=True)

    def from_token(start: int) -> Iterator[Chunk]:
        return itertools.islice(chunks_from_activations(acts, 100), start // 100, None)

    chunks = from_token if source == "function" else chunks_from_activations(acts, 100)
    progress = CacheProgress()
    resumed = build_cache(sae, chunks, tmp_path / "r", resumed_cfg, "sae-a", "data-a", progress)
    assert 0 < progress.resumed_tokens <= 700 and progress.resumed_tokens % 100 == 0
    assert progress.encoded_chunks == -(-acts.acts_ND.shape[0] // 100) - progress.resumed_tokens // 100
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "r").iterdir())
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "r" / name).read_bytes(), name
    assert resumed.info == full.info


def test_cache_resume_of_another_sae_starts_afresh(tmp_path: Path) -> None:
    sae, acts, _ = fixture_acts()
    with pytest.raises(Crash):
        build_cache(
            sae, crash_after(chunks_from_activations(acts, 100), 7), tmp_path / "r", SMALL, "sae-a", "data-a"
        )
    progress = CacheProgress()
    cfg = dataclasses.replace(SMALL, resume=True)
    build_cache(sae, chunks_from_activations(acts, 100), tmp_path / "r", cfg, "sae-b", "data-a", progress)
    assert progress.resumed_tokens == 0 and progress.encoded_chunks == -(-acts.acts_ND.shape[0] // 100)


def test_the_same_build_writes_the_same_bytes(tmp_path: Path) -> None:
    """The manifest records every file's sha256, so an identical build must write identical files."""
    sae, acts, _ = fixture_acts()
    for i in range(4):
        make_cache(tmp_path / str(i), sae, acts)
    for name in sorted(p.name for p in (tmp_path / "0").iterdir()):
        assert len({(tmp_path / str(i) / name).read_bytes() for i in range(4)}) == 1, name
