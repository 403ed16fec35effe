"""Warnings written into every report: a classifier that answers one class, class imbalance, too few examples,
metrics below a user-given target (`--report.targets f1=0.5,...`), and the target-gap table.

Pure functions over numbers the reports already hold, so run reports, `--predictions` reports and comparisons
flag the same things the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from saelab.config import ReportConfig

LOWER_IS_BETTER = frozenset({"ece", "balance_gap"})

FlagKind = Literal["one_class", "imbalance", "few_examples", "below_target", "unseen_label"]


@dataclass(frozen=True)
class Flag:
    kind: FlagKind
    subject: str
    """What is flagged: a model, an explainer/scorer pair, a latent."""
    message: str


class TargetGap(NamedTuple):
    subject: str
    metric: str
    value: float | None
    target: float
    gap: float | None
    """How far the value falls short of the target (target − value; value − target for lower-is-better
    metrics); negative when the target is beaten."""
    reached_pct: float | None
    """Value as a % of the target (target / value for lower-is-better metrics)."""


def classifier_flags(
    subject: str,
    recall: float,
    specificity: float,
    class_counts: Mapping[str, int],
    cfg: ReportConfig,
) -> list[Flag]:
    """Flags of one binary(-like) classifier on one example set; `class_counts` are the true classes' counts."""
    flags: list[Flag] = []
    n = sum(class_counts.values())
    tol = cfg.one_class_tolerance
    both = sum(1 for c in class_counts.values() if c > 0) >= 2
    if both and (recall <= tol or specificity <= tol):
        answer = "negative" if recall <= tol else "positive"
        flags.append(
            Flag(
                "one_class",
                subject,
                f"answers {answer} for (almost) everything: recall {recall:.3f}, specificity {specificity:.3f}",
            )
        )
    if n and max(class_counts.values()) / n > cfg.max_majority_share:
        label, count = max(class_counts.items(), key=lambda kv: kv[1])
        flags.append(
            Flag(
                "imbalance",
                subject,
                f"class {label} holds {count / n:.0%} of {n} examples (threshold {cfg.max_majority_share:.0%}); "
                "accuracy is inflated, read balanced accuracy",
            )
        )
    if n < cfg.min_examples:
        flags.append(
            Flag("few_examples", subject, f"only {n} examples (< {cfg.min_examples}); metrics are noisy")
        )
    return flags


def target_gaps(
    subject: str, values: Mapping[str, float | None], targets: Mapping[str, float]
) -> list[TargetGap]:
    """One row per target; a metric the subject does not have gets value None."""
    rows = []
    for metric, target in targets.items():
        v = values.get(metric)
        if v is None:
            rows.append(TargetGap(subject, metric, None, target, None, None))
            continue
        if metric in LOWER_IS_BETTER:
            gap, pct = v - target, (100.0 * target / v if v > 0 else None)
        else:
            gap, pct = target - v, 100.0 * v / target
        rows.append(TargetGap(subject, metric, v, target, gap, pct))
    return rows


def target_flags(gaps: list[TargetGap]) -> list[Flag]:
    return [
        Flag(
            "below_target",
            g.subject,
            f"{g.metric} {g.value:.3f} misses its target {g.target:g} ({g.reached_pct:.0f}% of target)"
            if g.reached_pct is not None
            else f"{g.metric} {g.value:.3f} misses its target {g.target:g}",
        )
        for g in gaps
        if g.value is not None and g.gap is not None and g.gap > 0
    ]
