"""The on-disk answer cache: a resumed run asks the server nothing it already has, failures are not kept, and the
explain stage records real calls and cache hits in its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support_llm import ScriptedServer, completion_body
from test_pipeline import run_stages

from saelab.autointerp.llm.base import LLMError, run_sync
from saelab.autointerp.llm.cache import CachedClient, ResponseCache, request_key
from saelab.autointerp.llm.openai import OpenAIClient
from saelab.cli import main

MODELS = '{"object": "list", "data": [{"id": "scripted"}]}'


def _msg(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


def _posts(srv: ScriptedServer) -> int:
    return sum(method == "POST" for method, _, _ in srv.requests)


async def _ask(client: CachedClient, prompts: list[int], logprobs: int = 0) -> list[str]:
    return [(await client.chat(_msg(i), max_tokens=4, logprobs=logprobs)).text for i in prompts]


@pytest.mark.resume
def test_resumed_client_asks_only_what_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ScriptedServer([(200, completion_body("first"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(path))
        assert run_sync(_ask(client, [0, 1, 2, 1]), client) == ["first"] * 4
    assert _posts(srv) == 3 and (client.calls, client.hits) == (3, 1)

    # a new process over the same file: the old answers come from disk, only the new prompt reaches the server
    with ScriptedServer([(200, completion_body("second"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(path))
        assert run_sync(_ask(client, [0, 1, 2, 3]), client) == ["first"] * 3 + ["second"]
    assert _posts(srv) == 1 and (client.calls, client.hits) == (1, 3)


def test_cached_answer_keeps_usage_and_is_marked() -> None:
    cache = ResponseCache(Path(":memory:"))
    with ScriptedServer([(200, completion_body("Yes", {"Yes": -0.1, "No": -2.4}))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), cache)
        fresh = run_sync(client.chat(_msg(0), max_tokens=1, logprobs=2), client)
        again = run_sync(client.chat(_msg(0), max_tokens=1, logprobs=2), client)
    assert not fresh.cached and again.cached
    assert (again.text, again.top_logprobs, again.prompt_tokens) == (fresh.text, fresh.top_logprobs, 7)


def test_key_covers_every_parameter() -> None:
    base = request_key("m", _msg(0), 4, 0.0, 0)
    others = [
        request_key("other", _msg(0), 4, 0.0, 0),
        request_key("m", _msg(1), 4, 0.0, 0),
        request_key("m", _msg(0), 5, 0.0, 0),
        request_key("m", _msg(0), 4, 0.7, 0),
        request_key("m", _msg(0), 4, 0.0, 20),
    ]
    assert base == request_key("m", _msg(0), 4, 0.0, 0) and base not in others and len(set(others)) == 5


@pytest.mark.fault
def test_failures_are_not_cached(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    with ScriptedServer([(500, "down")]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0, backoff_s=0.0), cache)
        with pytest.raises(LLMError):
            run_sync(client.chat(_msg(0), max_tokens=4), client)
    assert len(cache) == 0
    with ScriptedServer([(200, completion_body("back"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), cache)
        assert run_sync(client.chat(_msg(0), max_tokens=4), client).text == "back"
    assert len(cache) == 1


@pytest.mark.bad_input
def test_corrupt_cache_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LLMError, match=r"not a readable LLM answer cache .*; move it away"):
        ResponseCache(path)


@pytest.mark.resume
def test_explain_stage_rerun_asks_nothing(tmp_path: Path, tiny_model_dir: Path, corpus_file: Path) -> None:
    """A second `saelab explain` on the same run is answered from `llm/cache.sqlite`: the server gets no chat request
    and the manifest records 0 calls and one hit per explanation."""
    run = tmp_path / "r"
    run_stages(run, tiny_model_dir, corpus_file)
    n_latents = len(json.loads((run / "samples" / "samples.json").read_text())["latents"])
    # --force: the run's score was made from its explanations (it is dropped, then kept when nothing changed)
    args = [
        "explain",
        "--run-dir",
        str(run),
        "--explain.explainers",
        "default",
        "--llm.max-retries",
        "0",
        "--force",
    ]
    records = []
    for answer in ("Explanation: numbers", "Explanation: never asked"):
        with ScriptedServer([(200, MODELS), (200, completion_body(answer))]) as srv:
            assert main([*args, "--llm.url", srv.url]) == 0
        records.append(json.loads((run / "manifest.json").read_text())["stages"]["explain"])
        if answer.endswith("never asked"):
            assert _posts(srv) == 0
    assert (records[0]["llm_calls"], records[0]["llm_cache_hits"]) == (n_latents, 0)
    assert (records[0]["llm_prompt_tokens"], records[0]["llm_completion_tokens"]) == (
        7 * n_latents,
        n_latents,
    )
    assert (records[1]["llm_calls"], records[1]["llm_cache_hits"]) == (0, n_latents)
    assert records[1]["llm_prompt_tokens"] == 0
    lines = (run / "explain" / "explanations.jsonl").read_text().splitlines()
    assert [json.loads(line)["explanation"] for line in lines] == ["numbers"] * n_latents


def test_no_cache_counts_calls_and_stores_nothing(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    run = tmp_path / "r"
    run_stages(run, tiny_model_dir, corpus_file)
    args = ["explain", "--run-dir", str(run), "--explain.explainers", "default", "--llm.no-cache", "--force"]
    for _ in range(2):
        with ScriptedServer([(200, MODELS), (200, completion_body("Explanation: numbers"))]) as srv:
            assert main([*args, "--llm.url", srv.url]) == 0
        record = json.loads((run / "manifest.json").read_text())["stages"]["explain"]
        assert record["llm_calls"] == _posts(srv) > 0 and record["llm_cache_hits"] == 0
    assert not (run / "llm" / "cache.sqlite").exists()
