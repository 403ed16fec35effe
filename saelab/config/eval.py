"""Settings of `saelab eval`: the core metrics on held-out windows, sparse probing, feature absorption, SCR/TPP
and the reseed noise of the slower evaluations."""

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
class EvalScrTppConfig:
    """SCR and TPP (SAEBench definitions, `saelab.eval.scr_tpp`): probes on mean-pooled LM activations, the SAE
    latents most tied to a class by probe attribution zero-ablated, the probes re-tested."""

    scr: bool = False
    """Spurious correlation removal: a probe trained where profession and gender agree, cleaned by ablating
    gender (or profession) latents. The bundled task takes about a minute on 2 CPU cores."""
    tpp: bool = False
    """Targeted probe perturbation: accuracy drop of one class's probe against the others' when that class's
    latents are ablated (Wikipedia topics on the bundled corpus). About 2-3 minutes on 2 CPU cores."""
    dataset: str = ""
    """"" for the bundled Wikipedia tasks; or a `datasets.save_to_disk` folder of bias_in_bios (`hard_text`,
    `profession`, `gender`) or Amazon reviews (`text`, `category`, `rating`) with `train` and `test` splits."""
    n_values: tuple[int, ...] = (2, 5, 10, 20, 50, 100, 500)
    """Numbers of latents ablated (SAEBench's); those above the SAE's width are left out with a warning."""
    scr_n_train: int = 64
    """Texts per SCR probe and split (n / 4 per profession-gender quadrant; SAEBench 4,000)."""
    scr_n_test: int = 28
    """SCR test texts per probe (SAEBench 1,000). The bundled biographies hold 25 women writers and 47 women
    performers, which bound (scr_n_train + scr_n_test) / 4 at 23."""
    tpp_n_train: int = 128
    """Texts per TPP class (SAEBench 2,000)."""
    tpp_n_test: int = 32
    """TPP test texts per class (SAEBench 500)."""
    probe_epochs: int = 20
    """Epochs of each linear probe (AdamW, lr 1e-3, batch 16, L1 1e-3, as SAEBench)."""

    def __post_init__(self) -> None:
        _check(
            len(self.n_values) > 0 and all(n > 0 for n in self.n_values),
            f"eval.scr_tpp.n_values must be positive numbers of latents, got {self.n_values}",
        )
        _check(self.scr_n_train >= 16, "eval.scr_tpp.scr_n_train must be >= 16 (4 texts per quadrant)")
        _check(self.scr_n_test >= 8, "eval.scr_tpp.scr_n_test must be >= 8 (2 texts per quadrant)")
        _check(self.tpp_n_train >= 8, "eval.scr_tpp.tpp_n_train must be >= 8")
        _check(self.tpp_n_test >= 4, "eval.scr_tpp.tpp_n_test must be >= 4")
        _check(self.probe_epochs > 0, "eval.scr_tpp.probe_epochs must be > 0")


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
    scr_tpp: EvalScrTppConfig = field(default_factory=EvalScrTppConfig)
    """SCR and TPP of the run's SAE (`eval/scr_tpp.json`)."""
    repeats: int = 1
    """Run SCR, TPP, absorption and sparse probing (those switched on) once per seed, seed .. seed + repeats - 1
    (probe seed and data subsample), and write each metric's mean, standard deviation and bootstrap interval to
    `eval/noise.json` (with 2 or more). Each repeat of absorption and probing runs their forwards again."""
    compare: str = ""
    """Another run folder evaluated with the same evaluations: `eval/noise.json` then says, per metric, whether
    the two SAEs differ by less than the reseed noise."""
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
        _check(self.repeats >= 1, "eval.repeats must be >= 1")
