"""The local backend: `LocalChatClient` runs a transformers chat model in this process (default: the bundled
SmolLM2-135M-Instruct, or the already-loaded subject model).

Concurrent `chat` calls are micro-batched: pending requests are collected and run together in a worker thread.
Tokens shared by several prompts run once (the chat template and instructions common to a batch, then each
explanation's part shared by its examples), prompts are prefilled a few rows at a time (large forwards are slower
per token on a CPU) and then decoded together from their joined KV caches (`transformers.DynamicCache`). A
`max_tokens=1` request (yes/no judging with log-probabilities) needs the prefill only, no generation.
Run the unit tests with `pytest tests/test_llm.py`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from saelab.autointerp.llm.base import ChatResponse, LLMError, Messages, logaddexp
from saelab.config import LLMConfig

if TYPE_CHECKING:
    from saelab.models.loading import LoadedModel

LOCAL_BATCH = 96
"""Requests per micro-batch of the local backend (LLMConfig.concurrency if larger). A decoding step costs about
the same for 1 or 32 rows on a CPU (it reads all the weights once) and shared prefixes run once per batch, so
batches are wide; their prefill is cut into forwards of `PREFILL_TOKENS`."""
MIN_SHARED_PREFIX = 8
"""A batch runs a shared prefix separately only when that saves at least this many tokens."""
PREFILL_TOKENS = 2048
"""Most tokens (rows x padded length) in one forward. On a 2-core CPU larger forwards run slower per token
(SmolLM2-135M, fp32: 4 x 484 tokens ~640 tok/s, 20 x 484 ~380 tok/s), so long prompts are run a few rows at a
time and their KV caches joined for decoding."""


@dataclass
class _Request:
    ids: list[int]
    max_tokens: int
    temperature: float
    logprobs: int
    future: asyncio.Future[ChatResponse]
    t0: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, float]:
        """Requests with equal keys can share a batch (one forward for max_tokens=1)."""
        return (1, self.temperature) if self.max_tokens == 1 else (self.max_tokens, self.temperature)


@dataclass
class _Rows:
    """Token rows already run through the model: their KV cache (one row each), attention mask and lengths."""

    cache: Any
    """A `transformers.DynamicCache` (per layer, keys and values [rows, heads, positions, head_dim]), or None
    before anything has run."""
    mask: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device) -> _Rows:
        """One row holding nothing."""
        zeros = torch.zeros(1, dtype=torch.long, device=device)
        return cls(None, torch.zeros(1, 0, dtype=torch.long, device=device), zeros)

    def select(self, rows: torch.Tensor) -> _Rows:
        """New rows copying `rows` of these (repeats allowed); these stay untouched."""
        cache = None
        if self.cache is not None:
            cache = _new_cache([(layer.keys[rows], layer.values[rows]) for layer in self.cache.layers])
        return _Rows(cache, self.mask[rows], self.length[rows])

    @staticmethod
    def concat(parts: Sequence[_Rows]) -> _Rows:
        """All rows of `parts`, left-padded to the longest (padding masked out)."""
        width = max(p.mask.shape[1] for p in parts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = width - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = zip(*(p.cache.layers for p in parts))
        kv = [
            (torch.cat([pad(x.keys, 2) for x in ls]), torch.cat([pad(x.values, 2) for x in ls]))
            for ls in layers
        ]
        mask = torch.cat([pad(p.mask, 1) for p in parts])
        return _Rows(_new_cache(kv), mask, torch.cat([p.length for p in parts]))


def _new_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A cache holding `kv`, one (keys, values) pair per layer, each [rows, heads, positions, head_dim]."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


class LocalChatClient:
    """A transformers chat model in this process, micro-batching concurrent requests (see module docstring)."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = LOCAL_BATCH) -> None:
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise LLMError(
                f"local model {loaded.name} has no chat template (its tokenizer defines none: a base model?), so "
                "it cannot be given the explainer's and judge's chat prompts; use an instruction-tuned model "
                "(--llm.local-model), add a `chat_template` to its tokenizer_config.json, or serve a chat model and "
                "pass --llm.url"
            )
        self.loaded = loaded
        dtype = next(loaded.model.parameters()).dtype
        self.model_name = (
            loaded.name if dtype == torch.float32 else f"{loaded.name} ({str(dtype).split('.')[-1]})"
        )
        """The model's name, with its float type unless float32: answers of the two are cached apart."""
        self.batch_size = batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelab-llm")
        self._pending: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        tok = loaded.tokenizer
        self._pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        eos = loaded.model.generation_config.eos_token_id
        self._eos_ids = {int(e) for e in ([eos] if isinstance(eos, int) else eos or [])} | {
            int(tok.eos_token_id)
        }
        self._max_len = int(getattr(loaded.model.config, "max_position_embeddings", 1 << 30))
        self.batches_run = 0
        """Batches run so far; tests read it to see that requests were batched."""
        self._last_root: tuple[list[int], _Rows] | None = None
        self.tokens_run = 0
        """Token positions run through the model so far, padding included (a machine-independent cost)."""

    @classmethod
    def from_config(cls, cfg: LLMConfig, loaded: LoadedModel | None = None) -> LocalChatClient:
        """Reuse `loaded` when it is the configured chat model (a copy in `cfg.local_dtype` if it is held in
        another float type), else load `cfg.local_model` in that type."""
        from saelab.models.precision import resolve_float

        if loaded is None or loaded.name != cfg.local_model:
            from saelab.models.loading import load_model, resolve_device

            dtype = resolve_float(cfg.local_dtype, resolve_device("auto"))
            return cls(load_model(cfg.local_model, dtype=dtype), batch_size=max(cfg.concurrency, LOCAL_BATCH))
        dtype = getattr(torch, resolve_float(cfg.local_dtype, loaded.device))
        if next(loaded.model.parameters()).dtype != dtype:
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(dtype))
        return cls(loaded, batch_size=max(cfg.concurrency, LOCAL_BATCH))

    def encode(self, messages: Messages) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant's answer."""
        enc = self.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(i) for i in ids]

    async def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self.encode(messages)
        if len(ids) + max_tokens > self._max_len:
            raise LLMError(
                f"prompt of {len(ids)} tokens + {max_tokens} new exceeds the model's {self._max_len}"
            )
        loop = asyncio.get_running_loop()
        req = _Request(ids, max_tokens, temperature, logprobs, loop.create_future())
        self._pending.append(req)
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = loop.create_task(self._drain())
        return await req.future

    async def _drain(self) -> None:
        """Run pending requests batch by batch until none is left."""
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(0)  # let callers started in the same step enqueue first
            groups = self._next_batch()
            batch = [r for g in groups for r in g]
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, groups)
            except Exception as err:  # a failed batch fails its requests, not the worker
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(
                            LLMError(f"local model failed: {err.__class__.__name__}: {err}")
                        )
                continue
            for r, res in zip(batch, results):
                if not r.future.done():
                    r.future.set_result(res)

    def _next_batch(self) -> list[list[_Request]]:
        """Up to `batch_size` requests of the first request's kind, as groups that share a token prefix.

        Sorting by token ids puts requests with a common prefix (one explanation's examples) side by side.
        """
        key = self._pending[0].key
        same = sorted((r for r in self._pending if r.key == key), key=lambda r: r.ids)
        groups = _prefix_groups(same[: self.batch_size])
        if len(groups) > 1 and len(same) > self.batch_size:
            # A last group that continues past the batch waits whole for the next one.
            last, before, after = groups[-1][0].ids, groups[-2][-1].ids, same[self.batch_size].ids
            if _common_prefix(last, after) > _common_prefix(before, last):
                groups.pop()
        taken = {id(r) for g in groups for r in g}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return groups

    @torch.inference_mode()
    def _run_batch(self, groups: list[list[_Request]]) -> list[ChatResponse]:
        """Prefill every request (shared prefixes once), then decode greedily or by sampling, all rows together;
        a `max_tokens=1` request needs the prefill only."""
        self.batches_run += 1
        batch = [r for g in groups for r in g]
        max_tokens = batch[0].max_tokens
        state, logits_BV = self._prefill(groups, keep=max_tokens > 1)
        first_BV = torch.log_softmax(logits_BV.float(), dim=-1)
        generated = [[self._pick(first_BV[i], r.temperature)] for i, r in enumerate(batch)]
        done = [g[-1] in self._eos_ids for g in generated]
        for _ in range(max_tokens - 1):
            if all(done):
                break
            assert state is not None
            state, logits_BV = self._run(state, [[g[-1]] for g in generated])
            step_BV = torch.log_softmax(logits_BV.float(), dim=-1)
            for i, r in enumerate(batch):
                if not done[i]:
                    generated[i].append(self._pick(step_BV[i], r.temperature))
                    done[i] = generated[i][-1] in self._eos_ids
        return [self._response(r, first_BV[i], generated[i]) for i, r in enumerate(batch)]

    def _prefill(self, groups: list[list[_Request]], keep: bool) -> tuple[_Rows | None, torch.Tensor]:
        """Last-position logits of every request (and, with `keep`, their rows for decoding). Shared tokens run
        once: the prefix common to all groups (chat template, instructions), then each group's own prefix (one
        row per group), then each request's remaining tokens on top of its group's KV cache rows."""
        device = self.loaded.device
        batch = [r for g in groups for r in g]
        shared = [_shared_prefix(g) for g in groups]
        root = min(_common_prefix_all([g[0].ids for g in groups]), min(shared) - 1) if len(groups) > 1 else 0
        state = _Rows.empty(device)
        if root * (len(groups) - 1) >= MIN_SHARED_PREFIX:
            state = self._root(groups[0][0].ids[:root])
        else:
            root = 0
        group_row = torch.zeros(len(groups), dtype=torch.long, device=device)
        starts = [root] * len(groups)
        if sum((len(g) - 1) * (n - root) for g, n in zip(groups, shared)) >= MIN_SHARED_PREFIX:
            parts = [g[0].ids[root:n] for g, n in zip(groups, shared)]
            grouped, _ = self._run_chunked(state, group_row, parts, keep=True)
            assert grouped is not None
            state, group_row, starts = grouped, torch.arange(len(groups), device=device), shared
        rows = torch.cat([group_row[gi].repeat(len(g)) for gi, g in enumerate(groups)])
        row_start = [starts[gi] for gi, g in enumerate(groups) for _ in g]
        return self._run_chunked(state, rows, [r.ids[n:] for r, n in zip(batch, row_start)], keep)

    def _root(self, ids: list[int]) -> _Rows:
        """The rows of a prefix common to a whole batch, kept for the next batch (a scorer's batches all start
        with the same instructions). Callers only `select` from it, so the kept rows stay intact."""
        if self._last_root is None or self._last_root[0] != ids:
            state, _ = self._run(_Rows.empty(self.loaded.device), [ids])
            self._last_root = (ids, state)
        return self._last_root[1]

    def _run_chunked(
        self, state: _Rows, rows: torch.Tensor, seqs: list[list[int]], keep: bool
    ) -> tuple[_Rows | None, torch.Tensor]:
        """`_run` of `seqs[i]` after state row `rows[i]`, in forwards of at most `PREFILL_TOKENS` (padded)
        tokens, similar lengths together (`_chunk_bounds`); `state` is left untouched. Results are in the order of
        `seqs`."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        chunks = [order[a:b] for a, b in _chunk_bounds([len(seqs[i]) for i in order], PREFILL_TOKENS)]
        parts, logits = [], []
        for chunk in chunks:
            part, lg = self._run(state.select(rows[chunk]), [seqs[i] for i in chunk])
            parts.append(part)
            logits.append(lg)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(rows.device)
        merged = _Rows.concat(parts).select(inverse) if keep else None
        return merged, torch.cat(logits)[inverse]

    def _run(self, state: _Rows, seqs: list[list[int]]) -> tuple[_Rows, torch.Tensor]:
        """Run `seqs[i]` after the tokens of state row i, left-padded (the padding sits between the cached and
        the new tokens, masked out). Extends `state`'s cache in place; returns the rows and last logits."""
        ids_BS, new_BS = _left_pad(seqs, self._pad_id, self.loaded.device)
        self.tokens_run += ids_BS.numel()
        mask_BT = torch.cat([state.mask, new_BS], dim=1)
        out = self.loaded.model(
            input_ids=ids_BS,
            attention_mask=mask_BT,
            position_ids=state.length[:, None] + (new_BS.cumsum(-1) - 1).clamp(min=0),
            cache=state.cache,  # transformers 5 renamed `past_key_values` (a FutureWarning, removed in 5.40)
            use_cache=True,
            logits_to_keep=1,
        )
        return _Rows(out.cache, mask_BT, state.length + new_BS.sum(-1)), out.logits[:, -1, :]

    @staticmethod
    def _pick(logprobs_V: torch.Tensor, temperature: float) -> int:
        if temperature > 0:
            return int(torch.multinomial(torch.softmax(logprobs_V / temperature, dim=-1), 1))
        return int(logprobs_V.argmax())

    def _response(self, r: _Request, first_V: torch.Tensor, generated: list[int]) -> ChatResponse:
        tok = self.loaded.tokenizer
        top: dict[str, float] | None = None
        if r.logprobs > 0:
            values, idx = first_V.topk(r.logprobs)
            top = {}
            for v, i in zip(values.tolist(), idx.tolist()):
                s = tok.decode([i])
                top[s] = logaddexp(top.get(s), v)  # two ids can decode to the same string
        return ChatResponse(
            text=tok.decode(generated, skip_special_tokens=True),
            prompt_tokens=len(r.ids),
            completion_tokens=len(generated),
            latency_s=time.perf_counter() - r.t0,
            top_logprobs=top,
            model=self.model_name,
        )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _shared_prefix(group: Sequence[_Request]) -> int:
    """Leading tokens every request of the group shares, leaving each at least one token to run."""
    return max(1, min(_common_prefix_all([r.ids for r in group]), min(len(r.ids) for r in group) - 1))


