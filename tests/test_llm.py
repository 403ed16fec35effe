"""LLM clients: HTTP retries and errors against real local servers; local micro-batching against one-by-one runs."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from support_llm import DripServer, ScriptedServer, completion_body, synthetic_samples, tiny_chat_model

from saelab.autointerp.llm import local as llm_local
from saelab.autointerp.llm import make_client
from saelab.autointerp.llm.base import LLMError, gather_with_progress, run_sync
from saelab.autointerp.llm.local import LocalChatClient
from saelab.autointerp.llm.openai import OpenAIClient
from saelab.config import ExplainConfig, LLMConfig, ScoreConfig
from saelab.models.loading import LoadedModel

MSG = [{"role": "user", "content": "hello"}]


def _client(url: str, **kw: object) -> OpenAIClient:
    return OpenAIClient(url, "m", concurrency=2, timeout_s=5.0, max_retries=2, backoff_s=0.01, **kw)  # type: ignore[arg-type]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: nothing listens there


# ---------------------------------------------------------------------------------------------- HTTP, fast


@pytest.mark.fault
def test_http_500_then_200_is_retried() -> None:
    with ScriptedServer([(500, "boom"), (200, completion_body("Yes"))]) as srv:
        resp = run_sync(_client(srv.url).chat(MSG, max_tokens=3))
    assert resp.text == "Yes"
    assert (resp.prompt_tokens, resp.completion_tokens, resp.model) == (7, 1, "scripted")
    assert resp.latency_s > 0
    assert len(srv.requests) == 2
    method, path, body = srv.requests[0]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert body == {"model": "m", "messages": MSG, "max_tokens": 3, "temperature": 0.0}


@pytest.mark.fault
def test_http_429_is_retried_and_logprobs_parsed() -> None:
    top = {"Yes": math.log(0.7), " yes": math.log(0.1), "No": math.log(0.2)}
    with ScriptedServer([(429, "slow down"), (429, "slow down"), (200, completion_body("Yes", top))]) as srv:
        resp = run_sync(_client(srv.url).chat(MSG, max_tokens=1, logprobs=5))
    assert resp.top_logprobs == pytest.approx(top)
    assert len(srv.requests) == 3
    assert srv.requests[-1][2] is not None and srv.requests[-1][2]["top_logprobs"] == 5


@pytest.mark.fault
def test_garbage_body_raises_llm_error_after_retries() -> None:
    with (
        ScriptedServer([(200, "<html>not json</html>")]) as srv,
        pytest.raises(LLMError, match=r"failed after 3 attempts: malformed answer"),
    ):
        run_sync(_client(srv.url).chat(MSG, max_tokens=3))
    assert len(srv.requests) == 3  # max_retries=2 -> 3 attempts, bounded


@pytest.mark.fault
def test_malformed_json_raises_after_retries() -> None:
    with ScriptedServer([(200, '{"choices": []}')]) as srv, pytest.raises(LLMError, match="malformed"):
        run_sync(_client(srv.url).chat(MSG, max_tokens=3))
    assert len(srv.requests) == 3


@pytest.mark.fault
def test_timeout_is_retried_then_reported() -> None:
    with ScriptedServer([(200, completion_body("late"))], delay_s=0.5) as srv:
        client = OpenAIClient(srv.url, "m", timeout_s=0.1, max_retries=1, backoff_s=0.01)
        with pytest.raises(LLMError, match=r"failed after 2 attempts: timed out after 0.1 s"):
            run_sync(client.chat(MSG, max_tokens=3))
        # the client gave up on each attempt after 0.1 s; on a loaded machine the server's thread may read the
        # second request later than that: wait for it (bounded), then count
        deadline = time.monotonic() + 10
        while len(srv.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(srv.requests) == 2


@pytest.mark.fault
@pytest.mark.parametrize("drip", ["body", "headers"])
def test_an_answer_dripped_a_byte_at_a_time_fails_at_the_deadline(drip: str) -> None:
    """Every byte comes well within the read timeout; the deadline on the whole request still ends each attempt
    after timeout_s (a watchdog of 30 s stands in for hanging forever)."""
    with DripServer(drip, every_s=0.05) as srv:  # type: ignore[arg-type]
        client = OpenAIClient(srv.url, "m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(LLMError, match=r"failed after 2 attempts: timed out after 0.5 s"):
            run_sync(asyncio.wait_for(client.chat(MSG, max_tokens=3), 30), client)
        assert time.monotonic() - t0 < 2 * 0.5 + 1.0
    assert srv.posts == 2


@pytest.mark.fault
def test_client_error_is_not_retried() -> None:
    with ScriptedServer([(400, '{"error": "bad model"}')]) as srv, pytest.raises(LLMError, match="HTTP 400"):
        run_sync(_client(srv.url).chat(MSG, max_tokens=3))
    assert len(srv.requests) == 1


@pytest.mark.fault
def test_unreachable_url_gives_one_line_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(LLMError) as info:
        run_sync(_client(url).check())
    message = str(info.value)
    assert message == f"cannot reach the LLM server at {url} (connection refused); start it or fix --llm.url"
    assert "\n" not in message


def test_check_lists_models_and_fills_empty_name() -> None:
    models = '{"object": "list", "data": [{"id": "smol"}, {"id": "other"}]}'
    with ScriptedServer([(200, models)]) as srv:
        client = OpenAIClient(srv.url)
        assert run_sync(client.check()) == ["smol", "other"]
    assert client.model_name == "smol"
    assert srv.requests[0][:2] == ("GET", "/v1/models")


@pytest.mark.fault
def test_check_reports_http_errors() -> None:
    with ScriptedServer([(404, "{}")]) as srv, pytest.raises(LLMError, match="HTTP 404 to GET /models"):
        run_sync(_client(srv.url).check())


def test_same_client_across_event_loops() -> None:
    with ScriptedServer([(200, completion_body("ok"))]) as srv:
        client = _client(srv.url)
        assert run_sync(client.chat(MSG, max_tokens=2)).text == "ok"
        assert asyncio.run(client.chat(MSG, max_tokens=2)).text == "ok"  # a new loop gets new connections


def test_api_key_sent_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAELAB_TEST_KEY", "sk-test")
    cfg = LLMConfig(url="http://127.0.0.1:1/v1", model="m", api_key_env="SAELAB_TEST_KEY")
    client = make_client(cfg)
    assert isinstance(client, OpenAIClient)
    assert client.api_key == "sk-test"


def test_make_client_never_falls_back() -> None:
    with pytest.raises(LLMError, match=r"llm\.url is empty"):
        make_client(LLMConfig(backend="openai"))


def test_gather_with_progress_keeps_order() -> None:
    async def job(i: int) -> int:
        await asyncio.sleep(0.001 * (5 - i))
        return i

    assert asyncio.run(gather_with_progress((job(i) for i in range(5)), desc="t", disable=True)) == [
        0,
        1,
        2,
        3,
        4,
    ]


# ------------------------------------------------------------------------------------------- local, fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def _prompts() -> list[list[dict[str, str]]]:
    shared = "describe the words of the city river year song team star light"
    tails = ["paris", "guitar planet", "seven king war born", "of", "music light star and the a of in was"]
    out = [
        [{"role": "system", "content": "yes or no"}, {"role": "user", "content": f"{shared} {t}"}]
        for t in tails
    ]
    out += [[{"role": "user", "content": f"{shared} {t}"}] for t in ("born", "music music")]  # a second group
    out.append([{"role": "user", "content": "war"}])  # no shared prefix with the rest
    return out


def _reference_logprobs(
    tiny: LoadedModel, client: LocalChatClient, msgs: list[dict[str, str]]
) -> torch.Tensor:
    ids = torch.tensor([client.encode(msgs)])
    with torch.inference_mode():
        return torch.log_softmax(tiny.model(input_ids=ids).logits[0, -1].float(), -1)


def _check_against_reference(tiny: LoadedModel, prompts: list[list[dict[str, str]]], batch_size: int) -> int:
    """Run the prompts concurrently; each answer must equal the prompt's own unbatched forward. Returns the
    number of batches the client ran."""
    client = LocalChatClient(tiny, batch_size=batch_size)

    async def run() -> list:
        return await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=5) for m in prompts))

    for msgs, resp in zip(prompts, asyncio.run(run())):
        ref = _reference_logprobs(tiny, client, msgs)  # the prompt alone: no padding, no shared cache
        values, idx = ref.topk(5)
        expected = {tiny.tokenizer.decode([i]): v for i, v in zip(idx.tolist(), values.tolist())}
        assert resp.top_logprobs is not None
        assert set(resp.top_logprobs) == set(expected)
        for tok, lp in expected.items():
            assert resp.top_logprobs[tok] == pytest.approx(lp, abs=1e-4)
        assert resp.text == tiny.tokenizer.decode([int(ref.argmax())], skip_special_tokens=True)
        assert resp.completion_tokens == 1 and resp.prompt_tokens == len(client.encode(msgs))
    return client.batches_run


@pytest.fixture(params=[2048, 24], ids=["one-forward", "chunked"])
def prefill_tokens(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the default forward size and with one so small that every batch is split into chunks."""
    monkeypatch.setattr(llm_local, "PREFILL_TOKENS", request.param)
    return int(request.param)


