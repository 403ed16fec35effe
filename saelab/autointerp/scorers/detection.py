"""The `detection` scorer: the judge LLM reads the explanation and one example and answers Yes or No to "does the
text match the description?" (the yes/no judge of `base.JudgeScorer`, shown the example's plain text)."""

from __future__ import annotations

from saelab.autointerp.llm.base import LLMClient
from saelab.autointerp.prompts import DETECTION_USER
from saelab.autointerp.scorers.base import JudgeScorer, require_llm
from saelab.config import ScoreConfig
from saelab.latents.sampling import SampleSet


class DetectionScorer(JudgeScorer):
    name = "detection"
    template = DETECTION_USER

    @classmethod
    def from_config(
        cls, cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int
    ) -> DetectionScorer:
        return cls(require_llm(client, cls.name))
