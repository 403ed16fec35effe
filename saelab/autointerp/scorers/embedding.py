"""The `embedding` scorer: MiniLM cosine similarity of explanation and example text is the score.

The Yes/No threshold must not see the test labels: it is the midpoint between the mean similarity to the latent's
own `train` examples and the mean similarity to a calibration set of random non-activating text, namely the
*other* latents' `test_neg` examples (random windows; any that are scoring examples of this latent are dropped).
With no other latent, the calibration mean is taken as 0 (MiniLM's similarity to unrelated text is near 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saelab.autointerp.llm.base import LLMClient
from saelab.autointerp.scorers.base import Prediction, ScorerOutput, plain_text, scoring_examples
from saelab.config import ScoreConfig
from saelab.latents.sampling import Example, LatentExamples, SampleSet


class EmbeddingScorer:
    """Cosine similarity of explanation and example (see module docstring for the label-free threshold)."""

    name = "embedding"

    def __init__(self, embedder: Any, samples: SampleSet) -> None:
        self.embedder = embedder
        self.samples = samples
        texts = {plain_text(ex) for le in samples.latents for ex in (*le.train, *le.test_pos, *le.test_neg)}
        embedder.embed(sorted(texts))  # one batched pass; later calls hit the cache

    @classmethod
    def from_config(
        cls, cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int
    ) -> EmbeddingScorer:
        from saelab.autointerp.embed import Embedder  # torch and transformers: only when this scorer runs

        return cls(Embedder(), samples)

    def calibration(self, le: LatentExamples) -> list[Example]:
        """Other latents' non-activating examples that are not among this latent's examples."""
        own = {ex.example_id for ex in (*le.train, *le.test_pos, *le.test_neg)}
        seen: set[str] = set()
        out = []
        for other in self.samples.latents:
            if other.latent == le.latent:
                continue
            for ex in other.test_neg:
                if ex.example_id not in own and ex.example_id not in seen:
                    seen.add(ex.example_id)
                    out.append(ex)
        return out

    def threshold(self, le: LatentExamples, explanation: str) -> float:
        sim_train = self.embedder.similarity(explanation, [plain_text(ex) for ex in le.train])
        calib = self.calibration(le)
        sim_calib = (
            self.embedder.similarity(explanation, [plain_text(ex) for ex in calib]) if calib else [0.0]
        )
        return float((np.mean(sim_train) + np.mean(sim_calib)) / 2)

    async def score(self, le: LatentExamples, explanation: str) -> ScorerOutput:
        items = scoring_examples(le)
        sims = self.embedder.similarity(explanation, [plain_text(ex) for ex, _ in items])
        thr = self.threshold(le, explanation)
        preds = [
            Prediction(ex.example_id, label, int(s > thr), float(s), ex.quantile if label else -1)
            for (ex, label), s in zip(items, sims)
        ]
        return ScorerOutput(preds, thr)