def test_local_batched_forward_equals_one_by_one(tiny: LoadedModel, prefill_tokens: int) -> None:
    # eight concurrent requests in three prefix groups of different lengths: one batch
    assert _check_against_reference(tiny, _prompts(), batch_size=8) == 1


def test_local_three_level_prefix_equals_one_by_one(tiny: LoadedModel, prefill_tokens: int) -> None:
    system = {"role": "system", "content": "yes or no " * 6}  # shared by all: run once for the batch
    prompts = [
        [system, {"role": "user", "content": f"{expl} {expl} the city {example}"}]
        for expl in ("paris river", "guitar", "planet star light music", "song")  # shared within a group
        for example in ("a", "of the war", "king born in the year", "seven")
    ]
    assert _check_against_reference(tiny, prompts, batch_size=16) == 1
    assert (
        _check_against_reference(tiny, prompts, batch_size=8) == 2
    )  # the second batch reuses the first's root
    assert _check_against_reference(tiny, prompts, batch_size=5) == 4  # groups are not split across batches


def test_local_batched_generation_equals_generate(tiny: LoadedModel, prefill_tokens: int) -> None:
    prompts = _prompts()
    client = LocalChatClient(tiny, batch_size=8)

    async def run() -> list:
        return await asyncio.gather(*(client.chat(m, max_tokens=6, logprobs=3) for m in prompts))

    responses = asyncio.run(run())
    assert client.batches_run == 1
    assert max(r.completion_tokens for r in responses) == 6  # decoding ran several steps
    for msgs, resp in zip(prompts, responses):
        new = _greedy(tiny, client, msgs, 6)
        assert resp.text == tiny.tokenizer.decode(new, skip_special_tokens=True)
        assert resp.completion_tokens == len(new)
        assert resp.top_logprobs is not None and len(resp.top_logprobs) <= 3


