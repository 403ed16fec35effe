"""Time `saelab demo` on the bundled defaults, stage by stage, after the model cache is built.

    .venv/bin/python benchmarks/demo_timing.py [--run-dir runs/bench-demo] [--out benchmarks/results/demo_timing.json]
    .venv/bin/python benchmarks/demo_timing.py --count-only --run-dir RUN   # the judge-token count of a finished run

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


class _ShapeOnlyModel:
    """Stands in for the chat model: answers with the shapes the local engine expects and computes nothing, so
    the engine's batching, prefix sharing and padding can be counted in seconds."""

    def __call__(self, input_ids: torch.Tensor, cache: object, **_: object) -> object:
        from types import SimpleNamespace

        from transformers import DynamicCache

        new = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 1)
        if cache is not None:
            layer = cache.layers[0]  # type: ignore[attr-defined]
            kv = [(torch.cat([layer.keys, new], 2), torch.cat([layer.values, new], 2))]
        else:
            kv = [(new, new)]
        return SimpleNamespace(
            cache=DynamicCache(ddp_cache_data=kv), logits=torch.zeros(input_ids.shape[0], 1, 64)
        )


def judge_token_counts(run_dir: Path) -> dict[str, int]:
    """Token accounting of the run's detection and fuzzing judgements through the local engine (shape only): the
    tokens as sent, the distinct ones (a prefix tree of all prompts: the least any exact prefix reuse runs), the
    per-example parts (after each explanation's shared prefix) and the tokens the engine runs, padding included."""
    import asyncio
    from types import SimpleNamespace

    from saelab.autointerp.explain import load_run_explanations
    from saelab.autointerp.llm.local import LocalChatClient, _common_prefix_all
    from saelab.autointerp.results import shuffled_explanations
    from saelab.autointerp.scorers.base import TOP_LOGPROBS, judge_messages
    from saelab.autointerp.scorers.detection import DetectionScorer
    from saelab.autointerp.scorers.fuzzing import FuzzingScorer
    from saelab.latents.sampling import SampleSet
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    lm = load_model(BUNDLED_SMOLLM2)
    client = LocalChatClient(lm)
    client.loaded = SimpleNamespace(
        model=_ShapeOnlyModel(), tokenizer=lm.tokenizer, device=lm.device, name=lm.name
    )  # type: ignore[assignment]
    samples = SampleSet.load_run(run_dir)
    by_latent = {le.latent: le for le in samples.latents}
    explained = [r for r in load_run_explanations(run_dir) if r.ok and r.explanation]
    explained += shuffled_explanations(explained, 0)
    prompts: list[list[dict[str, str]]] = []
    groups: dict[tuple[str, str], list[list[int]]] = {}
    for scorer in (DetectionScorer(client), FuzzingScorer(client, 0.3, 0)):
        for r in explained:
            for _, text, _ in scorer.texts(by_latent[r.latent]):
                msgs = judge_messages(scorer.template, str(r.explanation), text)
                prompts.append(msgs)
                groups.setdefault((scorer.name, str(r.explanation)), []).append(client.encode(msgs))
    ids = [i for g in groups.values() for i in g]
    tree = {tuple(s[:n]) for s in ids for n in range(1, len(s) + 1)}

    async def judge_all() -> None:
        await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=TOP_LOGPROBS) for m in prompts))

    asyncio.run(judge_all())
    return {
        "prompts": len(prompts),
        "tokens_as_sent": sum(map(len, ids)),
        "distinct_tokens": len(tree),
        "per_example_tokens": sum(
            sum(len(s) for s in g) - (len(g) * _common_prefix_all(g) if len(g) > 1 else 0)
            for g in groups.values()
        ),
        "tokens_run": client.tokens_run,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/bench-demo")
    p.add_argument("--out", default="benchmarks/results/demo_timing.json")
    p.add_argument("--count-only", action="store_true", help="only count the judge tokens of a finished run")
    args = p.parse_args()
    if args.count_only:
        print(json.dumps(judge_token_counts(Path(args.run_dir)), indent=2))
        return
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
    judge_tokens = judge_token_counts(Path(args.run_dir))
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
        "judge_tokens": judge_tokens,
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
