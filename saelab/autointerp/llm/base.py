"""What explainers and scorers need from an LLM, and the helpers every backend shares.

`LLMClient` is one small async interface (`chat`); `ChatResponse` is its answer and `LLMError` its one failure.
The backends are `saelab.autointerp.llm.openai.OpenAIClient` (any OpenAI-compatible server) and
`saelab.autointerp.llm.local.LocalChatClient` (a transformers chat model in this process); `make_client` in
`saelab.autointerp.llm` picks the configured one. This module imports neither httpx nor torch.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Messages = list[dict[str, str]]


class LLMError(RuntimeError):
    """A request to the LLM failed for good (after retries); the message says what happened and how to fix it."""


@dataclass(frozen=True)
class ChatResponse:
    """One chat completion."""

    text: str
    """The generated text (special tokens removed)."""
    prompt_tokens: int
    """Tokens in the prompt (as reported by the server; 0 when it reports no usage)."""
    completion_tokens: int
    """Generated tokens."""
    latency_s: float
    """Wall time from the call to the answer, queueing and retries included."""
    top_logprobs: dict[str, float] | None
    """The first generated token's most likely alternatives (token string -> log-probability), when asked for
    with `logprobs > 0` and the backend provides them; else None."""
    model: str
    """Name of the model that answered."""
    cached: bool = False
    """Read from a run's answer cache (`saelab.autointerp.llm.cache`) instead of asked again; the token counts and latency
    are those of the call that produced it."""
    cache_key: str | None = None
    """The key the answer cache holds this answer under (set by `CachedClient`; None from other clients), so that
    `reject_answer` can find it."""


class LLMClient(Protocol):
    """What explainers and scorers need from an LLM."""

    @property
    def model_name(self) -> str:
        """The model the requests name (a cache key and a provenance field)."""
        ...

    async def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        """Answer a chat; `logprobs > 0` asks for that many top alternatives of the first generated token."""
        ...


def reject_answer(client: LLMClient, response: ChatResponse) -> None:
    """Say that `response` holds nothing usable (no explanation, no judgement): a client that caches answers
    (`saelab.autointerp.llm.cache.CachedClient`) then asks again on a later run instead of answering from its
    cache. Other clients keep nothing, so for them it does nothing."""
    reject = getattr(client, "reject", None)
    if reject is not None:
        reject(response)


def logaddexp(a: float | None, b: float) -> float:
    """log(exp(a) + exp(b)); `b` alone when `a` is None (merging the log-probabilities of equal token strings)."""
    return b if a is None else float(max(a, b) + math.log1p(math.exp(-abs(a - b))))


async def gather_with_progress(
    aws: Iterable[Awaitable[T]], desc: str, disable: bool | None = None
) -> list[T]:
    """Run awaitables concurrently with a tqdm bar (hidden when stderr is not a terminal); results in order."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    with tqdm(total=len(tasks), desc=desc, disable=disable, leave=False) as bar:
        for t in tasks:
            t.add_done_callback(lambda _t: bar.update(1))
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished tasks; stops the rest when one raised


def run_sync(coro: Coroutine[Any, Any, T], client: object | None = None) -> T:
    """`asyncio.run(coro)`, closing the client's connections of that loop afterwards."""

    async def main() -> T:
        try:
            return await coro
        finally:
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()

    return asyncio.run(main())
