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
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.metrics import confusion, f1, precision, recall
from saelab.models.loading import LoadedModel, capture, forward_until, hookpoint_width, resolve_hookpoint
from saelab.run import atomic
from saelab.run.records import load_json
from saelab.sae.base import SAE, check_width

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


# ----------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Word:
    """A single-token word: its text as the tokenizer renders the token (leading space kept) and the token id."""

    text: str
    token_id: int

    @property
    def letter(self) -> str:
        return self.text.strip()[0].lower()


def build_vocab(tokenizer: Any) -> list[Word]:
    """Tokens that render as ASCII letters after at most one leading space, special tokens excluded, by id."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            # SentencePiece tokenizers drop the marked leading space when rendering a lone token.
            text = " " + text
        body = text[1:] if text.startswith(" ") else text
        if body and body.isascii() and body.isalpha():
            words.append(Word(text, token_id))
    return words


def first_letter_prompt(word: str, examples: Sequence[str], template: str) -> str:
    """`\\n` + one `template + ' ' + LETTER` line per example + the query `template` for `word`."""
    lines = [f"{template.format(word=e)} {e.strip()[0].upper()}" for e in examples]
    return "\n" + "".join(line + "\n" for line in lines) + template.format(word=word)


@dataclass(frozen=True)
class PromptSet:
    """Tokenised prompts, each cut after its query word's token."""

    ids: list[list[int]]
    words: list[Word]
    n_dropped: int
    example: str


def build_prompts(
    tokenizer: Any, words: Sequence[Word], cfg: AbsorptionConfig, rng: np.random.Generator
) -> PromptSet:
    """One prompt per word with ICL examples from `words` (never the word itself); drops words whose token is not
    the last token of the prompt up to the word, or whose prefix tokenises differently inside the full prompt."""
    if len(words) <= cfg.icl_examples:
        raise AbsorptionError(
            f"a split holds {len(words)} words, too few for {cfg.icl_examples} ICL examples; raise "
            "absorption.vocab_size or lower absorption.icl_examples"
        )
    head, _, _ = cfg.prompt_template.partition("{word}")
    fulls, prefixes = [], []
    for i, w in enumerate(words):
        others = rng.choice(len(words) - 1, size=cfg.icl_examples, replace=False)
        examples = [words[j + (j >= i)].text for j in others]  # skip index i: no word among its own examples
        full = first_letter_prompt(w.text, examples, cfg.prompt_template)
        fulls.append(full)
        prefixes.append(full[: len(full) - len(cfg.prompt_template.format(word=w.text))] + head + w.text)
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    enc_full = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    enc_prefix = tokenizer(prefixes, add_special_tokens=False)["input_ids"]
    ids, kept, texts = [], [], []
    for w, text, full_ids, pre_ids in zip(words, prefixes, enc_full, enc_prefix):
        if pre_ids and pre_ids[-1] == w.token_id and full_ids[: len(pre_ids)] == pre_ids:
            ids.append(bos + list(pre_ids))
            kept.append(w)
            texts.append(text)
    return PromptSet(ids, kept, len(words) - len(kept), texts[0] if texts else "")


