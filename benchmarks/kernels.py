"""Training throughput of the sparse backward kernels (`train.kernels sparse`) against the dense path, per
k-sparse architecture, at the size of the peer benchmark (d_in 576, width 4608, k 32, batch 4096).

    .venv/bin/python benchmarks/kernels.py [--steps 8] [--repeats 3] [--out benchmarks/results/kernels.json]

Synthetic activations (training speed does not depend on their values at a fixed k; the selection's cost does
not either). Each (architecture, kernels) pair trains `steps` steps `repeats` times, interleaved so that other load
on the machine touches both paths alike; the median steady-state step time is reported (the first two steps of
each run are warm-up and excluded). Both paths compute the same gradients (tests/test_sparse_ops.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads the variable then

from machine import machine_facts

from saelab.config import TrainConfig
from saelab.sae.base import SAE, TrainLoss
from saelab.train.trainer import train

ARCHS: tuple[str, ...] = ("topk", "batchtopk", "matryoshka")


def step_seconds(x: torch.Tensor, cfg: TrainConfig) -> float:
    """Median wall time of the steps after the first two."""
    stamps: list[float] = []

    def hook(step: int, sae: SAE, loss: TrainLoss) -> None:
        stamps.append(time.perf_counter())

    train(x, cfg, seed=0, step_hook=hook)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps[1:]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch = 4096
    x = torch.randn(batch * args.steps, 576, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    base = TrainConfig(
        expansion=8, k=32, lr=4e-4, batch_size=batch, epochs=1, log_every=10**6, checkpoint_every=0
    )
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {a: {"sparse": [], "dense": []} for a in ARCHS}
    for _ in range(args.repeats):
        for arch in ARCHS:
            for kernels in ("sparse", "dense"):
                cfg = dataclasses.replace(base, architecture=arch, kernels=kernels)
                times[arch][kernels].append(step_seconds(x, cfg))
    rows = []
    for arch in ARCHS:
        sparse, dense = (statistics.median(times[arch][k]) for k in ("sparse", "dense"))
        rows.append(
            {
                "architecture": arch,
                "sparse_step_s": round(sparse, 4),
                "dense_step_s": round(dense, 4),
                "sparse_tok_s": round(batch / sparse),
                "dense_tok_s": round(batch / dense),
                "speedup": round(dense / sparse, 2),
            }
        )
    result = {
        "command": "python benchmarks/kernels.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": machine_facts(args.threads, load_before),
        "shape": {"d_in": 576, "d_sae": 4608, "k": 32, "batch": batch},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| architecture | sparse tok/s | dense tok/s | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['architecture']} | {r['sparse_tok_s']:,} | {r['dense_tok_s']:,} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
