"""Where one TopK training step's time goes, against the floor of exact TopK: the dense encoder matmul.

    .venv/bin/python benchmarks/step_profile.py [--widths 4608 18432 36864] [--steps 12] \
        [--out benchmarks/results/step_profile.json]

Exact TopK must compute every pre-activation to choose the k largest: one [B, D] @ [D, F] matmul, B*D*F
multiply-adds a step. Everything else (top-k, AuxK, decoder, backward, Adam, the decoder-norm projection) is what
a trainer adds to it. For each width this script
1. times that matmul alone (`x @ W_enc` on the same shapes, median of repeats): the floor; and the same matmul in
   bfloat16, the floor of the `selection_matmul` bfloat16 choice (saelab/sae/selection.py);
2. builds saelab's own `SAETrainer` (TrainConfig defaults, TopK, batch 4,096) on real activations of the bundled
   model when `benchmarks/peer_training.py` has cached them (else Gaussian rows, said in the output), runs warm-up
   steps until AuxK has dead latents to work on (as in a real run after `dead_tokens`), then times `--steps`
   whole steps (`SAETrainer._step`, the trainer's own code, under the trainer's allocator setting
   `reuse_freed_memory`) with wall clocks;
3. profiles a few of those steps with `torch.profiler` and sums the self CPU time of each operator into the
   phases of the step, so the table shows what to close.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.profiler import ProfilerActivity, profile

from saelab.activations.sources import TensorSource
from saelab.config import TrainConfig
from saelab.train.allocator import reuse_freed_memory
from saelab.train.distributed import DistInfo
from saelab.train.sae_trainer import SAETrainer
from saelab.train.trainer import sae_config

ROOT = Path(__file__).resolve().parent.parent

PHASES = (
    ("matmul (dense: encoder forward; sparse: entry backward)", ("aten::mm", "aten::addmm", "aten::linear")),
    ("top-k", ("aten::topk",)),
    ("sparse kernels (CSR products, sampled dot products)", ("sparse", "sampled_addmm", "embedding_bag")),
    ("optimizer (fused Adam)", ("adam",)),
    ("index/scatter/gather (AuxK columns, counts)", ("index", "scatter", "gather", "nonzero", "argsort")),
    (
        "elementwise and reductions",
        ("add", "mul", "sub", "div", "pow", "relu", "where", "sum", "mean", "norm"),
    ),
)


def phase_of(op: str) -> str:
    name = op.lower()
    for phase, keys in PHASES:
        if any(k in name for k in keys):
            return phase
    return "other"


def activations(n: int, at_least: int) -> tuple[torch.Tensor, str]:
    """Up to n real layer-15 activations from peer_training's cache (the newest file, if it holds at least
    `at_least` rows), else n Gaussian rows."""
    caches = sorted((ROOT / "benchmarks" / ".cache").glob("acts-*.safetensors"), key=os.path.getmtime)
    if caches:
        with safe_open(str(caches[-1]), framework="pt") as f:
            train = f.get_slice("train")
            have = train.get_shape()[0]
            if have >= at_least:
                return train[: min(n, have)].contiguous(), f"real: {caches[-1].name}, {min(n, have)} rows"
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 576, generator=gen) * 3 + 1, "gaussian (no peer_training cache)"


def floor_seconds(
    batch: int, d_in: int, width: int, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Median wall and CPU seconds of the encoder matmul alone (into a kept output, as the step does)."""
    x, w = torch.randn(batch, d_in, dtype=dtype), torch.randn(d_in, width, dtype=dtype)
    out = x @ w
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(x, w, out=out)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def profile_width(
    acts_ND: torch.Tensor, width: int, steps: int, batch: int, threads: str = "all", selection: str = "auto"
) -> dict[str, Any]:
    with reuse_freed_memory(torch.device("cpu")):
        return _profile_width(acts_ND, width, steps, batch, threads, selection)