def _prefix_groups(reqs: Sequence[_Request]) -> list[list[_Request]]:
    """Split requests sorted by ids into runs that each run their shared prefix once, minimising the tokens
    processed. The prefix common to all of them runs once anyway (see `_prefill`), so a run of n requests
    sharing P tokens saves (n - 1) * (P - common). Dynamic programming over the cut points (a run's shared
    prefix is the minimum of its neighbours' common prefixes)."""
    n = len(reqs)
    adjacent = [_common_prefix(reqs[i].ids, reqs[i + 1].ids) for i in range(n - 1)]
    common = min(adjacent, default=0)
    best = [0] * (n + 1)  # best[j]: most tokens saved on the first j requests
    start_of = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start_of[j] = best[j - 1], j - 1  # request j-1 alone
        shared, shortest = 1 << 30, len(reqs[j - 1].ids)
        for i in range(j - 2, -1, -1):  # the run reqs[i:j]
            shared = min(shared, adjacent[i])
            shortest = min(shortest, len(reqs[i].ids))
            saved = best[i] + (j - 1 - i) * (min(shared, shortest - 1) - common)
            if saved > best[j]:
                best[j], start_of[j] = saved, i
    groups: list[list[_Request]] = []
    j = n
    while j > 0:
        groups.append(list(reqs[start_of[j] : j]))
        j = start_of[j]
    return groups[::-1]


def _chunk_bounds(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Cut sorted `lengths` into runs [a, b) of at most `budget` padded tokens each ((b - a) x lengths[b - 1]; a
    longer row runs alone): the fewest forwards, and among those the fewest padded tokens (padding is computed
    like real tokens). Dynamic programming over the cut points."""
    n = len(lengths)
    best: list[tuple[int, int]] = [(0, 0)] + [(n + 1, 0)] * n  # (forwards, padded tokens) of the first j
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            if i < j - 1 and (j - i) * lengths[j - 1] > budget:
                break
            cand = (best[i][0] + 1, best[i][1] + (j - i) * lengths[j - 1])
            if cand < best[j]:
                best[j], cut[j] = cand, i
    bounds = []
    j = n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return bounds[::-1]


def _common_prefix_all(seqs: Sequence[Sequence[int]]) -> int:
    return min(_common_prefix(seqs[0], s) for s in seqs)


def _left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [batch, longest], padded on the left so every row ends at the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
