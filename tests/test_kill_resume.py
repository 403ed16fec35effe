"""Every stage SIGKILLed mid-run, then run again: the result equals an uninterrupted run's, and what was stored
before the kill is not computed again (forward batches, encoded chunks and LLM requests are counted).

- collect: `--collect.resume` keeps the finished shards and runs only the forwards after them (both formats);
- cache: `--cache.resume` continues from the last spilled run, without running the model for the tokens before it
  (eval split) or reading them (train split);
- explain and score: rerunning the same command asks the LLM only what llm/cache.sqlite does not hold; with the
  local engine, whose floats depend on what a batch holds, the rerun's requests get the batches they had.

Training has its own kill test (test_resume.py). The kill lands at a point the test waits for (a shard, a spilled
run or cached answers on disk) while the stage is still running; each stage runs in a subprocess with one thread
so the interrupted and the uninterrupted runs compute the same floats.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_corpus
from llm_server import LocalOpenAIServer
from safetensors.numpy import load_file
from support_llm import RuleClient, tiny_chat_model
from support_run import SMALL

from saelab.autointerp.llm.base import ChatResponse
from saelab.autointerp.llm.cache import request_key
from saelab.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.resume]

COLLECT = ["--data.ctx-len", "32", "--collect.n-train-tokens", "12000", "--collect.batch-size", "2"]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "long.txt"
    path.write_text(make_corpus(n_docs=900, seed=1))
    return path


def saelab(run_dir: Path, stage: str, *args: str) -> subprocess.Popen[bytes]:
    """`saelab STAGE --run-dir RUN ...` in a subprocess with one thread; its output goes to RUN.STAGE.txt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "saelab.cli", stage, "--run-dir", str(run_dir), *args]
    with run_dir.with_name(f"{run_dir.name}.{stage}.txt").open("a") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=out)


def finish(proc: subprocess.Popen[bytes], run_dir: Path, stage: str) -> None:
    assert proc.wait(timeout=600) == 0, run_dir.with_name(f"{run_dir.name}.{stage}.txt").read_text()


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    """SIGKILL `proc` as soon as `ready()`; the stage must still be running then."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the stage finished before {what}; give it more work"
        assert time.monotonic() < deadline, f"no {what} within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def record(run: Path, stage: str) -> dict[str, Any]:
    return dict(json.loads((run / "manifest.json").read_text())["stages"][stage])


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def finished_shards(tmp: Path) -> int:
    try:
        return len(json.loads((tmp / "progress.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


# --- collect -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["file", "store"])
def test_collect_killed_then_resumed(
    tmp_path: Path, tiny_model_dir: Path, long_corpus: Path, fmt: str
) -> None:
    args = [
        "--model.name", str(tiny_model_dir), "--data.dataset", str(long_corpus), *COLLECT,
        "--collect.format", fmt, "--collect.shard-rows", "400",
    ]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    finish(saelab(full, "collect", *args), full, "collect")
    rows = killed / ("activations/rows.tmp" if fmt == "file" else "activations/store.tmp")
    kill_when(saelab(killed, "collect", *args), lambda: finished_shards(rows) >= 3, "three finished shards")
    assert "collect" not in json.loads((killed / "manifest.json").read_text())["stages"]
    assert not (killed / "activations" / "acts.safetensors").exists()
    assert not (killed / "activations" / "store").exists()  # nothing a later stage would read as complete
    kept = finished_shards(rows)
    finish(saelab(killed, "collect", *args, "--collect.resume"), killed, "collect")

    ref, rec = record(full, "collect"), record(killed, "collect")
    assert ref["resumed_rows"] == 0 and rec["resumed_rows"] == kept * 400
    # a batch holds at most 2 windows of 31 kept positions: the batches wholly inside the kept shards did not run
    assert rec["forward_batches"] <= ref["forward_batches"] - kept * 400 // 62
    assert rec["n_tokens"] == ref["n_tokens"]
    assert rec["outputs"] == ref["outputs"]  # the same files with the same sha256
    if fmt == "file":
        assert (
            not (killed / "activations" / "rows.tmp").exists()
            and not (killed / "activations" / "rows").exists()
        )
    else:
        same_files(full / "activations" / "store", killed / "activations" / "store")


def test_collect_resume_with_other_settings_starts_afresh(
    tmp_path: Path, tiny_model_dir: Path, long_corpus: Path
) -> None:
    args = ["--model.name", str(tiny_model_dir), "--data.dataset", str(long_corpus), *COLLECT]
    run = tmp_path / "run"
    kill_when(
        saelab(run, "collect", *args, "--collect.shard-rows", "400"),
        lambda: finished_shards(run / "activations" / "rows.tmp") >= 2,
        "two finished shards",
    )
    finish(saelab(run, "collect", *args, "--collect.shard-rows", "500", "--collect.resume"), run, "collect")
    rec = record(run, "collect")
    assert rec["resumed_rows"] == 0 and rec["n_tokens"] >= 12000


# --- cache -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, long_corpus: Path) -> Path:
    """A run with a trained SAE and a large held-out split (eval fraction 0.5)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    collect = [
        "--model.name",
        str(tiny_model_dir),
        "--data.dataset",
        str(long_corpus),
        "--data.eval-fraction",
        "0.5",
    ]
    collect += [*COLLECT, "--collect.format", "store", "--collect.shard-rows", "3000"]
    assert main(["collect", "--run-dir", str(run), *collect]) == 0
    assert main(["train", "--run-dir", str(run), *SMALL["train"]]) == 0
    return run


