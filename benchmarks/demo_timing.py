"""Time `saelab demo` on the bundled defaults, stage by stage, after the model cache is built.

    .venv/bin/python benchmarks/demo_timing.py [--run-dir runs/bench-demo] [--out benchmarks/results/demo_timing.json]

The same run also times a bare full forward pass (no hooks) over 16 windows of the
corpus, so the stage times can be read against what this machine does at that moment (other load slows both),
and records the load average before and after the demo, the commit, and the LLM work of the explain and score
stages (requests, prompt tokens as sent; the local engine runs the parts prompts share once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def bare_forward_tok_s() -> float:
    from saelab.config import DataConfig
    from saelab.data.windows import build_windows
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    lm = load_model(BUNDLED_SMOLLM2)
    w = build_windows(DataConfig(max_docs=400), lm.tokenizer, seed=0)
    ids = torch.as_tensor(w.tokens[:16], dtype=torch.long)
    with torch.inference_mode():
        lm.model(input_ids=ids[:2], use_cache=False)
        start = time.perf_counter()
        lm.model(input_ids=ids, use_cache=False)
        return ids.numel() / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/bench-demo")
    p.add_argument("--out", default="benchmarks/results/demo_timing.json")
    args = p.parse_args()
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    load_model(BUNDLED_SMOLLM2)  # builds the cache if needed: excluded from the timed run
    shutil.rmtree(args.run_dir, ignore_errors=True)
    baseline = bare_forward_tok_s()
    load_start = os.getloadavg()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "saelab.cli", "demo", "--run-dir", args.run_dir], check=True)
    wall = time.perf_counter() - start
    load_end = os.getloadavg()
    manifest = json.loads((Path(args.run_dir) / "manifest.json").read_text())
    stages = {k: v["seconds"] for k, v in manifest["stages"].items()}
    metrics = manifest["stages"]["eval"]["summary"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "commit": commit.strip(),
        "load_average_1_5_15_min": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in load_end],
        },
        "wall_seconds": round(wall, 1),
        "stage_seconds": stages,
        "bare_full_forward_tok_s": round(baseline, 1),
        "collect_tok_s": round(manifest["stages"]["collect"]["n_tokens"] / stages["collect"], 1),
        "llm": {
            stage: {
                k: manifest["stages"][stage].get(f"llm_{k}")
                for k in ("calls", "prompt_tokens", "completion_tokens")
            }
            for stage in ("explain", "score")
        },
        "explained_variance": metrics["explained_variance"],
        "l0": metrics["l0"],
        "dead_fraction": metrics["dead_fraction"],
        "ce_loss_score": metrics["ce_loss_score"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
