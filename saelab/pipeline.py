"""The order of the stages over a run folder: each reads the previous stages' artifacts and writes its own.

`saelab demo` runs them all in one session (the subject model is loaded once); `saelab <stage> --run-dir R` runs
one on the artifacts already in R. Each stage, and the files it writes, belongs to its package:

    collect   saelab.activations.stage   data/windows.npz, activations/ (acts.safetensors or store/)
    train     saelab.train.stage         sae/ (cfg.json, sae.safetensors, train_log.jsonl), sae-variants/
    eval      saelab.eval.stage          eval/ (metrics.json; matched_l0.json, probing.json, absorption.json)
    cache     saelab.latents.stage       latents/ (cache.json, shards, tokens, statistics)
    sample    saelab.latents.stage       samples/samples.json
    explain   saelab.autointerp.stage    explain/explanations.jsonl, llm/cache.sqlite
    score     saelab.autointerp.stage    score/ (scores.jsonl, scores_summary.json)
    report    saelab.report.stage        report.md, report.html, plots/

The run folder's manifest (`saelab.run.manifest`) records every stage's config, time, memory, the sha256 of
each artifact and the stages it read; the run context is `saelab.run.session.Session`, opened by `stage_session`,
which holds the run's lock (`saelab.run.lock`) while a stage runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from saelab.activations.stage import stage_collect
from saelab.autointerp.stage import stage_explain, stage_score
from saelab.config import RunConfig
from saelab.eval.stage import stage_eval
from saelab.latents.stage import stage_cache, stage_sample
from saelab.report.stage import stage_report
from saelab.run.session import Session, open_session, stage_session
from saelab.train.stage import stage_train

log = logging.getLogger(__name__)

STAGES: dict[str, Callable[[Session], None]] = {
    "collect": stage_collect,
    "train": stage_train,
    "eval": stage_eval,
    "cache": stage_cache,
    "sample": stage_sample,
    "explain": stage_explain,
    "score": stage_score,
}
"""The stages in their order (the report comes last, through `stage_report`)."""

__all__ = ["STAGES", "Session", "open_session", "run_all", "stage_report", "stage_session"]


def run_all(cfg: RunConfig, force: bool = False) -> Path:
    """Every stage in order, then the report, holding the run's lock throughout; returns the report's path.
    `force`: collect again over a finished run (its later stages are dropped as each is run again)."""
    with stage_session(cfg, "collect", new=True, force=force) as s:
        for name, fn in STAGES.items():
            log.info("stage %s", name)
            s.announce(name)
            fn(s)
        s.announce("report")
        return stage_report(s)
