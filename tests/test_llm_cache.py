"""The on-disk answer cache: a resumed run asks the server nothing usable it already has, failures and unusable
answers are asked again, the answers of a batch are committed together, and the explain stage records real calls
and cache hits in its manifest."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from support_llm import ScriptedServer, completion_body, synthetic_samples, tiny_chat_model
from support_run import run_stages

from saelab.autointerp.explain import ExplanationRecord
from saelab.autointerp.llm.base import ChatResponse, LLMError, reject_answer, run_sync
from saelab.autointerp.llm.cache import CachedClient, ResponseCache, request_key
from saelab.autointerp.llm.local import LocalChatClient, _Request
from saelab.autointerp.llm.openai import OpenAIClient
from saelab.autointerp.score import run_score
from saelab.autointerp.scorers.base import yes_probability
from saelab.cli import main
from saelab.config import ScoreConfig
from saelab.models.loading import LoadedModel

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


@pytest.mark.resume
def test_a_judgement_fresh_and_from_the_cache_gives_the_same_score_rows(tmp_path: Path) -> None:
    """Log-probabilities with every bit of a float64 (none is a float32), scored as they arrive and then read
    back from the cache by a second run (whose server would answer otherwise): byte-identical score files."""
    top = {
        " Yes": -0.35667494393873245,
        "yes": -2.0794415416798357e-07,
        " No": -1.2039728043259361,
        "The": -7.1,
    }
    samples = synthetic_samples(n_latents=2)
    recs = [
        ExplanationRecord(i, "default", "m", f"the token {w}", "", True, None) for i, w in enumerate("ab")
    ]
    cfg = ScoreConfig(scorers=("detection", "fuzzing"), shuffled_control=False)
    outs = []
    for answer in (completion_body("Yes", top), completion_body("No", {"No": -0.01, "Yes": -4.6})):
        with ScriptedServer([(200, answer)]) as srv:
            client = CachedClient(
                OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(tmp_path / "c.sqlite")
            )
            out = tmp_path / f"score{len(outs)}"
            out.mkdir()
            run_score(samples, recs, cfg, client, out, seed=0)
            outs.append((out / "scores.jsonl").read_bytes())
    assert (client.calls, client.hits) == (0, 2 * 2 * 8) and _posts(srv) == 0
    assert outs[0] == outs[1]
    assert f'"score": {yes_probability(top)!r}'.encode() in outs[0]  # as read from the first answer


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


NULL_ANSWER = json.dumps({"model": "scripted", "choices": [{"index": 0, "message": {"content": None}}]})


@pytest.mark.fault
def test_unusable_answers_are_asked_again_and_usable_ones_reused(tmp_path: Path) -> None:
    """`content: null` (an empty answer) is never answered from the cache, nor one a caller rejected (an
    explainer that found no explanation in it); the answer a fixed server gives instead is kept."""
    path = tmp_path / "cache.sqlite"
    with ScriptedServer(
        [(200, NULL_ANSWER), (200, completion_body("maybe")), (200, completion_body("good"))]
    ) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(path))
        answers = [run_sync(client.chat(_msg(i), max_tokens=4), client) for i in range(3)]
        reject_answer(client, answers[1])
    assert [a.text for a in answers] == ["", "maybe", "good"] and _posts(srv) == 3
    with ScriptedServer([(200, completion_body("fixed"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(path))
        assert run_sync(_ask(client, [0, 1, 2]), client) == ["fixed", "fixed", "good"]
    assert _posts(srv) == 2 and (client.calls, client.hits) == (2, 1)
    with ScriptedServer([(200, completion_body("never asked"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), ResponseCache(path))
        assert run_sync(_ask(client, [0, 1, 2]), client) == ["fixed", "fixed", "good"]
    assert _posts(srv) == 0 and (client.calls, client.hits) == (0, 3)


@pytest.mark.fault
def test_an_empty_answer_kept_by_an_older_saelab_is_asked_again(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    cache.put(request_key("m", _msg(0), 4, 0.0, 0), ChatResponse("", 7, 0, 0.1, None, "m"))
    with ScriptedServer([(200, completion_body("back"))]) as srv:
        client = CachedClient(OpenAIClient(srv.url, "m", max_retries=0), cache)
        assert run_sync(_ask(client, [0]), client) == ["back"]
    assert _posts(srv) == 1 and client.hits == 0


# --- the local engine: batches are committed whole, and a rerun's new requests keep their batches ------------


class BatchRecorder(LocalChatClient):
    """The local engine, noting which prompts (by index in `prompts`) each batch ran."""

    def __init__(self, loaded: LoadedModel, prompts: Sequence[list[dict[str, str]]], batch_size: int) -> None:
        super().__init__(loaded, batch_size=batch_size)
        self.index = {tuple(self.encode(m)): i for i, m in enumerate(prompts)}
        self.batches: list[list[int]] = []

    def _run_batch(self, groups: list[list[_Request]]) -> list[ChatResponse]:
        self.batches.append(sorted(self.index[tuple(r.ids)] for g in groups for r in g))
        return super()._run_batch(groups)


class CommitRecorder(ResponseCache):
    """The answer cache, noting the request keys of each transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[list[str]] = []

    def put_many(self, items: Sequence[tuple[str, ChatResponse]]) -> None:
        self.commits.append([key for key, _ in items])
        super().put_many(items)