@torch.no_grad()
def word_activations(
    lm: LoadedModel, hookpoint: str, ids: Sequence[Sequence[int]], batch_size: int, desc: str
) -> torch.Tensor:
    """[N, D] activations at the last token of each prompt (right-padded batches, forward stopped at hookpoint)."""
    pad = lm.tokenizer.pad_token_id or 0
    out = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", leave=False):
        batch = ids[start : start + batch_size]
        lens = torch.tensor([len(p) for p in batch])
        ids_BT = torch.full((len(batch), int(lens.max())), pad, dtype=torch.long)
        for b, p in enumerate(batch):
            ids_BT[b, : len(p)] = torch.tensor(p)
        mask_BT = (torch.arange(ids_BT.shape[1])[None] < lens[:, None]).long()
        with capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, ids_BT.to(lm.device), mask_BT.to(lm.device))
        a_BTD = store[hookpoint]
        out.append(a_BTD[torch.arange(len(batch)), (lens - 1).to(a_BTD.device)].float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- probes


def fit_ovr_probe(
    rows_to_x: Callable[[torch.Tensor], torch.Tensor],
    Y_NC: torch.Tensor,
    dim: int,
    *,
    epochs: int,
    lr: float,
    end_lr: float,
    batch_size: int,
    weight_decay: float,
    l1: float,
    gen: torch.Generator,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes (weights [C, dim], biases [C]) trained as SAEBench's `train_multi_probe`: BCE with
    pos_weight = negatives / positives per class, optional L1 on the weights (mean over probes of sum |w|), Adam with
    weight decay and the learning rate decayed exponentially from `lr` to `end_lr` over the epochs.
    `rows_to_x(rows)` gives the inputs of those rows."""
    n, C = Y_NC.shape
    device = Y_NC.device
    W_CD = torch.zeros(C, dim, device=device, requires_grad=True)
    b_C = torch.zeros(C, device=device, requires_grad=True)
    pos_C = Y_NC.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - pos_C) / pos_C)
    opt = torch.optim.Adam([W_CD, b_C], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            rows = perm[start : start + batch_size]
            logits = rows_to_x(rows) @ W_CD.T + b_C
            loss = loss_fn(logits, Y_NC[rows.to(device)])
            if l1 > 0:
                loss = loss + l1 * W_CD.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return W_CD.detach(), b_C.detach()


def fit_nested_logistic(
    x_NK: torch.Tensor, y_N: torch.Tensor, C: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """For k = 1..K, binary logistic regression on the first k columns with the objective of scikit-learn's
    `LogisticRegression(class_weight="balanced")`: L2 penalty 1 / (2C) on the weights, none on the intercept, sample
    weights n / (2 n_class). All K fits run together as damped Newton steps in float64.
    Returns weights [K, K] (row k - 1 holds the k-column fit, zero past column k) and intercepts [K]."""
    n, K = x_NK.shape
    n_pos = float(y_N.sum())
    if n_pos in (0.0, float(n)):
        raise AbsorptionError(
            "a k-sparse probe needs words of the letter and of other letters in the train split"
        )
    dev = x_NK.device
    y = y_N.double().to(dev)
    s_N = torch.where(y > 0, n / (2 * n_pos), n / (2 * (n - n_pos)))
    mask_MP = torch.ones(K, K + 1, dtype=torch.float64, device=dev)  # model m: columns 0..m and the intercept
    mask_MP[:, :K] = torch.ones(K, K, dtype=torch.float64, device=dev).tril()
    x_MNP = (
        torch.cat([x_NK.double(), torch.ones(n, 1, dtype=torch.float64, device=dev)], 1)[None]
        * mask_MP[:, None]
    )
    reg_P = torch.full((K + 1,), 1.0 / C, dtype=torch.float64, device=dev)
    reg_P[-1] = 0.0

    def objective(theta_MP: torch.Tensor) -> torch.Tensor:
        z_MN = torch.einsum("mnp,mp->mn", x_MNP, theta_MP)
        return (s_N * (F.softplus(z_MN) - y * z_MN)).sum(-1) + 0.5 * (reg_P * theta_MP**2).sum(-1)

    theta_MP = torch.zeros(K, K + 1, dtype=torch.float64, device=dev)
    for _ in range(100):
        p_MN = torch.sigmoid(torch.einsum("mnp,mp->mn", x_MNP, theta_MP))
        grad_MP = torch.einsum("mnp,mn->mp", x_MNP, s_N * (p_MN - y)) + reg_P * theta_MP
        hess_MPP = torch.einsum("mnp,mn,mnq->mpq", x_MNP, s_N * p_MN * (1 - p_MN), x_MNP)
        hess_MPP = hess_MPP + torch.diag_embed(reg_P + (1 - mask_MP))  # unused columns keep a zero step
        step_MP = torch.linalg.solve(hess_MPP, grad_MP)
        # Backtracking: per model the largest of 1, 1/2, ..., 2^-19 that does not raise the objective, else 0.
        f0_M = objective(theta_MP)
        t_M = torch.zeros(K, dtype=torch.float64, device=dev)
        for t in 0.5 ** np.arange(20):
            todo_M = t_M == 0
            if not bool(todo_M.any()):
                break
            t_M = torch.where(todo_M & (objective(theta_MP - t * step_MP) <= f0_M), t, t_M)
        theta_MP = theta_MP - t_M[:, None] * step_MP
        if float((t_M[:, None] * step_MP).abs().max()) < 1e-10:
            break
    return theta_MP[:, :K].float(), theta_MP[:, K].float()


def binary_f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    return f1(confusion(y_true.cpu().numpy().astype(np.int64), y_pred.cpu().numpy().astype(np.int64)))


def split_features(f1_by_k: Sequence[float], jump: float) -> int:
    """SAEBench's feature-split rule: k grows from 1 while F1 rises by more than `jump` over the last accepted k;
    returns the last accepted k (at least 1)."""
    best, k_star = -math.inf, 0
    for k, score in enumerate(f1_by_k, 1):
        if score <= best + jump:
            break
        best, k_star = score, k
    return max(k_star, 1)


# ----------------------------------------------------------------------------------------------- SAE side


@dataclass(frozen=True)
class SparseLatents:
    """SAE latents of N rows in CSR form: row r's active latents are col_M[ptr[r]:ptr[r+1]] with values val_M."""

    ptr_N1: torch.Tensor
    col_M: torch.Tensor
    val_M: torch.Tensor
    d_sae: int

    @classmethod
    @torch.no_grad()
    def encode(cls, sae: SAE, x_ND: torch.Tensor, batch_size: int = 1024) -> SparseLatents:
        device = sae.W_dec_FD.device
        counts, cols, vals = [], [], []
        for start in range(0, len(x_ND), batch_size):
            z_BF = sae.dense_latents(x_ND[start : start + batch_size].to(device))
            r, c = (z_BF > 0).nonzero(as_tuple=True)
            counts.append(torch.bincount(r, minlength=z_BF.shape[0]))
            cols.append(c)
            vals.append(z_BF[r, c])
        ptr = F.pad(torch.cat(counts).cumsum(0), (1, 0))
        return cls(ptr, torch.cat(cols), torch.cat(vals), sae.cfg.d_sae)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), d_sae] latents of `rows`."""
        rows = rows.to(self.ptr_N1.device)
        starts, counts = self.ptr_N1[rows], self.ptr_N1[rows + 1] - self.ptr_N1[rows]
        local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts)
        offset = torch.arange(int(counts.sum()), device=rows.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts
        )
        idx = torch.repeat_interleave(starts, counts) + offset
        out = torch.zeros(len(rows), self.d_sae, dtype=self.val_M.dtype, device=self.val_M.device)
        out[local, self.col_M[idx]] = self.val_M[idx]
        return out

    def columns(self, ids_K: torch.Tensor) -> torch.Tensor:
        """[N, K] activations of the latents `ids_K` (distinct) on every row."""
        where_F = torch.full((self.d_sae,), -1, dtype=torch.long, device=self.col_M.device)
        where_F[ids_K.to(self.col_M.device)] = torch.arange(len(ids_K), device=self.col_M.device)
        rows_M = torch.repeat_interleave(
            torch.arange(len(self.ptr_N1) - 1, device=self.ptr_N1.device), self.ptr_N1.diff()
        )
        sel = where_F[self.col_M] >= 0
        out = torch.zeros(len(self.ptr_N1) - 1, len(ids_K), dtype=self.val_M.dtype, device=self.val_M.device)
        out[rows_M[sel], where_F[self.col_M[sel]]] = self.val_M[sel]
        return out


def main_latents(
    train: SparseLatents,
    Y_train_NC: torch.Tensor,
    test: SparseLatents,
    Y_test_NC: torch.Tensor,
    cfg: AbsorptionConfig,
    gen: torch.Generator,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Per class: (main latents, test F1 of the k-sparse probe for k = 1..max_k) by k-sparse probing (step 4)."""
    if len(Y_train_NC) <= cfg.sparse_probe_batch_size:
        log.warning(
            "absorption: %d train words fit in one L1-probe batch (%d): its latent ranking favours latents that "
            "fire on few words; lower absorption.sparse_probe_batch_size or raise absorption.vocab_size",
            len(Y_train_NC),
            cfg.sparse_probe_batch_size,
        )
    V_CF, _ = fit_ovr_probe(
        train.dense,
        Y_train_NC,
        train.d_sae,
        epochs=cfg.sparse_probe_epochs,
        lr=PROBE_LR,
        end_lr=PROBE_END_LR,
        batch_size=cfg.sparse_probe_batch_size,
        weight_decay=SPARSE_PROBE_WEIGHT_DECAY,
        l1=SPARSE_PROBE_L1,
        gen=gen,
        desc="absorption: L1 probe on latents",
    )
    top_CK = V_CF.topk(min(cfg.max_k, train.d_sae), dim=1).indices
    out = []
    for c in range(Y_train_NC.shape[1]):
        z_train, z_test = train.columns(top_CK[c]), test.columns(top_CK[c])
        W_KK, b_K = fit_nested_logistic(z_train, Y_train_NC[:, c])
        scores_NK = z_test @ W_KK.T.to(z_test.device) + b_K.to(z_test.device)
        f1s = [binary_f1(Y_test_NC[:, c] > 0, scores_NK[:, k] > 0) for k in range(scores_NK.shape[1])]
        k_star = split_features(f1s, cfg.f1_jump_threshold)
        out.append((tuple(int(i) for i in top_CK[c, :k_star]), tuple(f1s)))
    return out


