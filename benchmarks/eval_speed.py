"""Speed of `saelab eval` against the bare forward passes it needs, on the bundled model and corpus.

    .venv/bin/python benchmarks/eval_speed.py [--tokens 100000] [--repeats 3] [--sae runs/demo/sae] [--out ...]

What eval needs from the model: a forward stopped at the hookpoint over the reconstruction windows, and three full
forwards (clean, SAE spliced in, zero ablation) over the CE/KL windows. The bare baseline runs exactly those
forwards with no SAE and no metric; eval runs them plus the SAE and every metric. With `--repeats R` the two are
timed R times each, interleaved (bare, eval, eval, bare, bare, eval, ...), so load that drifts during the run touches
both alike; the ratio reported is the median bare time over the median eval time, with every pair's own ratio beside
it. Without `--sae`, a TopK SAE of 4,608 latents (k = 32) with random weights is used: speed does not depend on the
weights at a fixed k.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from machine import machine_facts

from saelab import sae as sae_lib
from saelab.config import DataConfig, EvalConfig
from saelab.data import TokenWindows, build_windows
from saelab.evaluate import evaluate
from saelab.models import BUNDLED_SMOLLM2, LoadedModel, capture, forward_until, load_model, resolve_hookpoint


def bare_seconds(lm: LoadedModel, windows: TokenWindows, hookpoint: str, cfg: EvalConfig) -> float:
    """The forwards eval needs, and nothing else."""
    start = time.perf_counter()
    idx = windows.eval_idx[: cfg.n_windows]
    with torch.inference_mode():
        for s in range(0, len(idx), cfg.batch_size):
            ids = torch.as_tensor(windows.tokens[idx[s : s + cfg.batch_size]], dtype=torch.long)
            with capture(lm.model, [hookpoint]):
                forward_until(lm.model, ids)
        ce_idx = windows.eval_idx[: cfg.n_ce_windows]
        for s in range(0, len(ce_idx), cfg.ce_batch_size):
            ids = torch.as_tensor(windows.tokens[ce_idx[s : s + cfg.ce_batch_size]], dtype=torch.long)
            for _ in range(3):
                lm.model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000, help="reconstruction tokens (kept positions)")
    p.add_argument("--sae", default="", help="an SAE folder (any format saelab reads); default: random TopK")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings of each (medians reported)")
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
        from saelab.formats import import_sae

        sae = import_sae(Path(args.sae))
    else:
        torch.manual_seed(0)
        sae = sae_lib.build(sae_lib.SAEConfig("topk", lm.d_model, 8 * lm.d_model, k=32)).eval()
    load_before = os.getloadavg()
    bare_s: list[float] = []
    eval_s: list[float] = []
    result = None
    for r in range(args.repeats):
        for what in ("bare", "eval") if r % 2 == 0 else ("eval", "bare"):
            if what == "bare":
                bare_s.append(bare_seconds(lm, windows, hookpoint, cfg))
            else:
                start = time.perf_counter()
                result = evaluate(lm, sae, windows, hookpoint, cfg)
                eval_s.append(time.perf_counter() - start)
        print(f"repeat {r + 1}: bare {bare_s[-1]:.1f} s, eval {eval_s[-1]:.1f} s", flush=True)
    assert result is not None
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
        "eval_seconds": [round(x, 2) for x in eval_s],
        "bare_forward_seconds": [round(x, 2) for x in bare_s],
        "pair_ratios": [round(b / e, 3) for b, e in zip(bare_s, eval_s)],
        "speed_ratio": round(float(np.median(bare_s) / np.median(eval_s)), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
