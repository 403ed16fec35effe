"""Settings of the commands that read finished runs: the flags and targets of every report, `saelab compare`
and `saelab serve`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.config.base import ConfigError, _check, _finite

TARGET_METRICS = (
    "accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy", "auc", "macro_f1", "weighted_f1",
    "ece", "balance_gap",
)  # fmt: skip
"""Metrics a report can hold a target for; `ece` and `balance_gap` are lower-is-better."""


@dataclass(frozen=True)
class ReportConfig:
    """Flags and targets written into every report (run reports and `--predictions` reports alike)."""

    targets: tuple[str, ...] = ()
    """Targets as METRIC=VALUE, e.g. `f1=0.5 balanced_accuracy=0.7` (commas also separate); each report gets a
    target-gap table (value, target, gap, % of target reached) and flags every metric that misses its target.
    Metrics: accuracy precision recall specificity f1 balanced_accuracy auc macro_f1 weighted_f1 ece balance_gap."""
    max_majority_share: float = 0.8
    """Flag class imbalance when one class holds more than this share of a scoring or prediction set."""
    min_examples: int = 30
    """Flag a scoring or prediction set with fewer examples than this."""
    one_class_tolerance: float = 0.05
    """Flag a classifier that answers one class for (almost) everything: recall or specificity at most this."""
    rank_by: Literal["macro_f1", "weighted_f1", "balanced_accuracy", "accuracy", "auc"] = "macro_f1"
    """Metric that orders models in a `--predictions` report."""
    pdf: bool = False
    """Also export every plot as PDF beside its PNG."""

    def __post_init__(self) -> None:
        _finite(self, "report")
        self.target_values()  # validates
        _check(0.5 <= self.max_majority_share <= 1, "report.max_majority_share must be in [0.5, 1]")
        _check(self.min_examples >= 0, "report.min_examples must be >= 0")
        _check(0 <= self.one_class_tolerance < 0.5, "report.one_class_tolerance must be in [0, 0.5)")

    def target_values(self) -> dict[str, float]:
        """`targets` as {metric: value}."""
        out: dict[str, float] = {}
        for item in (part.strip() for t in self.targets for part in t.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip()
            _check(bool(sep), f"report.targets: {item!r} is not METRIC=VALUE (e.g. f1=0.5)")
            _check(
                name in TARGET_METRICS,
                f"report.targets: unknown metric {name!r}; known: {', '.join(TARGET_METRICS)}",
            )
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"report.targets: {item!r}: {value.strip()!r} is not a number") from None
            _check(out[name] > 0, f"report.targets: target of {name} must be > 0")
        return out


@dataclass(frozen=True)
class CompareConfig:
    """`saelab compare`: before/after deltas with paired bootstrap confidence intervals over latents."""

    n_boot: int = 2000
    """Bootstrap resamples of the latents scored in both runs."""
    alpha: float = 0.05
    """1 − confidence level of the intervals; a change counts only when its interval excludes 0."""
    min_delta: float = 0.05
    """A latent counts as improved (declined) when its F1 rises (falls) by more than this."""
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.7)
    """Success rates: the share of latents with F1 above each threshold."""
    seed: int = 0
    """Seed of the bootstrap."""
    max_failed_share: float = 0.2
    """A side whose judge left more than this share of its judgements failed or unparseable is not compared."""

    def __post_init__(self) -> None:
        _finite(self, "compare")
        _check(0 <= self.max_failed_share <= 1, "compare.max_failed_share must be in [0, 1]")
        _check(self.n_boot >= 100, "compare.n_boot must be >= 100")
        _check(0 < self.alpha < 0.5, "compare.alpha must be in (0, 0.5)")
        _check(self.min_delta >= 0, "compare.min_delta must be >= 0")
        _check(all(0 <= t < 1 for t in self.thresholds), "compare.thresholds must lie in [0, 1)")


@dataclass(frozen=True)
class ServeConfig:
    """`saelab serve`: the feature browser."""

    host: str = "127.0.0.1"
    """Address to bind; the default answers this machine only. Another (e.g. 0.0.0.0) exposes the runs' data."""
    port: int = 0
    """Port to listen on; 0 picks a free one (the URL is printed)."""
    token: bool = True
    """Off loopback, require the random token in the printed URL (kept in a cookie after the first page);
    --no-token drops it (only behind access control of your own)."""

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "serve.host must not be empty")
        _check(0 <= self.port <= 65535, "serve.port must be in [0, 65535]")