def spilled_runs(tmp: Path) -> int:
    try:
        with np.load(tmp / "progress.npz") as z:
            return int(z["n_runs"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("split", ["eval", "train"])
def test_cache_killed_then_resumed(tmp_path: Path, trained: Path, split: str) -> None:
    """eval: the model runs again for the held-out windows (one window per batch, so the kill lands mid-build);
    train: the store's shards are read."""
    full, killed = shutil.copytree(trained, tmp_path / "full"), shutil.copytree(trained, tmp_path / "killed")
    args = ["--cache.dataset-split", split, "--cache.buffer-nnz", "600"]
    # eval: the forwards take the recorded collect batch size (2 windows); train: 4 stored rows a chunk
    args += ["--cache.n-tokens", "10000"] if split == "eval" else ["--cache.batch-size", "4"]
    finish(saelab(full, "cache", *args), full, "cache")
    proc = saelab(killed, "cache", *args)
    kill_when(proc, lambda: spilled_runs(killed / "latents.tmp") >= 3, "three spilled runs")
    assert not (killed / "latents").exists()
    kept = spilled_runs(killed / "latents.tmp")
    finish(saelab(killed, "cache", *args, "--cache.resume"), killed, "cache")

    ref, rec = record(full, "cache"), record(killed, "cache")
    assert ref["resumed_tokens"] == 0 and rec["resumed_tokens"] > 0
    assert rec["encoded_chunks"] < ref["encoded_chunks"]
    stats = [load_file(str(r / "latents" / "stats.safetensors")) for r in (full, killed)]
    assert [k for k in stats[0] if not np.array_equal(stats[0][k], stats[1][k])] == []
    assert rec["outputs"] == ref["outputs"]  # every shard, the stats, tokens and manifest: the same sha256
    same_files(full / "latents", killed / "latents")
    print(f"{split}: killed after {kept} runs; resumed at token {rec['resumed_tokens']}, "
          f"{rec['encoded_chunks']} of {ref['encoded_chunks']} chunks encoded again")  # fmt: skip


# --- explain and score -------------------------------------------------------------------------------------------


class SlowRules(RuleClient):
    """The rule model, 50 ms an answer (slow enough to kill a stage between answers); it keeps the cache key of
    every request it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    async def chat(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        self.keys.append(request_key(self.model_name, messages, max_tokens, temperature, logprobs))
        await asyncio.sleep(0.05)
        return await super().chat(messages, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs)


@pytest.fixture(scope="module")
def sampled(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = shutil.copytree(trained, tmp_path_factory.mktemp("sampled") / "run")
    assert main(["cache", "--run-dir", str(run)]) == 0
    assert main(["sample", "--run-dir", str(run), *SMALL["sample"], "--sample.n-latents", "8"]) == 0
    return run


def stored(run: Path) -> set[str]:
    """Keys of the answers in the run's LLM cache."""
    try:
        with sqlite3.connect(run / "llm" / "cache.sqlite") as db:
            return {key for (key,) in db.execute("SELECT key FROM answers")}
    except sqlite3.Error:
        return set()


def without_latency(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("latency_s", None)
    return rows


@pytest.mark.parametrize("stage", ["explain", "score"])
def test_llm_stage_killed_then_rerun(tmp_path: Path, sampled: Path, stage: str) -> None:
    rules = SlowRules()
    with LocalOpenAIServer(rules) as server:  # type: ignore[arg-type]
        llm = ["--llm.url", server.url, "--llm.concurrency", "2"]
        explain = [*llm, "--explain.explainers", "default", "contrastive"]
        score = [*llm, "--score.scorers", "detection", "fuzzing", "--score.no-shuffled-control"]
        base = shutil.copytree(sampled, tmp_path / "base")
        if stage == "score":
            finish(saelab(base, "explain", *explain), base, "explain")
        args = explain if stage == "explain" else score
        full, killed = shutil.copytree(base, tmp_path / "full"), shutil.copytree(base, tmp_path / "killed")
        before = stored(killed)
        n0 = len(rules.keys)
        finish(saelab(full, stage, *args), full, stage)
        # the keys the server saw are the keys the cache stores (so the checks below say what they mean)
        assert set(rules.keys[n0:]) == stored(full) - before
        total = record(full, stage)["llm_calls"]
        kill_when(
            saelab(killed, stage, *args), lambda: len(stored(killed) - before) >= 5, "five cached answers"
        )
        at_kill, n2 = stored(killed), len(rules.keys)
        assert 5 <= len(at_kill - before) < len(stored(full) - before)  # killed before it had every answer
        finish(saelab(killed, stage, *args), killed, stage)
        asked_again = rules.keys[n2:]
    rec = record(killed, stage)
    assert not set(asked_again) & at_kill  # nothing stored before the kill was asked again
    assert rec["llm_calls"] == len(asked_again) and rec["llm_calls"] + rec["llm_cache_hits"] == total
    assert stored(killed) == stored(full)
    if stage == "explain":
        path = "explain/explanations.jsonl"
        assert without_latency(killed / path) == without_latency(full / path)
    else:
        assert (killed / "score" / "scores.jsonl").read_text() == (
            full / "score" / "scores.jsonl"
        ).read_text()


@pytest.fixture(scope="module")
def batch_sensitive_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model folder whose floats for a request depend on the rest of its batch in the local engine."""
    folder = tmp_path_factory.mktemp("chat")
    tiny_chat_model(folder, hidden=128, heads=2, kv_heads=1)
    return folder


def test_score_on_the_local_engine_killed_then_rerun(
    tmp_path: Path, sampled: Path, batch_sensitive_chat_model: Path
) -> None:
    """The local engine answers a batch at once and its floats depend on what the batch holds. Killed as soon as
    answers are on disk, the rerun runs the rest in the batches of an uninterrupted run (the cache holds whole
    batches; answers an earlier run rejected are asked after the others), so scores.jsonl is byte-identical."""
    base = shutil.copytree(sampled, tmp_path / "base")
    finish(saelab(base, "explain", "--explain.explainers", "token_stats"), base, "explain")
    args = ["--llm.local-model", str(batch_sensitive_chat_model), "--score.scorers", "detection", "fuzzing"]
    full, killed = shutil.copytree(base, tmp_path / "full"), shutil.copytree(base, tmp_path / "killed")
    finish(saelab(full, "score", *args), full, "score")
    total = record(full, "score")["llm_calls"]
    kill_when(saelab(killed, "score", *args), lambda: len(stored(killed)) > 0, "answers on disk")
    at_kill = stored(killed)
    assert 0 < len(at_kill) < total
    finish(saelab(killed, "score", *args), killed, "score")
    rec = record(killed, "score")
    assert 0 < rec["llm_cache_hits"] <= len(at_kill) and rec["llm_calls"] + rec["llm_cache_hits"] == total
    assert stored(killed) == stored(full)
    assert (killed / "score" / "scores.jsonl").read_text() == (full / "score" / "scores.jsonl").read_text()
    print(f"killed with {len(at_kill)} of {total} answers on disk")