def word_absorption(
    probe_proj_N: torch.Tensor,
    z_NF: torch.Tensor,
    dec_proj_F: torch.Tensor,
    cos_F: torch.Tensor,
    main: Sequence[int],
    cfg: AbsorptionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction, full absorption) of each word (step 5 of the module docstring).

    probe_proj_N: the LM activation's projection on the unit probe direction; z_NF: SAE latents; dec_proj_F: W_dec_i . p;
    cos_F: cos(W_dec_i, p); main: the letter's main latents. Words with probe_proj <= 0 score 0 on both."""
    proj_NF = z_NF * dec_proj_F
    is_main_F = torch.zeros_like(cos_F, dtype=torch.bool)
    is_main_F[list(main)] = True
    main_proj_N = proj_NF[:, is_main_F].sum(1)
    candidate_NF = (~is_main_F & (cos_F >= cfg.absorber_cos_threshold))[None] & (proj_NF > 0)
    absorber_proj_N = (
        proj_NF.where(candidate_NF, 0.0).topk(min(cfg.max_absorbers, proj_NF.shape[1]), dim=1).values.sum(1)
    )
    absorbed_N = torch.minimum(absorber_proj_N, probe_proj_N - main_proj_N)
    fraction_N = torch.where(main_proj_N <= 0, 1.0, absorbed_N / (absorbed_N + main_proj_N).clamp_min(1e-12))
    needed_N = cfg.projection_threshold * probe_proj_N  # least projection the absorbers must supply
    none_N = (probe_proj_N <= 0) | (main_proj_N >= probe_proj_N) | (absorber_proj_N < needed_N)
    fraction_N = fraction_N.masked_fill(none_N, 0.0).clamp(0.0, 1.0)
    top_proj_N, top_idx_N = proj_NF.max(dim=1)
    full_N = (
        (z_NF[:, is_main_F] < ACTIVE_EPS).all(dim=1)
        & (cos_F[top_idx_N] >= cfg.full_absorption_cos_threshold)
        & (probe_proj_N > 0)
        & (top_proj_N >= needed_N)
    )
    return fraction_N, full_N


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
