"""Feature browser latency on a run of 50k latents: start-up, the first list page, list pages, latent pages.

    .venv/bin/python benchmarks/serve_latency.py [--d-sae 50000] [--sampled 5000] [--out benchmarks/results/serve_latency.json]

The synthetic run is written by saelab's own writers: a TopK SAE with random weights (`sae.save`) encodes seeded
random activations into the latent cache (`latent_build.build_cache`); `--sampled` latents get example sets
(`SampleSet.save`, the default sample sizes: 8 top, 6 quantile, 6 + 4 non-activating examples of 32 tokens), two
explanations each (`write_explanations`) and three scorers' rows with per-example predictions (`write_scores`).
Then `saelab serve`'s server runs in a thread and is read over HTTP on loopback with urllib:
- start-up: constructing the server (it reads nothing from the runs);
- the first list page, which builds the run's index (statistics, explanations, score metrics, byte offsets);
- list pages sorted by a score, searched, filtered;
- the first latent page (it computes the decoder's row norms once), then latent pages of random latents (sampled
  and unsampled), median and p95. Target: a latent page under 200 ms;
- the nearest-latents pass alone on wider decoders (d_in 768 and 2304, 50k latents), since it grows with d_in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from machine import machine_facts
from safetensors.numpy import save_file

from saelab.autointerp.explain import ExplanationRecord, write_explanations
from saelab.autointerp.results import ScoreRow, ScoreSummary, write_scores
from saelab.autointerp.scorers.base import Prediction
from saelab.config import CacheConfig
from saelab.latents.build import Chunk, build_cache
from saelab.latents.cache import LatentCache
from saelab.latents.sampling import Example, LatentExamples, SampleSet
from saelab.metrics import binary_metrics
from saelab.sae import base as sae_lib
from saelab.web.data import RunData
from saelab.web.server import make_server, serve_in_thread, url_of

CTX = 64
WORDS = [
    "the",
    "of",
    "river",
    "song",
    "city",
    "music",
    "light",
    "played",
    "church",
    "queen",
    "star",
    "planet",
    "born",
    "year",
    "paris",
]


def chunks(n_tokens: int, d_in: int, batch: int) -> Iterator[Chunk]:
    gen = torch.Generator().manual_seed(0)
    for s in range(0, n_tokens, batch):
        b = min(batch, n_tokens - s)
        idx = np.arange(s, s + b)
        yield torch.randn(b, d_in, generator=gen), (idx // CTX).astype(np.int32), (idx % CTX).astype(np.int32)


def example(rng: np.random.Generator, activating: bool, quantile: int = -1) -> Example:
    ids = rng.integers(0, len(WORDS), 32)
    acts = np.where(rng.random(32) < 0.15, rng.random(32) * 5, 0.0) if activating else np.zeros(32)
    if activating and acts.max() == 0:
        acts[rng.integers(32)] = 1.0
    return Example(
        tuple(int(i) for i in ids),
        tuple(f" {WORDS[i]}" for i in ids),
        tuple(float(np.float32(a)) for a in acts),
        int(rng.integers(10**6)),
        int(rng.integers(4)) * 32,
        quantile,
    )


def write_run(folder: Path, d_in: int, d_sae: int, k: int, n_tokens: int, n_sampled: int) -> np.ndarray:
    """Write the run; returns the sampled latents."""
    torch.manual_seed(0)
    sae = sae_lib.build(sae_lib.SAEConfig("topk", d_in, d_sae, k))
    sae_lib.save(sae, folder / "sae")
    build_cache(sae, chunks(n_tokens, d_in, 4096), folder / "latents", CacheConfig(), "bench")
    stats = LatentCache.open(folder / "latents").stats
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(d_sae, size=n_sampled, replace=False))
    latents = []
    for f in chosen:
        latents.append(
            LatentExamples(
                int(f),
                float(stats.frequency[f]),
                float(stats.max_act[f]),
                tuple(example(rng, True) for _ in range(8)),
                tuple(example(rng, True, q) for q in (0, 0, 1, 1, 2, 2)),
                tuple(example(rng, False) for _ in range(6)),
                tuple(example(rng, False) for _ in range(4)),
            )
        )
    (folder / "samples").mkdir()
    samples = SampleSet(latents)
    samples.save(folder / "samples" / "samples.json")
    records = [
        ExplanationRecord(
            le.latent, name, model, f"{name} {WORDS[le.latent % len(WORDS)]} {le.latent}", "", True, None
        )
        for le in latents
        for name, model in (("default", "qwen"), ("token_stats", "none"))
    ]
    write_explanations(records, folder / "explain" / "explanations.jsonl")
    write_scores(ScoreSummary(score_rows(samples, rng), [], 0, {}), folder / "score")
    return chosen


def score_rows(samples: SampleSet, rng: np.random.Generator) -> list[ScoreRow]:
    rows = []
    for le in samples.latents:
        exs = [(e, 1) for e in le.test_pos] + [(e, 0) for e in le.test_neg]
        for explainer in ("default", "token_stats"):
            for scorer in ("detection", "fuzzing", "embedding"):
                preds = [
                    Prediction(
                        e.example_id,
                        y,
                        int(rng.random() < 0.5 + 0.3 * (2 * y - 1)),
                        float(rng.random()),
                        e.quantile,
                    )
                    for e, y in exs
                ]
                m = binary_metrics(
                    np.array([p.label for p in preds], dtype=np.int64),
                    np.array([p.pred for p in preds], dtype=np.int64),
                    np.array([p.score for p in preds], dtype=np.float64),
                )
                rows.append(
                    ScoreRow(le.latent, explainer, scorer, f"{explainer} {le.latent}", m, None, preds)
                )
    return rows


def neighbour_ms(d_sae: int, d_in: int, n: int = 20) -> dict[str, float]:
    """Nearest latents alone on a wider decoder (a random [d_sae, d_in] W_dec_FD in a safetensors file): the
    latent page's one pass over the decoder grows with d_in; the first call also takes the row norms."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "sae").mkdir()
        w = np.random.default_rng(0).standard_normal((d_sae, d_in), dtype=np.float32)
        save_file({"W_dec_FD": w}, str(folder / "sae" / "sae.safetensors"))
        del w
        run = RunData("wide", folder)
        start = time.perf_counter()
        run.decoder()
        norms_s = time.perf_counter() - start
        times = []
        for f in np.random.default_rng(2).choice(d_sae, size=n, replace=False):
            start = time.perf_counter()
            run.neighbours(int(f))
            times.append(time.perf_counter() - start)
    return {"d_in": d_in, "first_norms_ms": round(norms_s * 1e3, 1), **ms(times)}


