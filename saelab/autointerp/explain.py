"""Explainers: one short natural-language description per latent, from its explainer (`train`) examples.

- `default`: an LLM reads the top activating examples with the tokens where the latent fires marked `<<like
  this>>` and answers with a short phrase. Every example is one JSON string literal on its own numbered line, so
  text inside an example (quotes, newlines, "ignore the above...") cannot break out of it and change how the
  prompt reads. The raw answer is kept; an answer with no usable phrase is a recorded failure (`ok=false`,
  `explanation=None`), never a placeholder string.
- `contrastive`: the same, plus the latent's explainer-only non-activating examples (`train_neg`, never the
  scoring ones) unmarked, asking what the marked tokens have that those texts lack.
- `token_stats`: a baseline without an LLM: the tokens most over-represented at activating positions relative to
  the non-activating positions of the same examples (add-one smoothed log-ratio), with two short contexts.

`run_explain` runs the configured explainers over a `SampleSet` and writes one JSON line per (latent, explainer):
{"latent", "explainer", "model", "explanation" (str|null), "raw", "ok", "error", "prompt_tokens",
"completion_tokens", "latency_s"}. Run it through `saelab explain --run-dir RUN`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from saelab.autointerp.llm.base import LLMClient, LLMError, gather_with_progress, reject_answer, run_sync
from saelab.autointerp.prompts import (
    CONTRASTIVE_USER,
    COUNTER_LINE,
    EXAMPLE_LINE,
    EXPLAIN_SYSTEM,
    EXPLAIN_USER,
)
from saelab.config import ExplainConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet
from saelab.run import atomic

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- settings

MARK_FRACTION = 0.3
"""Tokens with activation >= this fraction of their example's max are marked for the explainer (Delphi's 0.3)."""
REQUEST_ERROR = "LLMError: "
"""How the `error` of an explanation the LLM never answered begins."""
MAX_EXPLANATION_CHARS = 160
"""Longer answers are cut at a word boundary."""

MAX_LISTED_TOKENS = 8
"""The prompt also lists the most frequent marked tokens: small models describe a list far better than they
find the marks in running text."""
_LABEL_PREFIX = re.compile(r"^\s*(?:explanation|answer|description|feature|phrase)\s*[:\-]\s*", re.IGNORECASE)
_BOILERPLATE = re.compile(
    r"^(?:the\s+)?(?:marked\s+)?(?:tokens|words)\s+(?:all\s+)?(?:share|have)\s+(?:a\s+)?(?:common\s+)?"
    r"(?:thread|theme|trait|feature|pattern|topic)\s+(?:of\s+)?(?:being\s+)?",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'""', "''", "“”", "‘’", "``"}
_LIST_MARKER = re.compile(r"^(?:[-•*>#]+|\d+[.)])\s+")
_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")
_MARKED = re.compile(r"<<(.*?)>>", re.DOTALL)
_EXCERPT = re.compile(r"^Excerpt \d+: (\".*\")$", re.MULTILINE)


def render_tokens(token_strs: Sequence[str], marked: Sequence[bool]) -> str:
    """Text of an example with runs of marked tokens wrapped in `<<...>>`.

    Special tokens such as `<|im_end|>` (document breaks) become newlines: left in, a chat template would read
    them as the end of the user's turn. Literal `<<`/`>>` in the text are spaced out so marks stay unambiguous.
    """
    out: list[str] = []
    in_mark = False
    for tok, mark in zip(token_strs, marked):
        tok = _SPECIAL.sub("\n", tok).replace("<<", "< <").replace(">>", "> >")
        if mark and not in_mark:
            out.append("<<")
        if not mark and in_mark:
            out.append(">>")
        out.append(tok)
        in_mark = mark
    if in_mark:
        out.append(">>")
    return "".join(out)


def quote_example(text: str) -> str:
    """A JSON string literal: quotes, backslashes and newlines are escaped, so the example stays one line."""
    return json.dumps(text, ensure_ascii=False)


def marked_text(ex: Example, fraction: float = MARK_FRACTION) -> str:
    """The example with tokens at >= `fraction` of its max activation marked (nothing marked if it never fires)."""
    top = ex.max_act
    return render_tokens(ex.token_strs, [top > 0 and a >= fraction * top for a in ex.acts])


def _example_lines(le: LatentExamples) -> tuple[str, str]:
    """(numbered example lines, most frequent marked tokens) of `le`'s explainer examples."""
    texts = [marked_text(ex) for ex in le.train]
    lines = [EXAMPLE_LINE.format(i=i + 1, quoted=quote_example(t)) for i, t in enumerate(texts)]
    counts = Counter(m.strip() for t in texts for m in _MARKED.findall(t))
    tokens = ", ".join(quote_example(m) for m, _ in counts.most_common(MAX_LISTED_TOKENS) if m)
    return "\n".join(lines), tokens