def _greedy(tiny: LoadedModel, client: LocalChatClient, msgs: list[dict[str, str]], n: int) -> list[int]:
    """transformers' own greedy decoding of the prompt alone: up to `n` new ids, up to and including EOS."""
    ids = torch.tensor([client.encode(msgs)])
    with torch.inference_mode():
        out = tiny.model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=3)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(2) + 1] if 2 in new else new


class _Warnings(logging.Handler):
    """Collects the messages of warning records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_local_engine_uses_the_current_cache_api(tiny: LoadedModel, prefill_tokens: int) -> None:
    """No deprecation of the KV-cache API on prefill (shared prefixes, joined caches) and decoding: no
    FutureWarning (an error here, in the engine's worker thread too) and no deprecation line from transformers'
    logger; the answers are still transformers' own greedy continuations and unbatched next-token log-probs."""
    prompts = _prompts()
    client = LocalChatClient(tiny, batch_size=8)
    caught = _Warnings()
    hf_log = logging.getLogger("transformers")
    hf_log.addHandler(caught)
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers logs each line once

    async def run() -> tuple[list, list]:
        judged = await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=5) for m in prompts))
        generated = await asyncio.gather(*(client.chat(m, max_tokens=6) for m in prompts))
        return judged, generated

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            judged, generated = asyncio.run(run())
    finally:
        hf_log.removeHandler(caught)
    assert not [m for m in caught.messages if "deprecated" in m], caught.messages
    assert client.batches_run == 2
    for msgs, one, resp in zip(prompts, judged, generated):
        ref = _reference_logprobs(tiny, client, msgs)
        assert one.top_logprobs is not None
        assert max(one.top_logprobs.values()) == pytest.approx(float(ref.max()), abs=1e-4)
        assert resp.text == tiny.tokenizer.decode(_greedy(tiny, client, msgs, 6), skip_special_tokens=True)


