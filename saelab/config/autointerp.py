"""Settings of `saelab explain` and `saelab score`: the explainer / judge LLM, the explainers and the scorers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.config.base import _check, _finite


@dataclass(frozen=True)
class LLMConfig:
    """The explainer / judge LLM."""

    backend: Literal["local", "openai"] = "local"
    """`local`: a transformers chat model in-process; `openai`: an OpenAI-compatible HTTP server."""
    local_model: str = "bundled:smollm2-135m-instruct"
    """Chat model for the local backend (same forms as model.name)."""
    local_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Float type the local backend runs its model in. `auto`: bfloat16 where the device multiplies it natively
    (AVX512-BF16 or AMX CPUs, CUDA GPUs from compute capability 8.0), else float32. bfloat16 ran the bundled
    SmolLM2-135M's judge prompts 3.5x faster on 2 AVX512-BF16 cores (BENCHMARKS.md, demo timing); over the demo's 1,440
    judgements its P(yes) moved from float32's by 0.017 in the median (0.08 at most) and 94% of the yes/no answers
    agreed. A bfloat16 model's answers are cached apart
    from a float32 one's (its name carries the type)."""
    url: str = ""
    """Base URL of the OpenAI-compatible server (vLLM, Ollama, llama.cpp server, OpenRouter), e.g.
    `http://127.0.0.1:8080/v1`. Setting it selects the `openai` backend."""
    model: str = ""
    """Model name sent to the server."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (may be unset for local servers)."""
    concurrency: int = 4
    """Requests in flight at once (HTTP) / batch size (local)."""
    timeout_s: float = 120.0
    """Seconds one attempt of a request may take in all (connecting, waiting, reading the whole answer); each
    retry gets as long again."""
    max_retries: int = 3
    """Retries on connection errors, timeouts, HTTP 429 and 5xx (exponential backoff)."""
    temperature: float = 0.0
    """Sampling temperature for explanations."""
    cache: bool = True
    """Keep every answer in the run's `llm/cache.sqlite`, keyed by (model, prompt, parameters): a killed explain
    or score run resumes without asking anything it already has."""

    def __post_init__(self) -> None:
        _finite(self, "llm")
        _check(self.concurrency > 0, "llm.concurrency must be > 0")
        _check(self.timeout_s > 0, "llm.timeout_s must be > 0")
        _check(self.max_retries >= 0, "llm.max_retries must be >= 0")
        _check(self.temperature >= 0, "llm.temperature must be >= 0")


@dataclass(frozen=True)
class ExplainConfig:
    """Explainers."""

    explainers: tuple[Literal["default", "contrastive", "token_stats"], ...] = ("default", "token_stats")
    """`default`: the LLM reads top examples with activating tokens marked; `contrastive`: the same plus
    examples where the latent does not fire (sample.n_non_activating_train of them, never the scoring ones);
    `token_stats`: the most over-represented activating tokens (no LLM, a baseline)."""
    max_new_tokens: int = 40
    """Generation budget for an explanation."""

    def __post_init__(self) -> None:
        _check(len(self.explainers) > 0, "explain.explainers must name at least one explainer")
        _check(self.max_new_tokens > 0, "explain.max_new_tokens must be > 0")


@dataclass(frozen=True)
class ScoreConfig:
    """Scorers: each explanation is used as a classifier of held-out examples."""

    scorers: tuple[str, ...] = ("detection", "fuzzing", "embedding")
    """Names registered in `saelab.autointerp.scorers` (checked against that registry by the CLI and the score
    stage, so a scorer registered there is accepted). Built in: `detection`: does the example match the
    explanation? `fuzzing`: are the marked tokens the ones the explanation describes? `embedding`: MiniLM
    similarity of explanation and example. `simulation`: the LLM predicts each token's activation from the
    explanation; correlation with the true ones (Bills et al. 2023; one generation per example, so slower than
    the yes/no judges)."""
    fuzz_threshold: float = 0.3
    """Fuzzing marks tokens with activation >= this fraction of the example's max."""
    shuffled_control: bool = True
    """Also score each latent with another latent's explanation from the first explainer (a seeded
    derangement; explainer `shuffled`): what an explanation scores by chance. The summary compares every explainer
    with it and with the others per latent, with paired bootstrap intervals."""

    def __post_init__(self) -> None:
        _finite(self, "score")
        _check(len(self.scorers) > 0, "score.scorers must name at least one scorer")
        _check(0 < self.fuzz_threshold <= 1, "score.fuzz_threshold must be in (0, 1]")