@pytest.fixture(scope="module")
def batch_sensitive(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny chat model whose floats for a request depend on the rest of its batch (as the bundled one's do)."""
    return tiny_chat_model(tmp_path_factory.mktemp("chat"), hidden=128, heads=2, kv_heads=1)


JUDGE_PROMPTS = [
    [{"role": "system", "content": "yes or no"}, {"role": "user", "content": f"the {a} of the {b} {c}"}]
    for a in ("city", "river", "song", "king")
    for b in ("war", "star", "light")
    for c in ("paris", "music music")
]


def _judge_all(client: CachedClient) -> list[ChatResponse]:
    async def run() -> list[ChatResponse]:
        return list(await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=5) for m in JUDGE_PROMPTS)))

    return run_sync(run(), client)


@pytest.mark.resume
def test_a_rerun_after_a_kill_gives_the_local_engine_the_same_batches(
    tmp_path: Path, batch_sensitive: LoadedModel
) -> None:
    """Each batch's answers are one transaction, so a kill leaves whole batches; the rerun's new requests then
    run in the batches they had in the uninterrupted run and get the same floats, and the answer an earlier run
    rejected is asked after them, in a batch of its own."""
    full = CommitRecorder(tmp_path / "full.sqlite")
    engine = BatchRecorder(batch_sensitive, JUDGE_PROMPTS, batch_size=5)
    reference = _judge_all(CachedClient(engine, full))
    keys = [request_key(engine.model_name, m, 1, 0.0, 5) for m in JUDGE_PROMPTS]
    assert len(engine.batches) >= 4
    assert [sorted(c) for c in full.commits] == [sorted(keys[i] for i in b) for b in engine.batches]

    # "killed" after the first two batches: the cache holds their answers; one of them was rejected
    full.close()  # its WAL journal checkpointed into the file
    shutil.copy(tmp_path / "full.sqlite", tmp_path / "killed.sqlite")
    kept = {keys[i] for b in engine.batches[:2] for i in b}
    db = sqlite3.connect(tmp_path / "killed.sqlite")
    db.executemany("DELETE FROM answers WHERE key = ?", [(k,) for k in set(keys) - kept])
    db.commit()
    db.close()
    killed = CommitRecorder(tmp_path / "killed.sqlite")
    rejected = engine.batches[0][0]
    killed.reject(keys[rejected])
    rerun = BatchRecorder(batch_sensitive, JUDGE_PROMPTS, batch_size=5)
    client = CachedClient(rerun, killed)
    again = _judge_all(client)
    assert rerun.batches == [*engine.batches[2:], [rejected]]
    assert (client.hits, client.calls) == (len(kept) - 1, len(keys) - len(kept) + 1)
    for i, (a, b) in enumerate(zip(reference, again)):
        if i != rejected:  # asked in another batch than first: its floats may differ in the last bits
            assert (a.text, a.top_logprobs) == (b.text, b.top_logprobs), i


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
