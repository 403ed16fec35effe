"""Speed of `saelab eval` against the bare forward passes it needs, on the bundled model and corpus.

    .venv/bin/python benchmarks/eval_speed.py [--tokens 100000] [--repeats 3] [--sae runs/demo/sae] [--out ...]

What eval needs from the model: a forward stopped at the hookpoint over the reconstruction windows, and three full
forwards (clean, SAE spliced in, zero ablation) over the CE/KL windows. The bare baseline runs exactly those
forwards with no SAE and no metric; eval runs them plus the SAE and every metric.

The two are interleaved batch by batch: for each forward batch, the bare forwards of that batch and eval's step on
it (the next item of `evaluate.eval_tokens` fed to `ReconstructionStats.add`, and `downstream_scores` on that CE
batch: the code `evaluate_many` runs, in the same order) are timed back to back, which of the two goes first
alternating. Load on a shared host drifts over minutes; a second or two apart it touches both alike. The ratio of
a pass is its summed bare time over its summed eval time; `--repeats` passes are made and their median reported.
One end-to-end `evaluate()` call is timed at the end, as a check that the per-batch steps add up to the real call.
Without `--sae`, a TopK SAE of 4,608 latents (k = 32) with random weights is used: speed does not depend on the
weights at a fixed k.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from machine import machine_facts

from saelab.config import DataConfig, EvalConfig
from saelab.data.windows import TokenWindows, build_windows
from saelab.eval.core import ReconstructionStats, downstream_scores, eval_tokens, evaluate
from saelab.models.loading import (
    BUNDLED_SMOLLM2,
    LoadedModel,
    capture,
    forward_until,
    load_model,
    resolve_hookpoint,
)
from saelab.sae import base as sae_lib
from saelab.sae.base import SAE


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_pass(
    lm: LoadedModel, sae: SAE, windows: TokenWindows, hookpoint: str, cfg: EvalConfig
) -> tuple[float, float, dict[str, Any]]:
    """(bare seconds, eval seconds, reconstruction metrics) of one pass, the two timed batch by batch."""
    bare = evaluation = 0.0
    stats = ReconstructionStats(sae, cfg.dense_threshold)
    tokens = eval_tokens(lm, windows, hookpoint, cfg)
    idx = windows.eval_idx[: cfg.n_windows]

    def bare_recon(ids: torch.Tensor) -> None:
        with torch.inference_mode(), capture(lm.model, [hookpoint]):
            forward_until(lm.model, ids)

    def bare_ce(ids: torch.Tensor) -> None:
        with torch.inference_mode():
            for _ in range(3):
                lm.model(input_ids=ids, use_cache=False)

    steps: list[tuple[Callable[[], object], Callable[[], object]]] = []
    for s in range(0, len(idx), cfg.batch_size):
        ids = torch.as_tensor(windows.tokens[idx[s : s + cfg.batch_size]], dtype=torch.long)
        steps.append((partial(bare_recon, ids), lambda: stats.add(next(tokens))))
    ce_idx = windows.eval_idx[: cfg.n_ce_windows]
    for s in range(0, len(ce_idx), cfg.ce_batch_size):
        part = ce_idx[s : s + cfg.ce_batch_size]
        ids = torch.as_tensor(windows.tokens[part], dtype=torch.long)
        steps.append(
            (
                partial(bare_ce, ids),
                partial(downstream_scores, lm, [sae], windows, part, hookpoint, cfg.ce_batch_size),
            )
        )
    for i, (bare_step, eval_step) in enumerate(steps):
        if i % 2 == 0:
            bare += _seconds(bare_step)
            evaluation += _seconds(eval_step)
        else:
            evaluation += _seconds(eval_step)
            bare += _seconds(bare_step)
    if next(tokens, None) is not None:
        raise AssertionError("eval_tokens yielded more batches than the pass timed")
    return bare, evaluation, stats.result()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000, help="reconstruction tokens (kept positions)")
    p.add_argument("--sae", default="", help="an SAE folder (any format saelab reads); default: random TopK")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes (median ratio reported)")
    p.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = resolve_hookpoint(lm.model, "auto")
    windows = build_windows(DataConfig(), lm.tokenizer, seed=0)
    kept = windows.keep[windows.eval_idx].sum(axis=1)
    n_windows = int(np.searchsorted(np.cumsum(kept), args.tokens) + 1)
    if n_windows > len(windows.eval_idx):
        raise SystemExit(f"only {int(kept.sum())} held-out tokens; lower --tokens")
    cfg = EvalConfig(n_windows=n_windows, n_ce_windows=16)
    if args.sae:
        from saelab.sae.formats import import_sae

        sae = import_sae(Path(args.sae))
    else:
        torch.manual_seed(0)
        sae = sae_lib.build(sae_lib.SAEConfig("topk", lm.d_model, 8 * lm.d_model, k=32)).eval()
    load_before = os.getloadavg()
    passes = []
    for r in range(args.repeats):
        bare, evaluation, recon = interleaved_pass(lm, sae, windows, hookpoint, cfg)
        passes.append(
            {"bare_s": round(bare, 2), "eval_s": round(evaluation, 2), "ratio": round(bare / evaluation, 3)}
        )
        print(
            f"pass {r + 1}: bare {bare:.1f} s, eval {evaluation:.1f} s, ratio {bare / evaluation:.3f}",
            flush=True,
        )
    start = time.perf_counter()
    result = evaluate(lm, sae, windows, hookpoint, cfg)
    whole = time.perf_counter() - start
    if result.n_tokens != recon["n_tokens"] or not np.isclose(result.mse, recon["mse"], rtol=1e-6):
        raise AssertionError("the interleaved pass did not compute what evaluate() computes")
    command = f"python benchmarks/eval_speed.py --tokens {args.tokens} --repeats {args.repeats}"
    out = {
        "command": command + (f" --sae {args.sae}" if args.sae else ""),
        "machine": machine_facts(args.threads, load_before),
        "sae": {
            "architecture": sae.architecture,
            "d_sae": sae.cfg.d_sae,
            "source": args.sae or "random topk",
        },
        "reconstruction_tokens": result.n_tokens,
        "ce_tokens": result.n_ce_tokens,
        "forward_batches": len(range(0, n_windows, cfg.batch_size))
        + len(range(0, cfg.n_ce_windows, cfg.ce_batch_size)),
        "passes": passes,
        "speed_ratio": float(np.median([x["ratio"] for x in passes])),
        "evaluate_call_s": round(whole, 2),
        "evaluate_call_vs_median_pass_eval": round(
            whole / float(np.median([x["eval_s"] for x in passes])), 3
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
