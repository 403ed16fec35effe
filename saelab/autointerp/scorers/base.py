"""What every scorer shares: the `Scorer` interface, its output (`Prediction`s), the examples it scores, and the
yes/no judge that the detection and fuzzing scorers put to the LLM.

A scorer uses an explanation as a binary classifier of its latent's held-out examples. Labels: `test_pos`
examples (the latent fires) are 1, `test_neg` examples (it never fires) are 0; explainer (`train`) examples are
never scored (`scoring_examples`).

Judges are asked for one token with its top log-probabilities (one forward on the local backend, no generation):
P(yes) = p(yes-like tokens) / (p(yes-like) + p(no-like)), predicted 1 when > 0.5, and the AUC is computed from it.
A backend without log-probabilities is read from the answer's text (no AUC then). An answer that is neither yes
nor no, or a failed request, is a failed judgement: excluded from the metrics and counted (`n_failed`), and asked
again by a rerun (`reject_answer`). Prompts
put the instructions, then the explanation, then the example, so the local backend runs the shared parts once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from saelab.autointerp.explain import quote_example, render_tokens
from saelab.autointerp.llm.base import LLMClient, LLMError, reject_answer
from saelab.autointerp.prompts import DETECTION_USER, JUDGE_SYSTEM
from saelab.config import ScoreConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20
"""Alternatives asked for the judge's first token (OpenAI's maximum)."""

Failure = Literal["request", "unparseable"]


@dataclass(frozen=True)
class Prediction:
    """One scored example."""

    example_id: str
    label: int
    pred: int | None
    """Predicted label; None for a failed judgement."""
    score: float | None
    """P(yes) (LLM judges) or cosine similarity (embedding); None when unavailable."""
    quantile: int = -1
    """Activation quantile of a positive example (0 = lowest, see `Example.quantile`); -1 for negatives."""
    failure: Failure | None = None
    """Why the judgement failed: `request` (no answer from the LLM) or `unparseable` (an answer that is not a
    judgement; not reused from the answer cache). A rerun asks both again."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prediction:
        return cls(**d)


@dataclass(frozen=True)
class ScorerOutput:
    """What a scorer returns for one (latent, explanation)."""

    predictions: list[Prediction]
    """One per scoring example, in the order of `scoring_examples`."""
    threshold: float | None = None
    """Decision threshold on the score (embedding scorer)."""
    extra: dict[str, float | None] = field(default_factory=dict)
    """Scorer-specific per-latent scores (simulation: `correlation`); each is averaged over latents in the
    summary and compared between explainers when it is one of `results.COMPARED_METRICS`."""


class Scorer(Protocol):
    name: str
    """The name it is registered under (`saelab.autointerp.scorers.SCORERS`); the `scorer` of its rows."""

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput: ...


ScorerFactory = Callable[[ScoreConfig, LLMClient | None, SampleSet, int], Scorer]
"""Builds a scorer from the score config, the judge LLM (None when no configured scorer needs one), the sample
set being scored and the run's seed."""


def scoring_examples(le: LatentExamples) -> list[tuple[Example, int]]:
    """(example, label) of the latent's held-out examples: the activating ones (1), then the others (0)."""
    return [(ex, 1) for ex in le.test_pos] + [(ex, 0) for ex in le.test_neg]


def quantiles_of(le: LatentExamples) -> dict[str, int]:
    """Activation quantile by example id of the latent's positive scoring examples."""
    return {ex.example_id: ex.quantile for ex in le.test_pos}


def plain_text(ex: Example) -> str:
    return render_tokens(ex.token_strs, [False] * len(ex.token_strs))


def require_llm(client: LLMClient | None, name: str) -> LLMClient:
    """`client`, or the error of the `name` scorer configured without an LLM."""
    if client is None:
        raise LLMError(f"the {name} scorer needs an LLM client; configure --llm or use the embedding scorer")
    return client


# --------------------------------------------------------------------------------------------- the judge


def judge_messages(template: str, explanation: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": template.format(explanation=explanation, quoted=quote_example(text))},
    ]


def _word(token: str) -> str:
    return token.strip().strip(".,!:;\"'*").lower()


def yes_probability(top_logprobs: dict[str, float]) -> float | None:
    """P(yes) / (P(yes) + P(no)) summed over case and space variants; None when neither is among the tokens."""
    p_yes = sum(math.exp(lp) for tok, lp in top_logprobs.items() if _word(tok) == "yes")
    p_no = sum(math.exp(lp) for tok, lp in top_logprobs.items() if _word(tok) == "no")
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None


def parse_yes_no(text: str) -> int | None:
    """1 for an answer starting with yes, 0 for no, None otherwise."""
    words = text.split()
    first = _word(words[0]) if words else ""
    return {"yes": 1, "no": 0}.get(first)


class JudgeScorer:
    """Asks the judge LLM one Yes/No question per example (shared by detection and fuzzing): `template` is the
    question, `texts` what the judge is shown of each example."""

    name = "judge"
    template = DETECTION_USER

    def __init__(self, client: LLMClient) -> None:
        self.client = client

    def texts(self, le: LatentExamples) -> list[tuple[str, str, int]]:
        """(example_id, text shown to the judge, label) per scoring example."""
        return [(ex.example_id, plain_text(ex), label) for ex, label in scoring_examples(le)]

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        items = self.texts(le)
        judged = await asyncio.gather(*(self.judge(explanation, text) for _, text, _ in items))
        q = quantiles_of(le)
        return ScorerOutput(
            [
                Prediction(eid, label, p, s, q.get(eid, -1), failure)
                for (eid, _, label), (p, s, failure) in zip(items, judged)
            ]
        )

    async def judge(self, explanation: str, text: str) -> tuple[int | None, float | None, Failure | None]:
        """(prediction, P(yes), None), or (None, None, why) for a failed judgement."""
        try:
            resp = await self.client.chat(
                judge_messages(self.template, explanation, text), max_tokens=1, logprobs=TOP_LOGPROBS
            )
        except LLMError as err:
            log.debug("judgement failed: %s", err)
            return None, None, "request"
        if resp.top_logprobs is not None:
            p = yes_probability(resp.top_logprobs)
            pred = None if p is None else int(p > 0.5)
        else:
            p, pred = None, parse_yes_no(resp.text)
        if pred is None:
            reject_answer(self.client, resp)  # a rerun asks again
            return None, None, "unparseable"
        return pred, p, None
