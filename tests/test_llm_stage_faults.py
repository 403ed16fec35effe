"""`saelab explain` against LLM servers that misbehave, through the real CLI in a subprocess: a server that drips
its answer (or its headers) a byte at a time, and one that answers `content: null` until it is fixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from llm_server import LocalOpenAIServer
from support_llm import DripServer, RuleClient
from support_run import SMALL

from saelab.cli import main
from saelab.latents.sampling import SampleSet

TIMEOUT_S, RETRIES, BACKOFF_S = 1.0, 1, 1.0
"""--llm.timeout-s and --llm.max-retries of the drip test; the client waits 1 s before its one retry."""


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path) -> Path:
    """A run up to `saelab sample` (SMALL asks for 4 latents; those with enough examples are explained)."""
    run = tmp_path_factory.mktemp("sampled") / "run"
    for stage in ("collect", "train", "cache", "sample"):
        args = [stage, "--run-dir", str(run), *SMALL[stage]]
        if stage == "collect":
            args += ["--model.name", str(tiny_model_dir), "--data.dataset", str(corpus_file)]
        assert main(args) == 0, stage
    return run


def n_sampled(run: Path) -> int:
    """Latents the run's sample stage chose (each gets one explanation per explainer)."""
    return len(SampleSet.load_run(run).latents)


def saelab(run: Path, stage: str, *args: str, timeout: float) -> tuple[int, str, float]:
    """`saelab STAGE --run-dir RUN ...` in a subprocess: (exit code, stderr, seconds); killed after `timeout`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "saelab.cli", stage, "--run-dir", str(run), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - t0


def record(run: Path, stage: str) -> dict[str, Any]:
    return dict(json.loads((run / "manifest.json").read_text())["stages"][stage])


def explanations(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "explain" / "explanations.jsonl").read_text().splitlines()]


def startup_s(run: Path) -> float:
    """Seconds a CLI process takes to start and to refuse at once (imports, config): the slack of a bound."""
    code, _, seconds = saelab(run, "explain", "--llm.url", "http://127.0.0.1:9/v1", "--llm.max-retries", "0",
                              timeout=120)  # fmt: skip
    assert code == 1
    return seconds


@pytest.mark.fault
@pytest.mark.parametrize("drip", ["body", "headers"])
def test_explain_against_a_dripping_server_ends_at_the_deadline(
    tmp_path: Path, sampled: Path, drip: str
) -> None:
    """Each byte comes within the per-read timeout, so only the request's total deadline stops it: explain ends
    after about timeout x (retries + 1) + backoff, every request counted as failed, exit code 0."""
    run = shutil.copytree(sampled, tmp_path / "run")
    slack = startup_s(run) + 5.0
    with DripServer(drip, every_s=0.2) as srv:  # type: ignore[arg-type]
        args = ["--explain.explainers", "default", "--llm.url", srv.url, "--llm.timeout-s", str(TIMEOUT_S)]
        args += ["--llm.max-retries", str(RETRIES)]
        code, err, seconds = saelab(run, "explain", *args, timeout=120)
    n = len(explanations(run))
    assert code == 0, err
    assert seconds < TIMEOUT_S * (RETRIES + 1) + BACKOFF_S + slack, err
    assert srv.posts == n * (RETRIES + 1)  # every attempt went out (all in flight at once) and was cut off
    rec = record(run, "explain")
    assert rec["n_failed_requests"] == rec["n_failed"] == n == n_sampled(run) >= 2
    assert (rec["llm_calls"], rec["llm_cache_hits"]) == (0, 0)
    assert all("timed out after 1 s" in r["error"] for r in explanations(run))
    assert f"{n} of {n} explanations got no answer from the LLM" in err


class NullUntilFixed(LocalOpenAIServer):
    """The rule model over HTTP, answering `content: null` to the first `broken` distinct prompts it gets until
    `fixed` is set; it notes the prompts it is asked."""

    def __init__(self, broken: int) -> None:
        super().__init__(RuleClient())  # type: ignore[arg-type]
        self.broken, self.fixed = broken, False
        self.nulled: set[str] = set()
        self.asked: list[str] = []

    def completion(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        answer = super().completion(body, timeout_s)
        prompt = body["messages"][-1]["content"]
        self.asked.append(prompt)
        if not self.fixed and (prompt in self.nulled or len(self.nulled) < self.broken):
            self.nulled.add(prompt)
            answer["choices"][0]["message"]["content"] = None
        return answer


@pytest.mark.fault
def test_null_answers_are_asked_again_once_the_server_is_fixed(tmp_path: Path, sampled: Path) -> None:
    """A server answering `content: null` to all prompts but one, then fixed (same port, same model): the
    rerun asks those again and they succeed; the good answer comes from the cache; a third run asks
    nothing."""
    run = shutil.copytree(sampled, tmp_path / "run")
    n = n_sampled(run)
    assert n >= 2  # at least one good answer beside the broken ones
    with NullUntilFixed(broken=n - 1) as server:
        args = ["--explain.explainers", "default", "--llm.url", server.url]
        code, err, _ = saelab(run, "explain", *args, timeout=300)
        assert code == 0, err
        first = record(run, "explain")
        assert (first["n_explanations"], first["n_failed"], first["n_failed_requests"]) == (n, n - 1, 0)
        assert (first["llm_calls"], first["llm_cache_hits"]) == (n, 0)
        assert f"{n - 1} of {n} explanations failed: the answer held no usable explanation" in err
        assert "running the stage again asks for these again" in err

        server.fixed, n_asked = True, len(server.asked)
        code, err, _ = saelab(run, "explain", *args, timeout=300)
        assert code == 0, err
        second = record(run, "explain")
        assert set(server.asked[n_asked:]) == server.nulled and len(server.asked) == n_asked + n - 1
        assert (second["llm_calls"], second["llm_cache_hits"], second["n_failed"]) == (n - 1, 1, 0)
        assert all(r["ok"] and r["explanation"].startswith("the token ") for r in explanations(run))

        n_asked = len(server.asked)
        code, err, _ = saelab(run, "explain", *args, timeout=300)
        assert code == 0, err
        assert len(server.asked) == n_asked
        assert (record(run, "explain")["llm_calls"], record(run, "explain")["llm_cache_hits"]) == (0, n)