@pytest.mark.bad_input
def test_local_rejects_overlong_prompt(tiny: LoadedModel) -> None:
    client = LocalChatClient(tiny)
    with pytest.raises(LLMError, match="exceeds"):
        asyncio.run(client.chat([{"role": "user", "content": "war " * 600}], max_tokens=1))


def test_make_client_reuses_loaded_model(tiny: LoadedModel) -> None:
    client = make_client(LLMConfig(local_model="tiny-chat", concurrency=2, local_dtype="float32"), tiny)
    assert isinstance(client, LocalChatClient) and client.loaded is tiny
    assert client.model_name == "tiny-chat"


def test_make_client_in_bfloat16_copies_a_float32_model(tiny: LoadedModel) -> None:
    """The loaded float32 model stays as it is (the subject model); the client holds a bfloat16 copy, whose
    answers are cached under another name."""
    client = make_client(LLMConfig(local_model="tiny-chat", concurrency=2, local_dtype="bfloat16"), tiny)
    assert isinstance(client, LocalChatClient) and client.loaded.model is not tiny.model
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert {p.dtype for p in client.loaded.model.parameters()} == {torch.bfloat16}
    assert client.model_name == "tiny-chat (bfloat16)"
    msgs = [{"role": "user", "content": "Is the sky blue?"}]
    resp = asyncio.run(client.chat(msgs, max_tokens=1, logprobs=5))
    assert resp.top_logprobs and all(v <= 0.0 for v in resp.top_logprobs.values())


# ------------------------------------------------------------------------------------------ real, slow


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    return load_model(BUNDLED_SMOLLM2, device="cpu")


@pytest.mark.slow
def test_bundled_model_batched_equals_single(smollm: LoadedModel) -> None:
    client = LocalChatClient(smollm)
    msgs = [
        [
            {"role": "system", "content": "Answer Yes or No."},
            {"role": "user", "content": f"Is {x} a city? Answer."},
        ]
        for x in ("Paris", "London", "a banana", "Tokyo")
    ]

    async def run() -> list:
        return await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=10) for m in msgs))

    together = asyncio.run(run())
    for m, resp in zip(msgs, together):
        ref = _reference_logprobs(smollm, client, m)
        assert resp.top_logprobs is not None
        best = max(resp.top_logprobs, key=lambda t: resp.top_logprobs[t])  # type: ignore[index]
        assert resp.top_logprobs[best] == pytest.approx(float(ref.max()), abs=1e-3)

    async def generate() -> list:
        return await asyncio.gather(*(client.chat(m, max_tokens=8) for m in msgs[:2]))

    for m, resp in zip(msgs[:2], asyncio.run(generate())):
        ids = torch.tensor([client.encode(m)])
        with torch.inference_mode():
            out = smollm.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert resp.text == smollm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_real_http_server_explain_and_detection(smollm: LoadedModel, tmp_path: Path) -> None:
    """OpenAIClient -> a real HTTP server on 127.0.0.1 -> LocalChatClient with the bundled SmolLM2."""
    from llm_server import LocalOpenAIServer

    from saelab.autointerp.explain import run_explain
    from saelab.autointerp.score import run_score

    samples = synthetic_samples(n_latents=2, n_train=4, n_test=2)
    with LocalOpenAIServer(LocalChatClient(smollm)) as srv:
        client = OpenAIClient(srv.url, concurrency=4, timeout_s=120, max_retries=1)
        run_sync(client.check())
        assert client.model_name == smollm.name
        records = run_explain(samples, ExplainConfig(explainers=("default",)), client, tmp_path / "e.jsonl")
        summary = run_score(samples, records, ScoreConfig(scorers=("detection",)), client, tmp_path, seed=0)
    assert [r.model for r in records] == [smollm.name] * 2
    assert all(r.prompt_tokens > 100 and r.completion_tokens > 0 for r in records)
    for row in summary.rows:
        assert row.metrics.n_pos + row.metrics.n_neg + row.metrics.n_failed == 4
        judged = [p for p in row.predictions if p.score is not None]
        assert all(0.0 <= p.score <= 1.0 for p in judged if p.score is not None)
    assert summary.models["judge_llm"] == smollm.name


