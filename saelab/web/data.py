"""What the feature browser reads from a run folder, one latent at a time.

Nothing is read when a run is opened. The first list page of a run builds its index: the latent statistics
(`latents/stats.safetensors`, a few numbers per latent), the explanations (short texts), each score row's metrics
(the part of a `score/scores.jsonl` line before its predictions) with the line's byte offset, and the byte offset
of each latent's line in `samples/samples.json` (`SampleIndex`: the file is never parsed whole). A latent page then
reads only its own slices: its cache slice (histogram), its samples object, its score lines, and one decoder row
plus one pass over the memory-mapped decoder for its nearest latents.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from saelab.autointerp.explain import ExplanationRecord, load_run_explanations
from saelab.autointerp.results import SCORE_DIR, SCORES_FILE, index_score_lines, read_score_row
from saelab.latents.cache import LATENTS, LatentCache
from saelab.latents.sampling import SAMPLES, LatentExamples, SampleIndex
from saelab.report.doc import REPORT_HTML
from saelab.run.manifest import MANIFEST, read_manifest
from saelab.sae.base import WEIGHTS_FILE
from saelab.train.stage import SAE_DIR

SCORES = f"{SCORE_DIR}/{SCORES_FILE}"
SAE_WEIGHTS = f"{SAE_DIR}/{WEIGHTS_FILE}"
REPORT = REPORT_HTML

METRIC = "f1"
"""The per-scorer score the list shows and sorts by unless asked for another of LIST_METRICS."""
LIST_METRICS = ("f1", "balanced_accuracy", "auc", "precision", "recall", "accuracy", "correlation")
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass(frozen=True)
class ScoreResult:
    """One (explainer, scorer) result of one latent, with its per-example judgements."""

    explainer: str
    scorer: str
    explanation: str
    metrics: dict[str, Any]
    predictions: dict[str, dict[str, Any]]
    """By example id: label, pred, score, quantile."""

    @property
    def key(self) -> str:
        return f"{self.explainer}/{self.scorer}"


@dataclass(frozen=True)
class LatentPage:
    """Everything a latent page shows."""

    latent: int
    frequency: float
    max_act: float
    count: int
    explanations: list[ExplanationRecord]
    scores: list[ScoreResult]
    examples: LatentExamples | None
    histogram: tuple[np.ndarray, np.ndarray]
    """(counts [B], bin edges [B+1]) of the latent's nonzero activations."""
    neighbours: list[tuple[int, float]]
    """(latent, cosine similarity of decoder rows), most similar first."""


@dataclass
class _Index:
    """The run-wide index behind the list page (see module docstring)."""

    frequency: np.ndarray
    max_act: np.ndarray
    count: np.ndarray
    explanations: dict[int, list[ExplanationRecord]]
    scores: dict[str, dict[str, np.ndarray]]
    """By metric (LIST_METRICS), by score key `explainer/scorer`: [F] the metric per latent, NaN where unscored."""

    def metrics(self, metric: str = METRIC) -> dict[str, np.ndarray]:
        """[F] columns of one metric by score key."""
        return self.scores[metric]

    score_lines: dict[int, list[tuple[int, int]]]
    """By latent: (offset, length) of its lines in scores.jsonl."""
    samples: SampleIndex | None
    """Each sampled latent's line in samples.json (None when the sample stage has not run)."""