def explain_prompt(le: LatentExamples) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of `le` from its `train` examples."""
    examples, tokens = _example_lines(le)
    content = EXPLAIN_USER.format(examples=examples, tokens=tokens)
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": content}]


def contrastive_prompt(le: LatentExamples) -> list[dict[str, str]]:
    """`explain_prompt` plus `le.train_neg`, the non-activating examples set aside for the explainer."""
    if not le.train_neg:
        raise LLMError(
            f"latent {le.latent} has no non-activating explainer examples for the contrastive explainer; "
            "re-run `saelab sample` with --sample.n-non-activating-train > 0"
        )
    examples, tokens = _example_lines(le)
    counter = "\n".join(
        COUNTER_LINE.format(i=i + 1, quoted=quote_example(plain(ex))) for i, ex in enumerate(le.train_neg)
    )
    content = CONTRASTIVE_USER.format(examples=examples, tokens=tokens, counter_examples=counter)
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": content}]


def plain(ex: Example) -> str:
    """The example's text with nothing marked (special tokens neutralised as in `render_tokens`)."""
    return render_tokens(ex.token_strs, [False] * len(ex.token_strs))


def prompt_examples(prompt: str) -> list[str]:
    """The example texts of a prompt built by `explain_prompt`, read back (used by tests and the test client)."""
    return [json.loads(q) for q in _EXCERPT.findall(prompt)]


def parse_explanation(raw: str) -> str | None:
    """A short explanation from a model's answer, or None when it holds none.

    First non-empty line; list markers, emphasis, an "Explanation:"-style label, the stock opening "the marked
    tokens share a common theme of" and quotes around the whole line are removed; cut at `MAX_EXPLANATION_CHARS`
    on a word boundary. A line with no letter or digit is no explanation.
    """
    for line in raw.splitlines():
        text = _LIST_MARKER.sub("", line.strip()).replace("**", "").replace("__", "").strip("*_` ")
        text = _BOILERPLATE.sub("", _LABEL_PREFIX.sub("", text)).strip()
        if len(text) >= 2 and text[0] + text[-1] in _QUOTE_PAIRS and text[0] not in text[1:-1]:
            text = text[1:-1].strip()
        if not text:
            continue
        if not any(ch.isalnum() for ch in text):
            return None
        if len(text) > MAX_EXPLANATION_CHARS:
            text = text[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0].rstrip(",;:")
        return text
    return None


# ---------------------------------------------------------------------------------------------- explainers


@dataclass(frozen=True)
class ExplanationRecord:
    """One explainer's explanation of one latent (one JSON line of explanations.jsonl)."""

    latent: int
    explainer: str
    model: str
    """The LLM's name for LLM explainers; "none" for token_stats."""
    explanation: str | None
    """None when the explainer failed (then `ok` is false and `error` says why)."""
    raw: str
    """The model's answer as returned (token_stats: the explanation itself)."""
    ok: bool
    error: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0

    @property
    def request_failed(self) -> bool:
        """The LLM gave no answer (a request error), as opposed to an answer with no usable explanation; a rerun
        asks both again."""
        return not self.ok and (self.error or "").startswith(REQUEST_ERROR)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExplanationRecord:
        return cls(**d)


class Explainer(Protocol):
    name: str
    model: str

    async def explain(self, le: LatentExamples) -> ExplanationRecord: ...


class DefaultExplainer:
    """The LLM explainer (see module docstring)."""

    name = "default"
    prompt = staticmethod(explain_prompt)

    def __init__(self, client: LLMClient, max_new_tokens: int = 40, temperature: float = 0.0) -> None:
        self.client = client
        self.model = client.model_name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    async def explain(self, le: LatentExamples) -> ExplanationRecord:
        try:
            resp = await self.client.chat(
                self.prompt(le), max_tokens=self.max_new_tokens, temperature=self.temperature
            )
        except LLMError as err:
            return ExplanationRecord(
                le.latent, self.name, self.model, None, "", False, f"{REQUEST_ERROR}{err}"
            )
        explanation = parse_explanation(resp.text)
        error = None if explanation else f"no explanation in the answer {resp.text[:80]!r}"
        if explanation is None:
            reject_answer(self.client, resp)  # not reused from the answer cache: a rerun asks again
        return ExplanationRecord(
            le.latent,
            self.name,
            resp.model or self.model,
            explanation,
            resp.text,
            explanation is not None,
            error,
            resp.prompt_tokens,
            resp.completion_tokens,
            resp.latency_s,
        )


class ContrastiveExplainer(DefaultExplainer):
    """The LLM explainer shown non-activating examples too (see module docstring)."""

    name = "contrastive"
    prompt = staticmethod(contrastive_prompt)