def test_prefix_groups_follow_explanations() -> None:
    from saelab.autointerp.llm.local import _prefix_groups, _Request

    def req(ids: list[int]) -> _Request:
        return _Request(ids, 1, 0.0, 0, None)  # type: ignore[arg-type]

    template, expl_a, expl_b = [1, 2, 3], [10] * 30, [20] * 25
    rows = [req(template + expl_a + [i, i + 1]) for i in range(5)] + [
        req(template + expl_b + [i]) for i in range(4)
    ]
    groups = _prefix_groups(sorted(rows, key=lambda r: r.ids))
    assert [len(g) for g in groups] == [5, 4]  # one group per explanation, not one group on the template
    assert groups[0][0].ids[:33] == template + expl_a


def test_chunk_bounds_fewest_forwards_then_least_padding() -> None:
    """Every way to cut sorted lengths into runs (brute force) against the dynamic programme: no run over the
    budget unless it is one row, the fewest runs, and among those the fewest padded tokens."""
    import itertools
    import random

    from saelab.autointerp.llm.local import _chunk_bounds

    def cost(bounds: list[tuple[int, int]], lengths: list[int]) -> tuple[int, int]:
        return len(bounds), sum((b - a) * lengths[b - 1] for a, b in bounds)

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 12) for _ in range(rng.randint(1, 9)))
        budget = rng.randint(4, 40)
        n = len(lengths)
        feasible = []
        for k in range(n):
            for cuts in itertools.combinations(range(1, n), k):
                bounds = list(zip((0, *cuts), (*cuts, n)))
                if all(b - a == 1 or (b - a) * lengths[b - 1] <= budget for a, b in bounds):
                    feasible.append(cost(bounds, lengths))
        got = _chunk_bounds(lengths, budget)
        assert [i for a, b in got for i in range(a, b)] == list(range(n))
        assert all(b - a == 1 or (b - a) * lengths[b - 1] <= budget for a, b in got)
        assert cost(got, lengths) == min(feasible)


@pytest.fixture(scope="module")
def tiny_batch_sensitive(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny model whose floats depend on what a batch holds, as the bundled model's do."""
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-128"), hidden=128, heads=2, kv_heads=1)


def test_judge_yes_probability_of_the_engine_equals_each_prompt_alone(
    tiny_batch_sensitive: LoadedModel, prefill_tokens: int
) -> None:
    """Judge prompts as the scorers build them (instructions, then an explanation shared by its examples, then
    one example of varying length): P(yes) from the engine's batched run over cached shared prefixes, cut into
    forwards, equals P(yes) of each prompt run alone to 1e-4, and so does the judgement."""
    from saelab.autointerp.scorers.base import yes_probability

    lm = tiny_batch_sensitive
    words = ["the", "city", "river", "year", "song", "team", "star", "light", "music", "war", "king", "born"]
    explanations = [" ".join(words[i : i + n]) for i, n in ((0, 2), (3, 7), (5, 4))]
    examples = [" ".join(words[(3 * j) % 12 :][: 1 + (5 * j) % 9]) for j in range(9)]
    prompts = [
        [
            {"role": "system", "content": "yes or no " * 4},
            {"role": "user", "content": f"{e} describe {x} words"},
        ]
        for e in explanations
        for x in examples
    ]
    client = LocalChatClient(lm, batch_size=len(prompts))
    vocab = len(lm.tokenizer)

    async def run() -> list:
        return await asyncio.gather(*(client.chat(m, max_tokens=1, logprobs=vocab) for m in prompts))

    responses = asyncio.run(run())
    assert client.batches_run == 1
    assert client.tokens_run < sum(len(client.encode(m)) for m in prompts)  # shared prefixes ran once
    for msgs, resp in zip(prompts, responses):
        ref = _reference_logprobs(lm, client, msgs)
        p_ref = yes_probability({lm.tokenizer.decode([i]): float(v) for i, v in enumerate(ref)})
        assert resp.top_logprobs is not None
        p = yes_probability(resp.top_logprobs)
        assert p is not None and p_ref is not None
        assert p == pytest.approx(p_ref, abs=1e-4)
        assert (p > 0.5) == (p_ref > 0.5)
