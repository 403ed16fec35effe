"""Sparse probing of a small TopK SAE on the bundled model, every bundled task, default `ProbingConfig`.

    .venv/bin/python benchmarks/probing.py [--n-train-tokens 40000] [--n-per-class 128] \
        [--out benchmarks/results/probing.json]

Collects activations at the middle layer from the Wikipedia corpus, trains a TopK SAE on them (train defaults),
runs `run_probing` and writes its JSON (plus wall times) to --out; prints one line per task and probe.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train-tokens", type=int, default=40_000)
    p.add_argument("--n-per-class", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/probing.json")
    args = p.parse_args()
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.eval.probing import ProbingConfig, run_probing
    from saelab.models.loading import BUNDLED_SMOLLM2, default_hookpoint, load_model
    from saelab.train.trainer import train

    times: dict[str, float] = {}
    start = time.perf_counter()
    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = default_hookpoint(lm.model)
    windows = build_windows(DataConfig(max_docs=2000), lm.tokenizer, args.seed)
    acts = collect(lm, windows, hookpoint, args.n_train_tokens, batch_size=16)
    sae = train(acts.acts_ND, TrainConfig(checkpoint_every=0), args.seed, hookpoint, lm.name).sae.eval()
    times["sae_seconds"] = time.perf_counter() - start
    cfg = replace(ProbingConfig(), n_per_class=args.n_per_class)
    start = time.perf_counter()
    result = run_probing(lm, sae, hookpoint, cfg, args.seed)
    times["probing_seconds"] = time.perf_counter() - start
    out = {
        **result.to_json(),
        "benchmark": {
            **times,
            "n_train_tokens": args.n_train_tokens,
            "torch_threads": torch.get_num_threads(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for task in result.tasks:
        for s in task.scores:
            k = "all" if s.k is None else s.k
            print(
                f"{task.name:24s} {s.features:3s} {s.probe:13s} k={k!s:4s} acc {s.accuracy:.3f} f1 {s.f1:.3f}"
            )
    print(json.dumps(times))


if __name__ == "__main__":
    main()
