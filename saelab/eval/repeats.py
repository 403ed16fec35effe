"""The eval stage's reseed noise: the headline numbers of SCR, TPP, absorption and sparse probing at every seed of
`--eval.repeats`, summarised (`saelab.eval.noise`) into `eval/noise.json`, and `--eval.compare`'s verdict on
another run's SAE.

Metric names: `scr.metric_n{n}`, `tpp.total_n{n}` (SAEBench's headline SCR/TPP at n latents ablated),
`absorption.mean_absorption_fraction_score` / `.mean_full_absorption_score` / `.mean_num_split_features`, and
`probing.{features}_{probe}[_k{k}].accuracy` (the accuracy averaged over the tasks, as `ProbingResult.mean`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from saelab.eval.absorption import AbsorptionResult
from saelab.eval.noise import NOISE, NoiseRecord, compare, load_run_noise, spread
from saelab.eval.probing import ProbingResult
from saelab.eval.scr_data import ScrTppError
from saelab.eval.scr_tpp import ScrTppResult

log = logging.getLogger(__name__)

PerSeed = dict[str, float]
"""Metric name -> value at one seed."""


def absorption_metrics(a: AbsorptionResult) -> PerSeed:
    return {
        "absorption.mean_absorption_fraction_score": a.mean_absorption_fraction_score,
        "absorption.mean_full_absorption_score": a.mean_full_absorption_score,
        "absorption.mean_num_split_features": a.mean_num_split_features,
    }


def probing_metrics(p: ProbingResult) -> PerSeed:
    out = {}
    for row in p.mean_scores():
        k = "" if row["k"] is None else f"_k{row['k']}"
        out[f"probing.{row['features']}_{row['probe']}{k}.accuracy"] = float(row["accuracy"])
    return out


def scr_tpp_metrics(r: ScrTppResult) -> list[PerSeed]:
    """One dict per seed of `r`."""
    return [
        {**{f"scr.metric_n{n}": v for n, v in s.scr_metric.items()},
         **{f"tpp.total_n{n}": v for n, v in s.tpp_metric.items()}}
        for s in r.seeds
    ]  # fmt: skip


def noise_record(
    seeds: Sequence[int], per_seed: Sequence[PerSeed], sae_sha256: str, model_sha256: str, hookpoint: str
) -> NoiseRecord:
    """Spreads of every metric present at every seed."""
    names = [m for m in per_seed[0] if all(m in d for d in per_seed)]
    metrics = {m: spread([d[m] for d in per_seed]) for m in names}
    return NoiseRecord(tuple(seeds), sae_sha256, model_sha256, hookpoint, metrics)


def with_comparison(record: NoiseRecord, other_run: str) -> NoiseRecord:
    """`record` with its differences from the SAE of `other_run` (whose `eval/noise.json` must exist)."""
    other = load_run_noise(Path(other_run))
    if other is None:
        raise ScrTppError(
            f"--eval.compare {other_run}: no {NOISE} there; run `saelab eval --run-dir {other_run}` with "
            "--eval.repeats and the same evaluations first"
        )
    diffs = compare(other.metrics, record.metrics)
    if not diffs:
        raise ScrTppError(
            f"--eval.compare {other_run}: it measured none of this eval's metrics ({sorted(record.metrics)}); "
            "evaluate both runs with the same evaluations"
        )
    if other.model_sha256 != record.model_sha256 or other.hookpoint != record.hookpoint:
        log.warning(
            "eval.compare: %s used another model or hookpoint; its numbers may not be comparable", other_run
        )
    for d in diffs:
        if d.within_noise:
            log.warning(
                "eval.compare: %s differs by %+.4f from %s, inside the reseed noise (95%% interval %+.4f .. %+.4f, "
                "std %.4f over %s seeds)", d.metric, d.diff, other_run, d.ci_low, d.ci_high, d.noise_std,
                "/".join(map(str, d.n_seeds)),
            )  # fmt: skip
    return NoiseRecord(
        record.seeds, record.sae_sha256, record.model_sha256, record.hookpoint, record.metrics,
        compared_with=other_run, compared_sae_sha256=other.sae_sha256, differences=tuple(diffs),
    )  # fmt: skip
