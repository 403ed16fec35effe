"""The explain and score stages: an explanation per studied latent and explainer, then each explanation scored
as a classifier of held-out examples.

Artifacts (relative to the run folder): `explain/explanations.jsonl` (`saelab.autointerp.explain`), `score/`
(`saelab.autointerp.score`), and `llm/cache.sqlite`, every LLM answer, so a rerun asks nothing twice.
"""

from __future__ import annotations

from typing import Any

from saelab.autointerp.llm.cache import CachedClient, ResponseCache
from saelab.autointerp.results import SCORE_DIR, SCORES_FILE, SUMMARY_FILE
from saelab.config import to_dict
from saelab.latents.sampling import SampleSet
from saelab.run.session import Session

LLM_CACHE = "llm/cache.sqlite"
EXPLAIN_READS = ("sample",)
SCORE_READS = ("sample", "explain")
"""The stages whose artifacts explain and score read."""


def _client(s: Session) -> Any:
    from saelab.autointerp.llm import make_client, run_sync

    cfg = s.cfg.llm
    shared = None
    if not cfg.url and cfg.local_model == s.cfg.model.name:
        shared = s.lm()  # the bundled chat model is the subject model: load it once
    client: Any = make_client(cfg, shared)
    client = CachedClient(client, ResponseCache(s.folder / LLM_CACHE) if cfg.cache else None)
    if hasattr(client, "check"):
        run_sync(client.check(), client)  # before any work: an unreachable server is one clear error
    return client


def _llm_counts(client: Any) -> dict[str, int]:
    """Real LLM requests, their tokens and the cache hits of a stage, for its manifest record."""
    if isinstance(client, CachedClient):
        return {
            "llm_calls": client.calls,
            "llm_cache_hits": client.hits,
            "llm_prompt_tokens": client.prompt_tokens,
            "llm_completion_tokens": client.completion_tokens,
        }
    return {}


def stage_explain(s: Session) -> None:
    from saelab.autointerp.explain import EXPLANATIONS, run_explain

    s.start("explain", EXPLAIN_READS)
    samples = SampleSet.load_run(s.folder)
    needs_llm = any(e != "token_stats" for e in s.cfg.explain.explainers)
    client = _client(s) if needs_llm else None
    config = {"explain": to_dict(s.cfg.explain), "llm": to_dict(s.cfg.llm)}
    with s.run.stage("explain", config, EXPLAIN_READS) as rec:
        (s.folder / EXPLANATIONS).parent.mkdir(exist_ok=True)
        records = run_explain(samples, s.cfg.explain, client, s.folder / EXPLANATIONS, s.cfg.llm.temperature)
        rec["outputs"].append(EXPLANATIONS)
        rec.update(
            n_explanations=len(records),
            n_failed=sum(not r.ok for r in records),
            n_failed_requests=sum(r.request_failed for r in records),
            model=getattr(client, "model_name", "none"),
            **_llm_counts(client),
        )


def stage_score(s: Session) -> None:
    from saelab.autointerp.explain import load_run_explanations
    from saelab.autointerp.score import run_score
    from saelab.autointerp.scorers import llm_scorers

    s.start("score", SCORE_READS)
    samples = SampleSet.load_run(s.folder)
    explanations = load_run_explanations(s.folder)
    needs_llm = any(x in llm_scorers() for x in s.cfg.score.scorers)
    client = _client(s) if needs_llm else None
    with s.run.stage("score", {"score": to_dict(s.cfg.score), "llm": to_dict(s.cfg.llm)}, SCORE_READS) as rec:
        out = s.folder / SCORE_DIR
        out.mkdir(exist_ok=True)
        summary = run_score(samples, explanations, s.cfg.score, client, out, s.cfg.seed)
        rec.update(summary.failures())
        rec["outputs"] += [f"{SCORE_DIR}/{SCORES_FILE}", f"{SCORE_DIR}/{SUMMARY_FILE}"]
        rec["model"] = getattr(client, "model_name", "none")
        rec.update(_llm_counts(client))
