"""The `simulation` scorer (Bills et al. 2023, "Language models can explain neurons in language models"): from the
explanation alone, the LLM predicts the latent's activation on every token of each scoring example; the score is
the correlation of predicted and true activations over all tokens of the latent's scoring examples (positives
from every activation quantile and the non-activating examples, as OpenAI's "all at once" correlation score).

The original reads the simulator's expected value from per-position log-probabilities of a completion prompt, which
chat endpoints do not expose. Here the judge sees the example's tokens numbered one per line and answers with
`index: value` lines (0-10) for the tokens that match, or `none`; unlisted tokens are 0. An answer with neither is
a failed judgement, counted and left out, never read as all zeros.

Each example is also a binary prediction (predicted activating when any token gets >= 1) with the largest
predicted value / 10 as its score, so the usual classification metrics and AUC come out beside the correlation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence

import numpy as np

from saelab.autointerp.llm.base import LLMClient, LLMError, reject_answer
from saelab.autointerp.prompts import SIMULATION_SYSTEM, SIMULATION_USER
from saelab.autointerp.scorers.base import (
    Failure,
    Prediction,
    ScorerOutput,
    quantiles_of,
    require_llm,
    scoring_examples,
)
from saelab.config import ScoreConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet

log = logging.getLogger(__name__)

MAX_VALUE = 10
_LINE = re.compile(r"^\s*(?:token\s*)?#?(\d+)\s*[:=\-]\s*(\d+(?:\.\d+)?)", re.IGNORECASE | re.MULTILINE)
_NONE = re.compile(r"^\W*none\W*$", re.IGNORECASE)


def simulation_messages(explanation: str, ex: Example) -> list[dict[str, str]]:
    """Chat messages asking for per-token activations of `ex`; each token is a JSON string on its own line."""
    lines = "\n".join(f"{i + 1} {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(ex.token_strs))
    user = SIMULATION_USER.format(explanation=explanation, tokens=lines, max_value=MAX_VALUE)
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": user}]


def parse_simulation(text: str, n_tokens: int) -> np.ndarray | None:
    """Predicted activation per token (clipped to [0, MAX_VALUE]) from an answer, or None when it has no
    `index: value` line and is not `none`. Indices outside 1..n_tokens are ignored."""
    pred = np.zeros(n_tokens, dtype=np.float64)
    found = False
    for idx, value in _LINE.findall(text):
        i = int(idx) - 1
        if 0 <= i < n_tokens:
            pred[i] = min(float(value), MAX_VALUE)
            found = True
    if found or _NONE.match(text.strip()):
        return pred
    return None


def correlation(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> float | None:
    """Pearson correlation over the concatenated tokens; None when either side is constant (undefined)."""
    if not true:
        return None
    t, p = np.concatenate(true), np.concatenate(pred)
    if t.std() == 0 or p.std() == 0:
        return None
    return float(np.corrcoef(t, p)[0, 1])


class SimulationScorer:
    """See the module docstring."""

    name = "simulation"

    def __init__(self, client: LLMClient, tokens_per_line: int = 6) -> None:
        self.client = client
        self.tokens_per_line = tokens_per_line
        """Generation budget per example token (an `index: value` line is ~4-6 tokens)."""

    @classmethod
    def from_config(
        cls, cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int
    ) -> SimulationScorer:
        return cls(require_llm(client, cls.name))

    async def simulate(self, explanation: str, ex: Example) -> np.ndarray | Failure:
        try:
            resp = await self.client.chat(
                simulation_messages(explanation, ex), max_tokens=self.tokens_per_line * len(ex.acts) + 8
            )
        except LLMError as err:
            log.debug("simulation failed: %s", err)
            return "request"
        sim = parse_simulation(resp.text, len(ex.acts))
        if sim is None:
            reject_answer(self.client, resp)  # a rerun asks again
            return "unparseable"
        return sim

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        items = scoring_examples(le)
        sims = await asyncio.gather(*(self.simulate(explanation, ex) for ex, _ in items))
        q = quantiles_of(le)
        preds, true, pred = [], [], []
        for (ex, label), sim in zip(items, sims):
            if isinstance(sim, str):
                preds.append(Prediction(ex.example_id, label, None, None, q.get(ex.example_id, -1), sim))
                continue
            preds.append(
                Prediction(
                    ex.example_id,
                    label,
                    int(sim.max() >= 1),
                    float(sim.max()) / MAX_VALUE,
                    q.get(ex.example_id, -1),
                )
            )
            true.append(np.asarray(ex.acts, dtype=np.float64))
            pred.append(sim)
        return ScorerOutput(preds, extra={"correlation": correlation(true, pred)})
