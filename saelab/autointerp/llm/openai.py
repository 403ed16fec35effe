"""The HTTP backend: `OpenAIClient` talks to any OpenAI-compatible server (vLLM, llama.cpp `llama-server`,
Ollama, OpenRouter) over httpx.

A semaphore bounds requests in flight; connection errors, timeouts, HTTP 429 and 5xx and malformed bodies are
retried with exponential backoff, then raise `LLMError`. `timeout_s` bounds each attempt as a whole (connecting,
sending, the headers and the whole body) as well as each read: a server that sends its answer or its headers a
byte at a time fails the attempt after `timeout_s`, as one that sends nothing does. `check()` asks `GET /models`
once before any work so a wrong URL fails in one line instead of hundreds of retries. Nothing falls back to
another backend: a configured server that cannot be reached is an error. Run the unit tests with
`pytest tests/test_llm.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import httpx

from saelab.autointerp.llm.base import ChatResponse, LLMError, Messages, logaddexp
from saelab.config import LLMConfig

log = logging.getLogger(__name__)


class OpenAIClient:
    """Client of an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        url: str,
        model: str = "",
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model_name = model
        """Model name sent to the server; `check()` fills it from `/models` when empty."""
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # httpx clients and asyncio semaphores belong to one event loop; keep one pair per loop so the same
        # client works across `asyncio.run` calls (check, then explain, then score).
        self._session: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore] | None = None

    @classmethod
    def from_config(cls, cfg: LLMConfig) -> OpenAIClient:
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return cls(
            cfg.url,
            cfg.model,
            api_key=key or None,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )

    def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session[0] is not loop:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=self.concurrency),
            )
            self._session = (loop, client, asyncio.Semaphore(self.concurrency))
        return self._session[1], self._session[2]

    async def aclose(self) -> None:
        """Close this event loop's connections (a later call opens new ones)."""
        if self._session is not None and self._session[0] is asyncio.get_running_loop():
            await self._session[1].aclose()
        self._session = None

    async def check(self) -> list[str]:
        """`GET {url}/models` once; raise a one-line `LLMError` when the server cannot be used. Returns the
        served model ids and, when no model name was configured, uses the first."""
        http, _ = self._http()
        where = f"the LLM server at {self.url}"
        try:
            r = await asyncio.wait_for(http.get(f"{self.url}/models"), self.timeout_s)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise LLMError(
                f"cannot reach {where} (timed out after {self.timeout_s:g} s); start it or fix --llm.url"
            ) from None
        except httpx.TransportError as err:
            raise LLMError(f"cannot reach {where} ({_reason(err)}); start it or fix --llm.url") from None
        if r.status_code in (401, 403):
            raise LLMError(
                f"{where} refused the API key (HTTP {r.status_code}); set the variable named by --llm.api-key-env"
            )
        if r.status_code != 200:
            raise LLMError(
                f"{where} answered HTTP {r.status_code} to GET /models; is --llm.url the API base (…/v1)?"
            )
        try:
            ids = [str(m["id"]) for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError) as err:
            raise LLMError(f"{where} sent a malformed /models answer ({err!r}): {r.text[:200]!r}") from None
        if not self.model_name:
            if not ids:
                raise LLMError(f"{where} serves no models; pass --llm.model")
            self.model_name = ids[0]
        elif ids and self.model_name not in ids:
            log.warning(
                "model %r is not among the served models %s; the server may reject it", self.model_name, ids
            )
        return ids

    async def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs > 0:
            body.update(logprobs=True, top_logprobs=min(logprobs, 20))
        t0 = time.perf_counter()
        data = await self._post(body)
        text, usage, top, model = _parse_completion(data, logprobs > 0)
        return ChatResponse(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=time.perf_counter() - t0,
            top_logprobs=top,
            model=model or self.model_name,
        )

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; returns the decoded JSON of a well-formed answer."""
        http, sem = self._http()
        endpoint = f"{self.url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with sem:  # the deadline starts once the request may go out, not while it queues
                    r = await asyncio.wait_for(http.post(endpoint, json=body), self.timeout_s)
            except (httpx.TimeoutException, asyncio.TimeoutError):
                problem = (
                    f"timed out after {self.timeout_s:g} s (the whole answer is due within --llm.timeout-s)"
                )
                continue
            except httpx.TransportError as err:
                problem = f"connection error ({_reason(err)})"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"HTTP {r.status_code}: {r.text[:200]!r}"
                continue
            if r.status_code >= 400:  # a request the server will never accept: retrying cannot help
                raise LLMError(f"POST {endpoint} answered HTTP {r.status_code}: {r.text[:300]!r}")
            try:
                data = r.json()
                _parse_completion(data, "logprobs" in body)
                return data
            except (ValueError, KeyError, TypeError, IndexError) as err:
                problem = f"malformed answer ({err.__class__.__name__}: {err}): {r.text[:200]!r}"
        raise LLMError(f"POST {endpoint} failed after {self.max_retries + 1} attempts: {problem}")


def _parse_completion(
    data: Any, want_logprobs: bool
) -> tuple[str, dict[str, Any], dict[str, float] | None, str | None]:
    """(text, usage, first-token top logprobs, model) of a chat completion body; raises on a malformed one."""
    choice = data["choices"][0]
    content = choice["message"]["content"]
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise TypeError(f"message.content is {type(content).__name__}, not a string")
    usage = data.get("usage") or {}
    top: dict[str, float] | None = None
    if want_logprobs and (lp := choice.get("logprobs")) and lp.get("content"):
        top = {}
        for alt in lp["content"][0]["top_logprobs"]:
            top[str(alt["token"])] = logaddexp(top.get(str(alt["token"])), float(alt["logprob"]))
    return content, usage, top, data.get("model")


def _reason(err: BaseException) -> str:
    """A short cause of a transport error (httpx wraps the OS error several levels deep)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        cause = cause.__cause__ or cause.__context__
    return str(err) or err.__class__.__name__
