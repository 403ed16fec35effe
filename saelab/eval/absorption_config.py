"""First-letter absorption's settings (SAEBench's thresholds are the defaults), constants and error type."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Probe optimisation, SAEBench `evals/absorption` (`train_and_save_probes`, `train_sparse_multi_probe`).
PROBE_LR, PROBE_END_LR, PROBE_WEIGHT_DECAY, PROBE_BATCH = 1e-2, 1e-5, 1e-4, 64
SPARSE_PROBE_L1, SPARSE_PROBE_WEIGHT_DECAY = 1e-2, 1e-6
ACTIVE_EPS = 1e-8
"""A main latent counts as inactive below this activation (full absorption)."""


class AbsorptionError(ValueError):
    """The absorption eval cannot run with this model, vocabulary or config; the message says what to change."""


@dataclass(frozen=True)
class AbsorptionConfig:
    """First-letter feature absorption (SAEBench's thresholds are the defaults)."""

    vocab_size: int = 4000
    """Words sampled (seeded) from the tokenizer's alphabetic tokens; 0 = all of them (SAEBench uses all;
    SmolLM2 has 47k). One prompt per word, ~83 tokens with 10 examples: 4,000 words took 9 min on 2 CPU cores."""
    letters: str = ""
    """Letters scored (probes, split features, absorption), e.g. `abc`; a named letter with fewer than
    `min_words_per_letter` words in a split raises AbsorptionError. Empty: every letter that has them (SAEBench
    scores all 26 on the whole vocabulary). Words of every letter stay in the vocabulary either way."""
    icl_examples: int = 10
    """In-context examples before the query word, drawn from the query's own split."""
    prompt_template: str = "{word} has the first letter:"
    """Each example and the query; examples are followed by ` {LETTER}`."""
    test_fraction: float = 0.2
    """Share of the words held out to score probes and absorption."""
    min_words_per_letter: int = 5
    """Fewest words a scored letter needs in each split; fewer raise AbsorptionError."""
    probe_epochs: int = 50
    """Epochs of the ground-truth probe on LM activations."""
    sparse_probe_epochs: int = 50
    """Epochs of the L1 probe on SAE latents that ranks candidate main latents."""
    sparse_probe_batch_size: int = 4096
    """Batch of that L1 probe (SAEBench 4096). With fewer train words than this, every Adam step sees the whole
    set and moves each weight by ~lr whatever its gradient's size, so latents firing on a handful of the letter's
    words rank with broad ones (measured on SmolLM2 with 1,200 train words: top latents fired on 1-3 of them);
    SAEBench runs with tens of thousands of words. Lower it for small vocabularies."""
    max_k: int = 10
    """Most main latents a letter can have."""
    f1_jump_threshold: float = 0.03
    """k-sparse probing adds a latent only while test F1 rises by more than this."""
    min_probe_f1: float = 0.6
    """A letter enters the means only if its ground-truth probe's test F1 exceeds this."""
    min_letters: int = 20
    """Fewest letters with such a probe for a score (SAEBench 20); fewer raise AbsorptionError. At most the
    number of letters named."""
    absorber_cos_threshold: float = 0.1
    """Absorption fraction: least cos(W_dec_i, probe) of a candidate absorbing latent."""
    full_absorption_cos_threshold: float = 0.025
    """Full absorption: least cos(W_dec_i, probe) of the top-projecting latent."""
    projection_threshold: float = 0.4
    """Least share of the probe projection A the absorbing latent(s) must supply (both metrics)."""
    max_absorbers: int = 3
    """Absorption fraction: most non-main latents summed into the absorbing projection S."""
    batch_size: int = 32
    """Prompts per forward pass."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise AbsorptionError(f"absorption.{msg}")

        check(self.vocab_size >= 0, f"vocab_size must be >= 0, got {self.vocab_size}")
        check(
            set(self.letters) <= set(LETTERS) and len(set(self.letters)) == len(self.letters),
            f"letters must be distinct lowercase a-z (or empty for all), got {self.letters!r}",
        )
        check(self.icl_examples >= 0, f"icl_examples must be >= 0, got {self.icl_examples}")
        check(
            self.prompt_template.count("{word}") == 1
            and "{" not in self.prompt_template.replace("{word}", ""),
            f"prompt_template must hold {{word}} once and no other field, got {self.prompt_template!r}",
        )
        check(0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}")
        check(self.min_words_per_letter >= 1, "min_words_per_letter must be >= 1")
        check(self.probe_epochs >= 1 and self.sparse_probe_epochs >= 1, "probe epochs must be >= 1")
        check(self.max_k >= 1, f"max_k must be >= 1, got {self.max_k}")
        check(self.f1_jump_threshold >= 0, "f1_jump_threshold must be >= 0")
        check(0.0 <= self.min_probe_f1 < 1.0, "min_probe_f1 must be in [0, 1)")
        most = len(self.letters or LETTERS)
        check(
            2 <= self.min_letters <= most,
            f"min_letters must be in [2, {most}] (the letters scored; std devs need two), got {self.min_letters}",
        )
        check(self.projection_threshold > 0, "projection_threshold must be > 0")
        check(self.max_absorbers >= 1, "max_absorbers must be >= 1")
        check(self.batch_size >= 1 and self.sparse_probe_batch_size >= 1, "batch sizes must be >= 1")