@dataclass
class RunData:
    """One served run folder, read lazily."""

    name: str
    folder: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _decoder_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _index: _Index | None = field(default=None, repr=False)
    _decoder: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @cached_property
    def cache(self) -> LatentCache:
        return LatentCache.open(self.folder / LATENTS)

    @property
    def d_sae(self) -> int:
        return self.index.frequency.shape[0]

    @property
    def index(self) -> _Index:
        with self._lock:
            if self._index is None:
                self._index = self._build_index()
            return self._index

    def file(self, rel: str) -> Path | None:
        """One of the run's known artifacts (a fixed relative path), or None when it is missing."""
        path = self.folder / rel
        return path if path.is_file() else None

    def recorded(self) -> frozenset[str]:
        """The stages the run's manifest records now. What a stage dropped by a `--force` rerun left on disk is not
        shown (its explanations and scores were made from latents the run no longer has)."""
        return frozenset(read_manifest(self.folder / MANIFEST).get("stages", {}))

    def _build_index(self) -> _Index:
        stats = self.cache.stats
        stages = self.recorded()
        explanations: dict[int, list[ExplanationRecord]] = {}
        for rec in load_run_explanations(self.folder) if "explain" in stages else []:
            explanations.setdefault(rec.latent, []).append(rec)
        metrics, score_lines = self._index_scores(len(stats.count), "score" in stages)
        return _Index(
            stats.frequency,
            stats.max_act,
            stats.count,
            explanations,
            metrics,
            score_lines,
            self._index_samples() if "sample" in stages else None,
        )

    def _index_scores(
        self, d_sae: int, scored: bool
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[int, list[tuple[int, int]]]]:
        """Every score line's metrics (LIST_METRICS) and (offset, length), by latent (none unless `scored`: the
        manifest records the score stage)."""
        found: dict[str, list[tuple[int, list[float]]]] = {}
        lines: dict[int, list[tuple[int, int]]] = {}
        path = self.file(SCORES) if scored else None
        for line in index_score_lines(path) if path else []:
            values = [np.nan if line.metrics.get(m) is None else float(line.metrics[m]) for m in LIST_METRICS]
            found.setdefault(f"{line.explainer}/{line.scorer}", []).append((line.latent, values))
            lines.setdefault(line.latent, []).append((line.offset, line.length))
        metrics: dict[str, dict[str, np.ndarray]] = {m: {} for m in LIST_METRICS}
        for key, rows in found.items():
            table = np.full((len(LIST_METRICS), d_sae), np.nan)
            table[:, [latent for latent, _ in rows]] = np.array([v for _, v in rows], dtype=np.float64).T
            for m, col in zip(LIST_METRICS, table):
                metrics[m][key] = col
        return metrics, lines

    def _index_samples(self) -> SampleIndex | None:
        path = self.file(SAMPLES)
        return SampleIndex(path) if path is not None else None

    # ------------------------------------------------------------------------------------------ one latent

    def examples(self, latent: int) -> LatentExamples | None:
        samples = self.index.samples
        return samples.examples(latent) if samples is not None else None

    def scores(self, latent: int) -> list[ScoreResult]:
        path = self.file(SCORES)
        spans = self.index.score_lines.get(latent, [])
        if path is None or not spans:
            return []
        out = []
        for offset, length in spans:
            r = read_score_row(path, offset, length).to_dict()
            preds = {p["example_id"]: p for p in r.pop("predictions")}
            keep = ("latent", "explainer", "scorer", "explanation")
            out.append(
                ScoreResult(
                    r["explainer"],
                    r["scorer"],
                    r["explanation"],
                    {k: v for k, v in r.items() if k not in keep},
                    preds,
                )
            )
        return out

    def histogram(self, latent: int, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
        _, values = self.cache.latent(latent)
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1)
        return np.histogram(values, bins=bins)

    def decoder(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(memory-mapped W_dec [F, D], inverse row norms [F]); the norms take one pass, on first use."""
        path = self.file(SAE_WEIGHTS)
        if path is None:
            return None
        with self._decoder_lock:
            if self._decoder is None:
                w = _memmap_tensor(path, "W_dec_FD")
                if w is None:
                    return None
                norms = np.sqrt(np.einsum("fd,fd->f", w, w, dtype=np.float64))
                self._decoder = (w, 1.0 / np.maximum(norms, 1e-12))
            return self._decoder

    def neighbours(self, latent: int, k: int = 10) -> list[tuple[int, float]]:
        dec = self.decoder()
        if dec is None:
            return []
        w, inv = dec
        cos = (w @ np.asarray(w[latent])).astype(np.float64) * inv * inv[latent]
        cos[latent] = -np.inf
        top = np.argpartition(-cos, min(k, len(cos) - 1))[:k]
        top = top[np.argsort(-cos[top], kind="stable")]
        return [(int(i), float(cos[i])) for i in top if np.isfinite(cos[i])]

    def page(self, latent: int) -> LatentPage:
        idx = self.index
        if not 0 <= latent < self.d_sae:
            raise KeyError(latent)
        return LatentPage(
            latent,
            float(idx.frequency[latent]),
            float(idx.max_act[latent]),
            int(idx.count[latent]),
            idx.explanations.get(latent, []),
            self.scores(latent),
            self.examples(latent),
            self.histogram(latent),
            self.neighbours(latent),
        )


def _memmap_tensor(path: Path, name: str) -> np.ndarray | None:
    """One tensor of a safetensors file as a read-only memory map (header: 8-byte length, then JSON)."""
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.get(name)
    if meta is None or meta["dtype"] not in _NP_DTYPES or len(meta["shape"]) != 2:
        return None
    start, end = meta["data_offsets"]
    dtype = np.dtype(_NP_DTYPES[meta["dtype"]]).newbyteorder("<")
    shape = tuple(meta["shape"])
    if end - start != dtype.itemsize * shape[0] * shape[1]:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
