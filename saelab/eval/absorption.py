"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption: Studying Feature Splitting
and Absorption in Sparse Autoencoders"), with SAEBench's procedure and thresholds (`sae_bench/evals/absorption`).

`run_absorption(lm, sae, hookpoint, AbsorptionConfig(), seed) -> AbsorptionResult` runs it all; to score several
SAEs of one hookpoint, `collect_letter_probes(lm, hookpoint, cfg, seed)` does steps 1-3 once and
`score_absorption(probes, sae, cfg, seed)` steps 4-5 per SAE.
1. Vocabulary: every token of the subject tokenizer that renders as ASCII letters, optionally after one leading
   space (so `cat` and ` cat` are two words), special tokens left out; `vocab_size` of them sampled (seeded). The
   words are split train / test (`test_fraction`). Letters scored: those named in `letters`, else every letter
   with `min_words_per_letter` words in each split.
2. Prompts: BOS (when the tokenizer has one, as TransformerLens prepends it), a newline, `icl_examples` examples
   `"{example} has the first letter: {LETTER}"` drawn from the same split, one per line, then the query
   `"{word} has the first letter:"`. The activation is read at the query word's token at `hookpoint`; the model is
   causal, so the forward stops at that token (the words after it cannot change it). A word whose token is not
   the last token of its prefix in context is dropped and counted.
3. Ground-truth probe: one-vs-rest logistic probes on the LM activations of the train words (BCE with
   pos_weight = negatives / positives, Adam 1e-2 decayed to 1e-5, weight decay 1e-4, batch 64). A letter enters the
   means only if its probe's test F1 (logit > 0) exceeds `min_probe_f1` (SAEBench 0.6).
