"""An on-disk cache of LLM answers, so a killed explain or score run resumes without asking anything twice.

`CachedClient` wraps any `LLMClient`. Each request is keyed by a SHA-256 of (model, messages, max_tokens,
temperature, logprobs); an answer is committed to an SQLite file (WAL journal) before `chat` returns it, so
whatever a run had been answered when it was killed is on disk. Failed requests are not stored: a rerun asks
them again. A cached answer comes back with `cached=True` and the token counts and latency of the call that
produced it, so usage reports count each real call once.

The explain and score stages use `RUN/llm/cache.sqlite` unless `--llm.no-cache`; `hits` and `calls` (real
requests) are written into their manifest records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from saelab.autointerp.llm.base import ChatResponse, LLMClient, LLMError, Messages

SCHEMA_VERSION = 1


def request_key(model: str, messages: Messages, max_tokens: int, temperature: float, logprobs: int) -> str:
    """The cache key of one request: every input that can change the answer."""
    body = {
        "v": SCHEMA_VERSION,
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "logprobs": logprobs,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """Answers by request key in one SQLite file; safe to share between the stages of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, response TEXT NOT NULL)"
            )
        except sqlite3.DatabaseError as err:
            raise LLMError(
                f"{path} is not a readable LLM answer cache ({err}); move it away to start a new one"
            ) from err
        self._lock = threading.Lock()

    def get(self, key: str) -> ChatResponse | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return ChatResponse(**{**json.loads(row[0]), "cached": True})

    def put(self, key: str, response: ChatResponse) -> None:
        data = dataclasses.asdict(response)
        data.pop("cached")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, response) VALUES (?, ?)", (key, json.dumps(data))
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class CachedClient:
    """An `LLMClient` that answers from `cache` when it can and asks `inner` (then stores the answer) otherwise;
    with `cache=None` it only counts. Either way it counts the real calls and their tokens."""

    def __init__(self, inner: LLMClient, cache: ResponseCache | None) -> None:
        self.inner = inner
        self.cache = cache
        self.hits = 0
        """Requests answered from the cache."""
        self.calls = 0
        """Requests sent to the inner client and answered."""
        self.prompt_tokens = 0
        """Prompt tokens of the real calls (as the backend reports them)."""
        self.completion_tokens = 0
        """Completion tokens of the real calls."""

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    async def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        key = request_key(self.model_name, messages, max_tokens, temperature, logprobs)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.hits += 1
            return hit
        response = await self.inner.chat(
            messages, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs
        )
        if self.cache is not None:
            self.cache.put(key, response)
        self.calls += 1
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens
        return response

    async def check(self) -> Any:
        """The inner client's reachability check, when it has one."""
        check = getattr(self.inner, "check", None)
        return await check() if check is not None else None

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
