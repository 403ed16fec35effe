"""Latent cache: build throughput, bytes per nonzero, and reading one latent against loading the whole cache.

    .venv/bin/python benchmarks/latent_cache.py [--tokens 100000] [--out benchmarks/results/latent_cache.json]

A TopK SAE with random weights (4,608 latents, k = 32, d_in 576: the bundled model's width) encodes seeded random
activations; speed does not depend on the weights at a fixed k. In one run it measures:
- the build (`latent_build.build_cache`: encode, spill sorted runs, merge into shards, statistics) against encoding
  the same chunks alone, so the ratio is the cache's own overhead whatever the load;
- the size of the shard files per nonzero, and of the whole folder (token map and statistics included);
- the peak of Python/numpy allocations during the build (tracemalloc; torch's own buffers are not traced);
- `LatentCache.latent(f)` for 200 random latents against loading every shard and cutting the same latent out of
  the arrays in memory (what reading the old single-file cache cost).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from machine import machine_facts
from safetensors.numpy import load_file

from saelab.config import CacheConfig
from saelab.latents.build import Chunk, build_cache
from saelab.latents.cache import LatentCache
from saelab.sae.base import SAEConfig, build


def chunks(n_tokens: int, d_in: int, batch: int) -> Iterator[Chunk]:
    gen = torch.Generator().manual_seed(0)
    for s in range(0, n_tokens, batch):
        b = min(batch, n_tokens - s)
        idx = np.arange(s, s + b)
        yield torch.randn(b, d_in, generator=gen), (idx // 128).astype(np.int32), (idx % 128).astype(np.int32)


def encode_only_seconds(sae: torch.nn.Module, n_tokens: int, d_in: int, batch: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for acts, _, _ in chunks(n_tokens, d_in, batch):
            sae.encode(acts)  # type: ignore[operator]
    return time.perf_counter() - start


def whole_load_seconds(cache: LatentCache, latents: list[int]) -> float:
    """Load every shard into memory, then cut each latent out (the single-file cache's way)."""
    start = time.perf_counter()
    for f in latents:
        shard = next(s for s in cache.info.shards if s.start <= f < s.end)
        t = load_file(str(cache.folder / shard.file))
        a, b = t["indptr"][f - shard.start : f - shard.start + 2]
        _ = t["token_idx"][a:b], t["values"][a:b]
        for other in cache.info.shards:  # the rest of the cache comes with it
            if other is not shard:
                load_file(str(cache.folder / other.file))
    return (time.perf_counter() - start) / len(latents)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer-nnz", type=int, default=CacheConfig().buffer_nnz)
    p.add_argument("--shard-nnz", type=int, default=1 << 20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/latent_cache.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", args.d_in, args.d_sae, args.k))
    cfg = CacheConfig(buffer_nnz=args.buffer_nnz, shard_nnz=args.shard_nnz)
    encode_s = encode_only_seconds(sae, args.tokens, args.d_in, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "latents"
        tracemalloc.start()
        start = time.perf_counter()
        cache = build_cache(sae, chunks(args.tokens, args.d_in, args.batch), folder, cfg, "bench")
        build_s = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
        rng = np.random.default_rng(0)
        latents = rng.choice(np.flatnonzero(cache.stats.count > 0), size=200, replace=False).tolist()
        start = time.perf_counter()
        for f in latents:
            cache.latent(f)
        read_s = (time.perf_counter() - start) / len(latents)
        whole_s = whole_load_seconds(cache, latents[:20])
        result = {
            "args": vars(args),
            "n_tokens": cache.n_tokens,
            "nnz": cache.nnz,
            "shards": len(cache.info.shards),
            "build_seconds": round(build_s, 3),
            "encode_only_seconds": round(encode_s, 3),
            "build_over_encode": round(build_s / encode_s, 3),
            "build_tokens_per_s": round(cache.n_tokens / build_s),
            "build_nnz_per_s": round(cache.nnz / build_s),
            "shard_bytes_per_nonzero": round(cache.info.bytes_per_nonzero, 4),
            "folder_bytes_per_nonzero": round(folder_bytes / cache.nnz, 4),
            "build_peak_traced_mib": round(peak / 2**20, 1),
            "held_at_once_mib": round(cache.nnz * 12 / 2**20, 1),
            "latent_read_ms": round(read_s * 1e3, 4),
            "whole_load_ms": round(whole_s * 1e3, 3),
            "whole_over_latent_read": round(whole_s / read_s, 1),
            "machine": machine_facts(args.threads, load_before),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