4. Main latents by k-sparse probing: an L1-penalised one-vs-rest probe (L1 0.01) on the SAE latents of the train
   words ranks latents by weight (signed, so only latents that predict the letter); for k = 1..`max_k` a logistic
   regression on the top-k latents (L2 with C = 1, balanced class weights, as scikit-learn's defaults) is scored by
   test F1. Starting from k = 1, k grows while F1 rises by more than `f1_jump_threshold`; the latents of the last
   accepted k are the main latents and their count is the number of split features.
5. Absorption on the test words of the letter that the probe classifies correctly (probe true positives), with
   p the unit probe direction, A = x . p, proj_i = a_i (W_dec_i . p) and cos_i = cos(W_dec_i, p):
   - absorption fraction (Demian Till's metric in SAEBench): M = sum of proj_i over main latents; S = sum of the
     `max_absorbers` largest proj_i > 0 among non-main latents with cos_i >= `absorber_cos_threshold`.
     0 if M >= A or S / A < `projection_threshold`; 1 if M <= 0; else min(S, A - M) / (min(S, A - M) + M).
   - full absorption (Chanin et al.'s metric): every main latent is inactive, the latent with the largest proj_i
     has cos_i >= `full_absorption_cos_threshold`, A >= 0 and its proj_i / A >= `projection_threshold`.
   Per letter: mean absorption fraction and full-absorption rate over the probe true positives; the result holds
   their means (and sample std devs) over the letters whose probe passed, with the mean number of split features.

Differences from SAEBench, all deliberate: (a) proj_i uses W_dec_i . p, the latent's real contribution to the
probe projection; SAEBench uses a_i cos_i, the same number for unit-norm decoders (every saelab architecture but
`relu`). (b) Step 5 reuses the test prompts' activations; SAEBench rebuilds the test words' prompts with ICL
examples drawn from the whole vocabulary. (c) Probes start from zero instead of a random init (the objectives are
convex; a latent that never fires keeps weight 0 instead of a random one that could enter its top-k).
(d) Probes are trained for the scored letters only (one-vs-rest heads are independent, so each equals SAEBench's).
(e) `vocab_size` caps the vocabulary (SAEBench uses all of it). (f) Too few words for a letter, or fewer than
`min_letters` letters with a usable probe, raise `AbsorptionError` (SAEBench stops with a printed warning).
SAEBench advises models of >= 2B parameters and SAEs of >= 16k latents for this eval.

Reading the numbers: A is uncentred and the latents' projections leave out b_dec . p (both as in SAEBench). On
SmolLM2-135M layer 15 the activations' mean projects to about -10 on the letter probes while the centred signal of
a true positive is about +16, so A is small and S / A clears the 0.4 threshold easily; each letter's result
records the mean A and b_dec . p so that this can be seen. A small SAE without first-letter latents gives main
latents that rarely fire and a high absorption fraction, which then means "no letter latents", not absorption.
Measured there with the defaults (21 of 23 letters with probe F1 > 0.6, mean 0.79): a 4,608-latent TopK SAE
trained on 24k tokens scored fraction 0.70, full 0.44, 1.05 split latents, while its k = 1 sparse probes had
test F1 0.02; an untrained SAE of the same shape scored fraction 0.18 and full 0.52. Check `sparse_probe_f1`
before reading absorption into the scores.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from saelab.eval.absorption_config import (
    LETTERS,
    PROBE_BATCH,
    PROBE_END_LR,
    PROBE_LR,
    PROBE_WEIGHT_DECAY,
    AbsorptionConfig,
    AbsorptionError,
)
from saelab.eval.absorption_probes import SparseLatents, fit_ovr_probe, main_latents, word_absorption
from saelab.eval.absorption_words import Word, build_prompts, build_vocab, word_activations
from saelab.metrics import confusion, f1, precision, recall
from saelab.models.loading import LoadedModel, hookpoint_width, resolve_hookpoint
from saelab.run import atomic
from saelab.run.records import load_json
from saelab.sae.base import SAE, check_width

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LetterAbsorption:
    """One letter's probe quality, main latents and absorption."""

    letter: str
    n_train_words: int
    n_test_words: int
    probe_f1: float
    """Test F1 of the ground-truth probe on LM activations (logit > 0)."""
    probe_precision: float
    probe_recall: float
    evaluated: bool
    """probe_f1 > min_probe_f1: the letter enters the means."""
    main_latents: tuple[int, ...]
    """Main latents from k-sparse probing, in rank order."""
    num_split_features: int
    """len(main_latents), as SAEBench's `num_split_features` (1 = no splitting)."""
    sparse_probe_f1: tuple[float, ...]
    """Test F1 of the k-sparse probe for k = 1..max_k."""
    n_probe_true_positives: int
    """Test words of this letter the probe classifies correctly: the words scored for absorption."""
    mean_absorption_fraction: float
    full_absorption_rate: float
    n_full_absorption: int
    mean_probe_projection: float
    """Mean over the probe true positives of A = x . p (uncentred, as SAEBench)."""
    b_dec_projection: float
    """b_dec . p: the part of the SAE reconstruction's projection that no latent supplies. SAEBench's formulas
    leave it out; when it is large against A, M >= A and S / A >= threshold are decided by the offset."""


@dataclass(frozen=True)
class AbsorptionResult:
    """First-letter absorption of one SAE; the means run over the evaluated letters."""

    mean_absorption_fraction_score: float
    """Mean over letters of the mean absorption fraction (SAEBench `mean_absorption_fraction_score`)."""
    mean_full_absorption_score: float
    """Mean over letters of the full-absorption rate (SAEBench `mean_full_absorption_score`)."""
    mean_num_split_features: float
    std_dev_absorption_fraction_score: float
    """Sample standard deviation over letters, as SAEBench's (n - 1)."""
    std_dev_full_absorption_score: float
    std_dev_num_split_features: float
    n_letters_evaluated: int
    letters: tuple[LetterAbsorption, ...]
    skipped_letters: str
    """Letters not scored for too few words (when the config named none)."""
    n_train_words: int
    n_test_words: int
    n_dropped_words: int
    """Sampled words whose token was not their own token in the prompt (not used)."""
    hookpoint: str
    example_prompt: str
    """One test prompt as the model read it (up to the query word)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path, **provenance: str) -> None:
        """Write `to_json()`, plus `provenance` (hashes of the SAE, data and model it was computed from)."""
        atomic.write_json(path, {**self.to_json(), **provenance})

    @classmethod
    def load(cls, path: Path) -> AbsorptionResult:
        return load_json(path, cls)


ABSORPTION = "eval/absorption.json"
"""The run's SAE's first-letter absorption, relative to the run folder."""


def load_run_absorption(run_folder: Path) -> AbsorptionResult | None:
    path = run_folder / ABSORPTION
    return AbsorptionResult.load(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------- the eval


def scored_letters(y_train_N: torch.Tensor, y_test_N: torch.Tensor, cfg: AbsorptionConfig) -> tuple[str, str]:
    """(letters scored, letters skipped). Named letters (`cfg.letters`) must each hold `min_words_per_letter` words
    in both splits, else AbsorptionError names every short one; with `cfg.letters` empty, the letters that do are
    scored and the rest skipped. Fewer than `min_letters` scored letters is an AbsorptionError too."""
    counts = {c: (int((y_train_N == i).sum()), int((y_test_N == i).sum())) for i, c in enumerate(LETTERS)}
    enough = {c for c, n in counts.items() if min(n) >= cfg.min_words_per_letter}
    if cfg.letters:
        short = [f"{c!r} ({counts[c][0]} train, {counts[c][1]} test)" for c in cfg.letters if c not in enough]
        if short:
            raise AbsorptionError(
                f"too few words for letter(s) {', '.join(short)}; each needs {cfg.min_words_per_letter} per "
                "split. Raise absorption.vocab_size (0 = the whole vocabulary) or drop them from absorption.letters"
            )
        return cfg.letters, ""
    scored = "".join(c for c in LETTERS if c in enough)
    if len(scored) < cfg.min_letters:
        raise AbsorptionError(
            f"only {len(scored)} letters have {cfg.min_words_per_letter} words in each split ({scored!r}); "
            f"{cfg.min_letters} are needed (absorption.min_letters). Raise absorption.vocab_size"
        )
    return scored, "".join(c for c in LETTERS if c not in enough)


@dataclass(frozen=True)
class LetterProbes:
    """Everything that does not depend on the SAE: the words' activations at the hookpoint and the ground-truth
    letter probes (steps 1-3). Build it once, then score any number of SAEs of that hookpoint with
    `score_absorption`."""

    x_train_ND: torch.Tensor
    y_train_N: torch.Tensor
    """Letter of each train word, as an index into LETTERS."""
    x_test_ND: torch.Tensor
    y_test_N: torch.Tensor
    letters: str
    """Letters scored."""
    skipped_letters: str
    """Letters left out for too few words (only when `cfg.letters` is empty)."""
    W_CD: torch.Tensor
    """One probe per scored letter: weights [C, D] and biases [C] (logit > 0 = the letter)."""
    b_C: torch.Tensor
    hookpoint: str = ""
    n_dropped_words: int = 0
    example_prompt: str = ""

    @classmethod
    def fit(
        cls,
        x_train_ND: torch.Tensor,
        y_train_N: torch.Tensor,
        x_test_ND: torch.Tensor,
        y_test_N: torch.Tensor,
        cfg: AbsorptionConfig,
        seed: int,
        hookpoint: str = "",
        n_dropped_words: int = 0,
        example_prompt: str = "",
    ) -> LetterProbes:
        """Train the letter probes on activations already collected (step 3); the last three arguments are
        provenance copied into the result."""
        letters, skipped = scored_letters(y_train_N, y_test_N, cfg)
        idx_C = torch.tensor([LETTERS.index(c) for c in letters])
        x_train_ND = x_train_ND.float()
        W_CD, b_C = fit_ovr_probe(
            lambda rows: x_train_ND[rows],
            (y_train_N[:, None] == idx_C[None]).float(),
            x_train_ND.shape[1],
            epochs=cfg.probe_epochs,
            lr=PROBE_LR,
            end_lr=PROBE_END_LR,
            batch_size=PROBE_BATCH,
            weight_decay=PROBE_WEIGHT_DECAY,
            l1=0.0,
            gen=torch.Generator().manual_seed(seed),
            desc="absorption: letter probes",
        )
        x_test_ND = x_test_ND.float()
        return cls(
            x_train_ND,
            y_train_N,
            x_test_ND,
            y_test_N,
            letters,
            skipped,
            W_CD,
            b_C,
            hookpoint,
            n_dropped_words,
            example_prompt,
        )

    def labels(self, split: Literal["train", "test"]) -> torch.Tensor:
        """[N, C] bool: word n's letter is scored letter c."""
        y_N = self.y_train_N if split == "train" else self.y_test_N
        return y_N[:, None] == torch.tensor([LETTERS.index(c) for c in self.letters])[None]


def collect_letter_probes(lm: LoadedModel, hookpoint: str, cfg: AbsorptionConfig, seed: int) -> LetterProbes:
    """Steps 1-3: vocabulary, prompts, activations at `hookpoint` (batched forwards) and the letter probes."""
    hookpoint = resolve_hookpoint(lm.model, hookpoint)
    rng = np.random.default_rng(seed)
    train_words, test_words = split_vocab(build_vocab(lm.tokenizer), cfg, rng)
    train = build_prompts(lm.tokenizer, train_words, cfg, rng)
    test = build_prompts(lm.tokenizer, test_words, cfg, rng)
    y_train, y_test = _labels(train.words), _labels(test.words)
    scored_letters(y_train, y_test, cfg)  # fail before the forwards
    x_train = word_activations(lm, hookpoint, train.ids, cfg.batch_size, "absorption: train prompts")
    x_test = word_activations(lm, hookpoint, test.ids, cfg.batch_size, "absorption: test prompts")
    return LetterProbes.fit(
        x_train,
        y_train,
        x_test,
        y_test,
        cfg,
        seed,
        hookpoint=hookpoint,
        n_dropped_words=train.n_dropped + test.n_dropped,
        example_prompt=test.example,
    )


def score_absorption(probes: LetterProbes, sae: SAE, cfg: AbsorptionConfig, seed: int) -> AbsorptionResult:
    """Steps 3 (probe quality) to 5 for one SAE."""
    check_width(sae, probes.x_train_ND.shape[1], probes.hookpoint or "the activations")
    device = sae.W_dec_FD.device
    W_CD, b_C = probes.W_CD.to(device), probes.b_C.to(device)
    x_test_ND = probes.x_test_ND.to(device)
    Y_train_NC, Y_test_NC = probes.labels("train").to(device), probes.labels("test").to(device)
    logits_NC = x_test_ND @ W_CD.T + b_C
    probe = [
        confusion(Y_test_NC[:, c].cpu().numpy(), (logits_NC[:, c] > 0).cpu().numpy()) for c in range(len(b_C))
    ]
    passed = [f1(cm) > cfg.min_probe_f1 for cm in probe]
    if sum(passed) < cfg.min_letters:
        scores = ", ".join(f"{c}: {f1(cm):.2f}" for c, cm in zip(probes.letters, probe))
        raise AbsorptionError(
            f"only {sum(passed)} of {len(passed)} letters have a first-letter probe with test F1 > "
            f"{cfg.min_probe_f1} ({scores}); {cfg.min_letters} are needed (absorption.min_letters). The model may "
            "not represent first letters linearly at this hookpoint (SAEBench advises models of >= 2B parameters)"
        )
    lat_train, lat_test = SparseLatents.encode(sae, probes.x_train_ND), SparseLatents.encode(sae, x_test_ND)
    mains = main_latents(
        lat_train, Y_train_NC.float(), lat_test, Y_test_NC.float(), cfg, torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        p_CD = W_CD / W_CD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dec_proj_CF = p_CD @ sae.W_dec_FD.T
        cos_CF = dec_proj_CF / sae.W_dec_FD.norm(dim=1).clamp_min(1e-12)
        b_dec_proj_C = p_CD @ sae.b_dec_D
    letters = []
    for c, letter in enumerate(probes.letters):
        tp = (Y_test_NC[:, c] & (logits_NC[:, c] > 0)).nonzero().squeeze(1)
        with torch.no_grad():
            probe_proj_N = x_test_ND[tp] @ p_CD[c]
            fraction_N, full_N = word_absorption(
                probe_proj_N, lat_test.dense(tp), dec_proj_CF[c], cos_CF[c], mains[c][0], cfg
            )
        n_tp = len(tp)
        letters.append(
            LetterAbsorption(
                letter=letter,
                n_train_words=int(Y_train_NC[:, c].sum()),
                n_test_words=int(Y_test_NC[:, c].sum()),
                probe_f1=f1(probe[c]),
                probe_precision=precision(probe[c]),
                probe_recall=recall(probe[c]),
                evaluated=passed[c],
                main_latents=mains[c][0],
                num_split_features=len(mains[c][0]),
                sparse_probe_f1=mains[c][1],
                n_probe_true_positives=n_tp,
                mean_absorption_fraction=float(fraction_N.sum()) / n_tp if n_tp else 0.0,
                full_absorption_rate=float(full_N.sum()) / n_tp if n_tp else 0.0,
                n_full_absorption=int(full_N.sum()),
                mean_probe_projection=float(probe_proj_N.mean()) if n_tp else 0.0,
                b_dec_projection=float(b_dec_proj_C[c]),
            )
        )
    return _summarise(letters, probes)


def _summarise(letters: list[LetterAbsorption], probes: LetterProbes) -> AbsorptionResult:
    scored = [r for r in letters if r.evaluated]
    fractions = [r.mean_absorption_fraction for r in scored]
    fulls = [r.full_absorption_rate for r in scored]
    splits = [float(r.num_split_features) for r in scored]
    return AbsorptionResult(
        mean_absorption_fraction_score=statistics.mean(fractions),
        mean_full_absorption_score=statistics.mean(fulls),
        mean_num_split_features=statistics.mean(splits),
        std_dev_absorption_fraction_score=statistics.stdev(fractions),
        std_dev_full_absorption_score=statistics.stdev(fulls),
        std_dev_num_split_features=statistics.stdev(splits),
        n_letters_evaluated=len(scored),
        letters=tuple(letters),
        skipped_letters=probes.skipped_letters,
        n_train_words=len(probes.y_train_N),
        n_test_words=len(probes.y_test_N),
        n_dropped_words=probes.n_dropped_words,
        hookpoint=probes.hookpoint,
        example_prompt=probes.example_prompt,
    )


def split_vocab(
    vocab: list[Word], cfg: AbsorptionConfig, rng: np.random.Generator
) -> tuple[list[Word], list[Word]]:
    """Sample `vocab_size` words (all if 0) and split them train / test."""
    if cfg.vocab_size and cfg.vocab_size < len(vocab):
        vocab = [vocab[i] for i in np.sort(rng.choice(len(vocab), cfg.vocab_size, replace=False))]
    perm = rng.permutation(len(vocab))
    n_train = int(len(vocab) * (1 - cfg.test_fraction))
    return [vocab[i] for i in perm[:n_train]], [vocab[i] for i in perm[n_train:]]


def _labels(words: Sequence[Word]) -> torch.Tensor:
    return torch.tensor([LETTERS.index(w.letter) for w in words], dtype=torch.long)


def run_absorption(
    lm: LoadedModel, sae: SAE, hookpoint: str, cfg: AbsorptionConfig, seed: int
) -> AbsorptionResult:
    """First-letter feature absorption of `sae` at `hookpoint` of `lm` (see the module docstring). To score several
    SAEs of one hookpoint, call `collect_letter_probes` once and `score_absorption` per SAE."""
    hookpoint = resolve_hookpoint(lm.model, hookpoint)
    check_width(sae, hookpoint_width(lm, hookpoint), hookpoint)
    return score_absorption(collect_letter_probes(lm, hookpoint, cfg, seed), sae, cfg, seed)
