"""Reseed noise: an eval metric repeated over seeds (probe seed and data subsample), summarised as mean, standard
deviation and a bootstrap interval, and the comparison of two SAEs that says when they differ by less than it.

Chanin (arXiv 2605.18229, 2026) finds SAEBench's metrics noisier under reseeding than the field assumes; this is
the noise saelab reports beside every repeated number (`--eval.repeats N`, `eval/noise.json`).

- `spread(values)`: mean, sample standard deviation (ddof 1), and the 95% percentile-bootstrap interval of the
  mean (2,000 resamples, seeded): where the mean of N seeds would land if the seeds were drawn again.
- `compare(a, b)`: per metric both hold, the difference of means and its 95% bootstrap interval (each side
  resampled on its own); `within_noise` when that interval holds 0, or when either side has one seed only and
  the difference is below the other side's standard deviation (one seed's difference against one seed's noise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab.run import atomic
from saelab.run.records import load_json

N_BOOTSTRAP = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Spread:
    """One metric over seeds."""

    values: tuple[float, ...]
    """The metric at each seed, in seed order."""
    mean: float
    std: float
    """Sample standard deviation (ddof 1); 0 with one seed."""
    ci_low: float
    """95% bootstrap interval of the mean (both ends the value itself with one seed)."""
    ci_high: float


def _boot_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return values[rng.integers(0, len(values), (N_BOOTSTRAP, len(values)))].mean(axis=1)


def spread(values: Sequence[float], seed: int = 0) -> Spread:
    """Mean, std and the bootstrap interval of `values` (module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("spread of no values")
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    means = _boot_means(v, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Spread(tuple(float(x) for x in v), float(v.mean()), std, float(lo), float(hi))


@dataclass(frozen=True)
class Difference:
    """One metric of two SAEs: b - a."""

    metric: str
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    noise_std: float
    """The larger of the two sides' standard deviations over seeds."""
    n_seeds: tuple[int, int]
    within_noise: bool


def compare(a: Mapping[str, Spread], b: Mapping[str, Spread], seed: int = 0) -> list[Difference]:
    """Every metric of both `a` and `b`, compared (module docstring)."""
    out = []
    rng = np.random.default_rng(seed)
    for metric in sorted(set(a) & set(b)):
        va, vb = np.asarray(a[metric].values), np.asarray(b[metric].values)
        diffs = _boot_means(vb, rng) - _boot_means(va, rng)
        lo, hi = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        diff = float(vb.mean() - va.mean())
        noise = max(a[metric].std, b[metric].std)
        within = bool(lo <= 0 <= hi) if min(len(va), len(vb)) > 1 else abs(diff) <= noise
        out.append(Difference(metric, float(va.mean()), float(vb.mean()), diff, float(lo), float(hi), noise,
                              (len(va), len(vb)), within))  # fmt: skip
    return out


@dataclass(frozen=True)
class NoiseRecord:
    """Every metric repeated over seeds in one eval, and the comparison with another run when asked for."""

    seeds: tuple[int, ...]
    sae_sha256: str
    model_sha256: str
    hookpoint: str
    metrics: dict[str, Spread]
    """Metric name (`scr.metric_n10`, `tpp.total_n10`, `absorption.mean_absorption_fraction_score`,
    `probing.<task>.sae_top1_accuracy`, ...) -> its spread."""
    compared_with: str = ""
    """The run folder `--eval.compare` named ("" when none)."""
    compared_sae_sha256: str = ""
    differences: tuple[Difference, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> NoiseRecord:
        return load_json(path, cls)


NOISE = "eval/noise.json"
"""The run's reseed-noise record, relative to the run folder."""


def load_run_noise(run_folder: Path) -> NoiseRecord | None:
    path = run_folder / NOISE
    return NoiseRecord.load(path) if path.exists() else None
