"""An on-disk cache of LLM answers, so a killed explain or score run resumes without asking anything twice.

`CachedClient` wraps any `LLMClient`. Each request is keyed by a SHA-256 of (model, messages, max_tokens,
temperature, logprobs); an answer is committed to an SQLite file (WAL journal) before `chat` returns it, so
whatever a run had been answered when it was killed is on disk. The answers that arrive together (one batch of the
local engine) are committed in one transaction, so a kill leaves whole batches: the rerun's new requests then form
the batches they had in an uninterrupted run, and the local engine, whose floats depend on what a batch holds,
gives them the same answers bit for bit.

Failed requests are not stored, and an answer with nothing usable in it is not answered from the cache again: an
empty one (no text, no log-probabilities) never is, and an explainer or scorer that finds no explanation or
judgement in an answer says so with `base.reject_answer`. A rerun asks those again (a server fixed since gives
its new answer), after the requests the cache never held, so that these still form their uninterrupted batches.
A cached answer comes back with `cached=True` and the token counts and latency of the call that produced it, so
usage reports count each real call once.

The explain and score stages use `RUN/llm/cache.sqlite` unless `--llm.no-cache`; `hits` and `calls` (real
requests) are written into their manifest records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


_Commit = tuple[asyncio.AbstractEventLoop, list[tuple[str, ChatResponse]], "asyncio.Future[None]"]
"""An event loop's answers to commit in one transaction, and the future their callers await."""


class Stored(NamedTuple):
    """What the cache holds for a request."""

    response: ChatResponse
    rejected: bool
    """The answer was found unusable (`ResponseCache.reject`, or empty): ask again rather than reuse it."""


def is_empty(response: ChatResponse) -> bool:
    """No text and no log-probabilities: an answer no explainer or scorer can use."""
    return not response.text.strip() and not response.top_logprobs


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
            self._db.execute("CREATE TABLE IF NOT EXISTS rejected (key TEXT PRIMARY KEY)")
        except sqlite3.DatabaseError as err:
            raise LLMError(
                f"{path} is not a readable LLM answer cache ({err}); move it away to start a new one"
            ) from err
        self._lock = threading.Lock()

    def get(self, key: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, EXISTS (SELECT 1 FROM rejected WHERE rejected.key = answers.key) "
                "FROM answers WHERE key = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        response = ChatResponse(**{**json.loads(row[0]), "cached": True, "cache_key": key})
        return Stored(response, bool(row[1]) or is_empty(response))

    def put(self, key: str, response: ChatResponse) -> None:
        self.put_many([(key, response)])

    def put_many(self, items: Sequence[tuple[str, ChatResponse]]) -> None:
        """Store answers in one transaction (all or none survive a kill); a new answer clears its key's
        rejection."""
        rows = []
        for key, response in items:
            data = dataclasses.asdict(response)
            data.pop("cached")
            data.pop("cache_key")
            rows.append((key, json.dumps(data)))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO answers (key, response) VALUES (?, ?)", rows)
                self._db.executemany("DELETE FROM rejected WHERE key = ?", [(k,) for k, _ in rows])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def reject(self, key: str) -> None:
        """Mark the answer of `key` unusable: `get` still returns it, flagged, and a caching client asks again."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO rejected (key) VALUES (?)", (key,))

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
        """Requests sent to the inner client and answered (unusable answers asked again included)."""
        self.prompt_tokens = 0
        """Prompt tokens of the real calls (as the backend reports them)."""
        self.completion_tokens = 0
        """Completion tokens of the real calls."""
        self._new_in_flight = 0
        """Requests the cache has no answer for, sent to `inner` and not answered yet."""
        self._quiet: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._batch: _Commit | None = None
        """The answers waiting for the next transaction."""

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    async def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        key = request_key(self.model_name, messages, max_tokens, temperature, logprobs)
        stored = self.cache.get(key) if self.cache is not None else None
        if stored is not None and not stored.rejected:
            self.hits += 1
            return stored.response
        if stored is not None:
            await self._after_new_requests()
        else:
            self._new_in_flight += 1
            self._quiet_event().clear()
        try:
            response = await self.inner.chat(
                messages, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs
            )
        finally:
            if stored is None:
                self._new_in_flight -= 1
                if not self._new_in_flight:
                    self._quiet_event().set()
        self.calls += 1
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens
        if self.cache is None:
            return response
        response = dataclasses.replace(response, cache_key=key)
        await self._store(key, response)
        return response

    def reject(self, response: ChatResponse) -> None:
        """`response` holds nothing usable: a later run asks its request again (see `base.reject_answer`)."""
        if self.cache is not None and response.cache_key is not None:
            self.cache.reject(response.cache_key)

    def _quiet_event(self) -> asyncio.Event:
        """Set while no request new to the cache is in flight (one event per event loop)."""
        loop = asyncio.get_running_loop()
        if self._quiet is None or self._quiet[0] is not loop:
            self._quiet = (loop, asyncio.Event())
            if not self._new_in_flight:
                self._quiet[1].set()
        return self._quiet[1]

    async def _after_new_requests(self) -> None:
        """Wait until the requests the cache never held have been answered. The requests of one stage arrive
        within a step or two of the event loop: those steps pass first, so the new ones are all counted."""
        for _ in range(2):
            await asyncio.sleep(0)
        while self._new_in_flight:
            await self._quiet_event().wait()

    async def _store(self, key: str, response: ChatResponse) -> None:
        """Commit the answer, in one transaction with those that arrive in the same step of the event loop (a
        batch of the local engine resolves all its requests in one step); returns once it is on disk."""
        loop = asyncio.get_running_loop()
        if self._batch is None or self._batch[0] is not loop:
            self._batch = (loop, [], loop.create_future())
            loop.call_soon(self._commit)
        _, items, done = self._batch
        items.append((key, response))
        await asyncio.shield(done)

    def _commit(self) -> None:
        assert self._batch is not None and self.cache is not None
        _, items, done = self._batch
        self._batch = None
        try:
            self.cache.put_many(items)  # an empty answer is stored too: `get` flags it, so a rerun asks again
        except Exception as err:
            done.set_exception(err)
        else:
            done.set_result(None)

    async def check(self) -> Any:
        """The inner client's reachability check, when it has one."""
        check = getattr(self.inner, "check", None)
        return await check() if check is not None else None

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
