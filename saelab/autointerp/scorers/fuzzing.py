"""The `fuzzing` scorer (Delphi): positives are activating examples with the tokens at >= `fuzz_threshold` x the
example's max marked `<<like this>>`; negatives are non-activating examples with as many random tokens marked
(seeded). The judge answers whether the marked tokens are what the description describes."""

from __future__ import annotations

import numpy as np

from saelab.autointerp.explain import render_tokens
from saelab.autointerp.llm.base import LLMClient
from saelab.autointerp.prompts import FUZZING_USER
from saelab.autointerp.scorers.base import JudgeScorer, require_llm
from saelab.config import ScoreConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet


class FuzzingScorer(JudgeScorer):
    name = "fuzzing"
    template = FUZZING_USER

    def __init__(self, client: LLMClient, fuzz_threshold: float, seed: int) -> None:
        super().__init__(client)
        self.fuzz_threshold = fuzz_threshold
        self.seed = seed

    @classmethod
    def from_config(
        cls, cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int
    ) -> FuzzingScorer:
        return cls(require_llm(client, cls.name), cfg.fuzz_threshold, seed)

    def texts(self, le: LatentExamples) -> list[tuple[str, str, int]]:
        marked = fuzz_marks(le, self.fuzz_threshold, self.seed)
        return [(ex.example_id, render_tokens(ex.token_strs, marks), label) for ex, marks, label in marked]


def fuzz_marks(le: LatentExamples, threshold: float, seed: int) -> list[tuple[Example, list[bool], int]]:
    """(example, marked positions, label): positives mark tokens at >= `threshold` x their max; negatives mark
    as many random tokens as a positive does (cycling through the positives' counts), drawn with a generator
    seeded by `seed` and the latent."""
    out: list[tuple[Example, list[bool], int]] = []
    counts: list[int] = []
    for ex in le.test_pos:
        marks = [a >= threshold * ex.max_act for a in ex.acts]
        counts.append(sum(marks))
        out.append((ex, marks, 1))
    rng = np.random.default_rng([seed, le.latent])
    for i, ex in enumerate(le.test_neg):
        n = min(counts[i % len(counts)] if counts else 1, len(ex.acts))
        chosen = set(rng.choice(len(ex.acts), size=n, replace=False).tolist())
        out.append((ex, [j in chosen for j in range(len(ex.acts))], 0))
    return out
