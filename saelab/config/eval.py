"""Settings of `saelab eval`: the core metrics on held-out windows, sparse probing and feature absorption."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saelab.config.base import _check, _finite


@dataclass(frozen=True)
class EvalProbingConfig:
    """Sparse probing (SAEBench definitions, `saelab.eval.probing`): logistic probes on mean-pooled LM activations
    against probes on the top-k SAE latents, with LASSO and random-forest baselines."""

    tasks: tuple[
        Literal[
            "wiki_vs_bible",
            "wiki_people_vs_places",
            "wiki_biology_vs_physics",
            "wiki_topics5",
            "code_vs_prose",
        ],
        ...,
    ] = ()
    """Tasks to run; none by default. Each takes about 2-3 minutes on 2 CPU cores at the default size."""
    n_per_class: int = 128
    """Texts per class (train and test together)."""

    def __post_init__(self) -> None:
        _check(
            len(set(self.tasks)) == len(self.tasks), f"eval.probing.tasks names a task twice: {self.tasks}"
        )
        _check(
            self.n_per_class >= 16, "eval.probing.n_per_class must be >= 16 (the probes need 4 test texts)"
        )


@dataclass(frozen=True)
class EvalAbsorptionConfig:
    """First-letter feature absorption (SAEBench definitions, `saelab.eval.absorption`)."""

    enabled: bool = False
    """Measure it, for every SAE evaluated. The model forwards and letter probes, about 9 minutes at the defaults
    on 2 CPU cores, are shared by all SAEs; each SAE then takes seconds."""
    vocab_size: int = 4000
    """Words sampled from the tokenizer's vocabulary (0 = all); the forwards scale with it."""

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, "eval.absorption.vocab_size must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """SAE evaluation on held-out windows (SAEBench core-metric definitions)."""

    n_windows: int = 64
    """Held-out windows used for the reconstruction metrics."""
    n_ce_windows: int = 16
    """Held-out windows for the CE-loss and KL scores (three full forwards each: clean, SAE, zero-ablation)."""
    batch_size: int = 16
    """Windows per forward pass for the reconstruction metrics."""
    ce_batch_size: int = 4
    """Windows per forward pass for CE/KL (each keeps [batch, ctx_len, vocab] log-probabilities three times)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    probing: EvalProbingConfig = field(default_factory=EvalProbingConfig)
    """Sparse probing of the run's SAE (`eval/probing.json`)."""
    absorption: EvalAbsorptionConfig = field(default_factory=EvalAbsorptionConfig)
    """First-letter feature absorption of every SAE evaluated (`eval/absorption.json`)."""
    extra_saes: tuple[str, ...] = ()
    """Further SAE folders (saelab, SAELens, sparsify or dictionary_learning format) evaluated on the same tokens
    as this run's SAE and its `train.variants`, for the matched-sparsity comparison (`eval/matched_l0.json` and
    Pareto plots of EV, CE-loss score and, with `eval.absorption.enabled`, absorption against L0). On a run that was
    collected but not trained, these SAEs alone are evaluated, the first as the run's record (`eval/metrics.json`)."""

    def __post_init__(self) -> None:
        _finite(self, "eval")
        _check(self.n_windows > 0, "eval.n_windows must be > 0")
        _check(self.n_ce_windows > 0, "eval.n_ce_windows must be > 0")
        _check(self.batch_size > 0, "eval.batch_size must be > 0")
        _check(self.ce_batch_size > 0, "eval.ce_batch_size must be > 0")
        _check(0 < self.dense_threshold <= 1, "eval.dense_threshold must be in (0, 1]")