class TokenStatsExplainer:
    """The no-LLM baseline (see module docstring). Deterministic."""

    name = "token_stats"
    model = "none"

    def __init__(self, top_k: int = 3, n_contexts: int = 2, context_tokens: int = 3) -> None:
        self.top_k = top_k
        self.n_contexts = n_contexts
        self.context_tokens = context_tokens

    async def explain(self, le: LatentExamples) -> ExplanationRecord:
        text = self.describe(le)
        if text is None:
            return ExplanationRecord(
                le.latent, self.name, self.model, None, "", False, "no activating tokens"
            )
        return ExplanationRecord(le.latent, self.name, self.model, text, text, True, None)

    def describe(self, le: LatentExamples) -> str | None:
        tokens = over_represented_tokens(le.train, self.top_k)
        if not tokens:
            return None
        contexts = [self._context(ex) for ex in le.train[: self.n_contexts]]
        return f"tokens: {', '.join(quote_example(t) for t in tokens)} (contexts: {'; '.join(contexts)})"

    def _context(self, ex: Example) -> str:
        peak = max(range(len(ex.acts)), key=lambda i: ex.acts[i])
        lo = max(0, peak - self.context_tokens)
        marks = [i == peak for i in range(lo, peak + 1)]
        return quote_example(render_tokens(ex.token_strs[lo : peak + 1], marks).replace("\n", " "))


def over_represented_tokens(examples: Sequence[Example], top_k: int) -> list[str]:
    """Tokens ranked by the add-one smoothed log-ratio of their frequency at activating positions to that at
    non-activating positions of the same examples; ties broken by activating count, then the token."""
    act: Counter[str] = Counter()
    rest: Counter[str] = Counter()
    for ex in examples:
        for tok, a in zip(ex.token_strs, ex.acts):
            (act if a > 0 else rest)[tok] += 1
    if not act:
        return []
    vocab = len(act.keys() | rest.keys())
    n_act, n_rest = sum(act.values()), sum(rest.values())

    def log_ratio(tok: str) -> float:
        return math.log((act[tok] + 1) / (n_act + vocab)) - math.log((rest[tok] + 1) / (n_rest + vocab))

    ranked = sorted(act, key=lambda t: (-log_ratio(t), -act[t], t))
    return ranked[:top_k]


EXPLAINERS: dict[str, Callable[[ExplainConfig, LLMClient | None, float], Explainer]] = {
    "default": lambda cfg, client, temp: DefaultExplainer(_need(client, "default"), cfg.max_new_tokens, temp),
    "contrastive": lambda cfg, client, temp: ContrastiveExplainer(
        _need(client, "contrastive"), cfg.max_new_tokens, temp
    ),
    "token_stats": lambda cfg, client, temp: TokenStatsExplainer(),
}


def _need(client: LLMClient | None, name: str) -> LLMClient:
    if client is None:
        raise LLMError(f"the `{name}` explainer needs an LLM client; configure --llm or use token_stats only")
    return client


# ------------------------------------------------------------------------------------------------- running


async def explain_async(
    samples: SampleSet, cfg: ExplainConfig, client: LLMClient | None, temperature: float = 0.0
) -> list[ExplanationRecord]:
    """Explanations of every latent by every configured explainer, ordered by explainer then latent."""
    if "contrastive" in cfg.explainers and (
        bare := [le.latent for le in samples.latents if not le.train_neg]
    ):
        raise LLMError(
            f"the contrastive explainer needs non-activating explainer examples, and latents {bare[:5]} have "
            "none; re-run `saelab sample` with --sample.n-non-activating-train > 0"
        )
    records: list[ExplanationRecord] = []
    for name in cfg.explainers:
        explainer = EXPLAINERS[name](cfg, client, temperature)
        records += await gather_with_progress(
            (explainer.explain(le) for le in samples.latents), desc=f"explain ({name})"
        )
    return records


def run_explain(
    samples: SampleSet,
    cfg: ExplainConfig,
    client: LLMClient | None,
    out_path: Path,
    temperature: float = 0.0,
) -> list[ExplanationRecord]:
    """Run the explainers and write `out_path` (JSONL, see module docstring)."""
    records = run_sync(explain_async(samples, cfg, client, temperature), client)
    write_explanations(records, out_path)
    requests = sum(r.request_failed for r in records)
    if requests:
        log.warning(
            "%d of %d explanations got no answer from the LLM (request errors, recorded with ok=false); running "
            "the stage again asks only these and any unusable answers again (the usable answers are cached)",
            requests,
            len(records),
        )
    unparseable = sum(not r.ok and not r.request_failed and r.model != "none" for r in records)
    if unparseable:
        log.warning(
            "%d of %d explanations failed: the answer held no usable explanation (recorded with ok=false and "
            "the raw answer); such answers are not reused from the LLM answer cache, so running the stage "
            "again asks for these again",
            unparseable,
            len(records),
        )
    if no_llm := sum(not r.ok and r.model == "none" for r in records):
        log.warning(
            "%d of %d explanations by explainers without an LLM failed (recorded with ok=false and the reason)",
            no_llm,
            len(records),
        )
    return records


def write_explanations(records: Sequence[ExplanationRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(r.to_json() + "\n" for r in records))


def load_explanations(path: Path) -> list[ExplanationRecord]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `saelab explain` first")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ExplanationRecord.from_dict(json.loads(line)) for line in lines if line.strip()]


EXPLANATIONS = "explain/explanations.jsonl"
"""The run's explanations, relative to the run folder."""


def load_run_explanations(run_folder: Path) -> list[ExplanationRecord]:
    """The run's explanations (empty when the explain stage has not run)."""
    path = run_folder / EXPLANATIONS
    return load_explanations(path) if path.exists() else []
