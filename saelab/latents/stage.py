"""The cache and sample stages: the SAE's sparse latents over a split, then example sets per latent.

Artifacts (relative to the run folder): `latents/` (`saelab.latents.cache`: `cache.json`, shards, tokens,
statistics) and `samples/samples.json` (`saelab.latents.sampling`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from saelab.activations.stage import ACTS, STORE, CollectRecord
from saelab.activations.store import ActivationStore, iter_window_batches
from saelab.config import CacheConfig, to_dict
from saelab.data.windows import TokenWindows
from saelab.latents.build import (
    CacheProgress,
    Chunk,
    build_cache,
    check_n_tokens,
    chunks_from_file,
    chunks_from_store,
)
from saelab.latents.cache import LATENTS, MANIFEST, STATS, TOKENS, CacheError, LatentCache
from saelab.latents.sampling import SAMPLES, SampleError, SampleSet, sample
from saelab.models.loading import LoadedModel
from saelab.run.session import Session
from saelab.train.stage import load_run_sae, run_sae_sha256

log = logging.getLogger(__name__)


CACHE_READS = ("collect", "train")
"""The stages whose artifacts cache reads (the activations or windows, the SAE)."""
SAMPLE_READS = ("collect", "train", "cache")
"""The stages whose artifacts sample reads (the windows, the SAE's hash, the latent cache)."""


def stage_cache(s: Session) -> None:
    """Cache the SAE's latents over `cache.n_tokens` tokens of `cache.dataset_split`, in bounded memory;
    `--cache.resume` continues a killed build from its last spilled run."""
    s.start("cache", CACHE_READS)
    sae = load_run_sae(s.run)
    c = _resolved(s.cfg.cache, CollectRecord.of(s.run))
    windows = TokenWindows.load_run(s.folder)
    chunks = _cache_chunks(
        s, windows, c
    )  # refuses more tokens than the split holds before anything is written
    with s.run.stage("cache", {"cache": to_dict(c)}, CACHE_READS) as rec:
        progress = CacheProgress()
        cache = build_cache(
            sae, chunks, s.folder / LATENTS, c, run_sae_sha256(s.folder), windows.sha256(), progress
        )
        if progress.resumed_tokens:
            log.info("cache: resumed with %d tokens already encoded", progress.resumed_tokens)
        rec["outputs"] += [f"{LATENTS}/{name}" for name in (MANIFEST, STATS, TOKENS)]
        rec["outputs"] += [f"{LATENTS}/{shard.file}" for shard in cache.info.shards]
        rec.update(cache.summary())
        rec.update(resumed_tokens=progress.resumed_tokens, encoded_chunks=progress.encoded_chunks)


def _resolved(c: CacheConfig, collected: CollectRecord) -> CacheConfig:
    """`cache.dataset_split auto` made `train` or `eval`; `train` refused on a streamed run."""
    if c.dataset_split == "auto":
        return replace(c, dataset_split="eval" if collected.streamed else "train")
    if c.dataset_split == "train" and collected.streamed:
        raise CacheError(
            "--cache.dataset-split train needs stored training activations, and this run streamed them "
            "(collect.format stream); cache the held-out windows with --cache.dataset-split eval"
        )
    return c


def _cache_chunks(s: Session, windows: TokenWindows, c: CacheConfig) -> Callable[[int], Iterator[Chunk]]:
    """The cached split's activations in chunks from a token on: collect's artifacts for `train`, the model
    for `eval`."""
    collected = CollectRecord.of(s.run)
    if c.dataset_split == "train":
        if collected.n_tokens:  # a collect record of an older saelab may not say
            check_n_tokens(
                c.n_tokens, collected.n_tokens, "train", "collect more with --collect.n-train-tokens"
            )
        if collected.format == "store":
            store = ActivationStore(s.folder / STORE)
            return functools.partial(chunks_from_store, store, c.batch_size, c.n_tokens)
        return functools.partial(chunks_from_file, s.folder / ACTS, c.batch_size, c.n_tokens)
    available = int(windows.keep[windows.eval_idx].sum())
    n = check_n_tokens(c.n_tokens, available, "eval", "raise --data.eval-fraction or use a larger corpus")
    batch = s.cfg.collect.batch_size
    return lambda start: eval_chunks(s.lm(), windows, collected.hookpoint, n, batch, start)


def eval_chunks(
    lm: LoadedModel, windows: TokenWindows, hookpoint: str, n: int, batch: int, start: int = 0
) -> Iterator[Chunk]:
    """Kept positions of the held-out windows, in order, until `n` tokens; from token `start` on, which must
    begin a batch of windows (where a resumed cache build stops): the batches before it are not run."""
    if start >= n:
        return
    idx = windows.eval_idx
    before = windows.kept_before_batches(idx, batch)
    first = int(np.searchsorted(before, start))
    if first == len(before) or before[first] != start:
        raise CacheError(f"token {start} does not begin a batch of held-out windows; rebuild without resume")
    done = start
    for idx_b, a_BTD in iter_window_batches(
        lm, windows, idx[first * batch :], hookpoint, batch, "cache (eval)"
    ):
        keep = windows.keep[idx_b]
        w, p = keep.nonzero()
        take = min(len(w), n - done)
        acts = a_BTD[torch.as_tensor(keep, device=a_BTD.device)]
        yield acts[:take], idx_b[w[:take]].astype(np.int32), p[:take].astype(np.int32)
        done += take
        if done >= n:
            return


def _latents_of(run_folder: Path) -> tuple[int, ...]:
    """The latents another run's sample stage studied (`--sample.latents-from`)."""
    if not (run_folder / SAMPLES).is_file():
        raise SampleError(
            f"--sample.latents-from {run_folder}: it holds no {SAMPLES}; name a run folder whose sample stage ran"
        )
    return tuple(le.latent for le in SampleSet.load_run(run_folder).latents)


def stage_sample(s: Session) -> None:
    """Example sets for `sample.n_latents` latents of the cache (see `saelab.latents.sampling`); asking for more
    latents than are eligible studies all of them, with a warning naming how many there were."""
    s.start("sample", SAMPLE_READS)
    windows = TokenWindows.load_run(s.folder)
    cache = LatentCache.open(s.folder / LATENTS, run_sae_sha256(s.folder), windows.sha256())
    tokenizer = s.tokenizer()

    @functools.cache
    def token_str(t: int) -> str:
        return str(tokenizer.decode([t]))

    embed = None
    if s.cfg.sample.non_activating_source == "similar":
        from saelab.autointerp.embed import Embedder

        embed = Embedder().embed
    cfg = s.cfg.sample
    if cfg.latents_from:  # recorded as the ids it named, beside the run they came from
        cfg = replace(cfg, latents=_latents_of(Path(cfg.latents_from)), latents_from="")
    with s.run.stage("sample", {"sample": to_dict(cfg)}, SAMPLE_READS) as rec:
        samples = sample(cache, windows.tokens, token_str, cfg, s.cfg.seed, embed)
        eligible = cache.d_sae - samples.n_ineligible
        if not cfg.latents and cfg.n_latents > eligible:
            log.warning(
                "sample: --sample.n-latents %d is more than the %d eligible latents (firing on at least "
                "--sample.min-examples %d cached tokens); all %d are chosen",
                cfg.n_latents, eligible, cfg.min_examples, eligible,
            )  # fmt: skip
        rec["outputs"].append(samples.save_run(s.folder))
        if s.cfg.sample.latents_from:
            rec["latents_from"] = s.cfg.sample.latents_from
        rec.update(samples.summary())