def timed_get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
        assert r.status == 200 and len(body) > 0
    return time.perf_counter() - start


def ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median_ms": round(statistics.median(xs) * 1e3, 2),
        "p95_ms": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))] * 1e3, 2),
        "max_ms": round(xs[-1] * 1e3, 2),
        "n": len(xs),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-sae", type=int, default=50_000)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16_384)
    p.add_argument("--sampled", type=int, default=5000)
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serve_latency.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        start = time.perf_counter()
        chosen = write_run(folder, args.d_in, args.d_sae, args.k, args.tokens, args.sampled)
        write_s = time.perf_counter() - start
        sizes = {
            rel: (folder / rel).stat().st_size
            for rel in (
                "samples/samples.json",
                "score/scores.jsonl",
                "explain/explanations.jsonl",
                "sae/sae.safetensors",
            )
        }
        start = time.perf_counter()
        server = make_server([folder])
        startup_s = time.perf_counter() - start
        serve_in_thread(server)
        base = url_of(server) + "run/run/"
        first_list_s = timed_get(base)
        lists = [
            timed_get(base + q)
            for q in (
                "?sort=default/detection&order=desc",
                "?q=river",
                "?freq_min=0.001&sort=max_act&order=desc",
                "?page=500",
            )
            for _ in range(5)
        ]
        rng = np.random.default_rng(1)
        first_latent_s = timed_get(base + "latent/0")
        picks = rng.choice(args.d_sae, size=args.pages, replace=False)
        pages = [timed_get(f"{base}latent/{int(f)}") for f in picks]
        full = [
            timed_get(f"{base}latent/{int(f)}") for f in rng.choice(chosen, size=args.pages, replace=False)
        ]
        server.shutdown()
        server.server_close()
    result = {
        "args": vars(args),
        "write_run_seconds": round(write_s, 1),
        "file_bytes": sizes,
        "startup_ms": round(startup_s * 1e3, 2),
        "first_list_page_ms": round(first_list_s * 1e3, 1),
        "list_page": ms(lists),
        "first_latent_page_ms": round(first_latent_s * 1e3, 1),
        "latent_page_random": ms(pages),
        "latent_page_sampled": ms(full),
        "neighbours_wider_decoder": [neighbour_ms(args.d_sae, d) for d in (768, 2304)],
        "target_ms": 200,
        "machine": machine_facts(args.threads, load_before),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