def _profile_width(
    acts_ND: torch.Tensor, width: int, steps: int, batch: int, threads: str, selection: str
) -> dict[str, Any]:
    d_in = acts_ND.shape[1]
    cfg = TrainConfig(
        architecture="topk", expansion=width // d_in, k=32, batch_size=batch, epochs=1,
        cpu_step_threads="one-after-matmul" if threads == "one-after-matmul" else "all",
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, selection_matmul=selection)  # type: ignore[arg-type]  # argparse's choices
    sae_cfg = sae_config(cfg, d_in)
    source = TensorSource(acts_ND)
    trainer = SAETrainer(source, cfg, 0, sae_cfg, DistInfo())
    trainer.init_from_data()
    trainer.total = 10**6  # a long run's middle: the lr schedule at full strength
    rows = acts_ND * trainer.scale
    n_batches = rows.shape[0] // batch

    def step(i: int) -> None:
        x_BD = rows[(i % n_batches) * batch : (i % n_batches + 1) * batch]
        trainer._step(x_BD)
        trainer.step += 1

    warm = cfg.dead_tokens // batch + 2  # past `dead_tokens`: AuxK has dead latents to work on
    for i in range(warm):
        step(i)
    dead = int((trainer.since_fired_F >= cfg.dead_tokens).sum())
    walls, cpus = [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(warm + i)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            step(warm + steps + i)
    phases: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        phases[phase_of(ev.key)] += ev.self_cpu_time_total / 1e6 / 3
    floor, floor_cpu = floor_seconds(batch, d_in, width)
    bf16_floor, _ = floor_seconds(batch, d_in, width, dtype=torch.bfloat16)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    selector = getattr(trainer.sae, "selector", None)
    return {
        "width": width,
        "selection": "bfloat16" if selector is not None else "float32",
        "rows_rechecked_in_float32": selector.rechecked if selector is not None else None,
        "encoder_matmul_bf16_seconds": bf16_floor,
        "dead_latents_during_timing": dead,
        "step_seconds_median": wall,
        "step_seconds_all": walls,
        "encoder_matmul_seconds": floor,
        "step_over_encoder_matmul": wall / floor,
        "step_cpu_seconds_median": cpu,
        "encoder_matmul_cpu_seconds": floor_cpu,
        "step_cpu_over_encoder_matmul_cpu": cpu / floor_cpu,
        "tokens_per_second": batch / wall,
        "profiled_self_cpu_seconds_per_step": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[4608, 18432, 36864])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument(
        "--cpu-step-threads", choices=("all", "one-after-matmul"), default="all", help="TrainConfig's setting"
    )
    p.add_argument(
        "--selection",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="TrainConfig.selection_matmul",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_profile.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    acts, what = activations(args.batch * 40, args.batch * 16)
    print(f"activations: {what}", flush=True)
    load_before = os.getloadavg()
    results = []
    for width in args.widths:
        r = profile_width(acts, width, args.steps, args.batch, args.cpu_step_threads, args.selection)
        results.append(r)
        phases = ", ".join(
            f"{k.split(' (')[0]} {v:.3f}" for k, v in r["profiled_self_cpu_seconds_per_step"].items()
        )
        print(
            f"width {width}: step {r['step_seconds_median']:.3f} s = {r['step_over_encoder_matmul']:.2f}x the "
            f"encoder matmul ({r['encoder_matmul_seconds']:.3f} s; bfloat16 {r['encoder_matmul_bf16_seconds']:.3f} s), "
            f"{r['selection']} selection, {r['tokens_per_second']:,.0f} tok/s; CPU "
            f"{r['step_cpu_seconds_median']:.3f} s = {r['step_cpu_over_encoder_matmul_cpu']:.2f}x the matmul's; "
            f"self CPU s/step: {phases}",
            flush=True,
        )
    out = {
        "command": "python benchmarks/step_profile.py " + " ".join(sys.argv[1:]),
        "activations": what,
        "threads": 2,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
