"""The latent list: filter, sort and paginate a run's latents on the server (numpy over the run's index)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from saelab.web.data import LIST_METRICS, METRIC, RunData

PER_PAGE = 50
MAX_PER_PAGE = 500
FIXED_SORTS = ("latent", "frequency", "max_act")


class QueryError(ValueError):
    """A list query parameter is malformed (answered with 400)."""


def _float(params: dict[str, str], name: str) -> float | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise QueryError(f"{name} must be finite")
    return value


def _int(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise QueryError(f"{name} must be a whole number, not {raw!r}")
    return max(lo, min(hi, int(raw)))


@dataclass(frozen=True)
class ListQuery:
    """The list page's query string, validated."""

    q: str = ""
    """Case-insensitive substring of any of the latent's explanations."""
    model: str = ""
    """Only latents explained by this explainer model."""
    sort: str = "latent"
    """`latent`, `frequency`, `max_act`, or a score key `explainer/scorer`."""
    desc: bool = False
    freq_min: float | None = None
    freq_max: float | None = None
    act_min: float | None = None
    act_max: float | None = None
    metric: str = METRIC
    """The metric shown, sorted and filtered by for every score (one of LIST_METRICS)."""
    score_key: str = ""
    """The score the `score_min` / `score_max` bounds apply to."""
    score_min: float | None = None
    score_max: float | None = None
    explained: bool = False
    """Only latents with an explanation."""
    page: int = 1
    per_page: int = PER_PAGE

    @classmethod
    def parse(cls, params: dict[str, str], score_keys: list[str]) -> ListQuery:
        sort = params.get("sort", "latent") or "latent"
        if sort not in FIXED_SORTS and sort not in score_keys:
            raise QueryError(f"unknown sort {sort!r}")
        score_key = params.get("score_key", "")
        if score_key and score_key not in score_keys:
            raise QueryError(f"unknown score {score_key!r}")
        metric = params.get("metric", "") or METRIC
        if metric not in LIST_METRICS:
            raise QueryError(f"unknown metric {metric!r}; known: {', '.join(LIST_METRICS)}")
        return cls(
            metric=metric,
            q=params.get("q", "").strip()[:200],
            model=params.get("model", "").strip(),
            sort=sort,
            desc=params.get("order", "asc") == "desc",
            freq_min=_float(params, "freq_min"),
            freq_max=_float(params, "freq_max"),
            act_min=_float(params, "act_min"),
            act_max=_float(params, "act_max"),
            score_key=score_key,
            score_min=_float(params, "score_min"),
            score_max=_float(params, "score_max"),
            explained=params.get("explained", "") in ("1", "on", "true"),
            page=_int(params, "page", 1, 1, 10**9),
            per_page=_int(params, "per_page", PER_PAGE, 1, MAX_PER_PAGE),
        )


@dataclass(frozen=True)
class ListResult:
    rows: list[dict[str, Any]]
    total: int
    """Latents matching the filters (all pages)."""
    pages: int


def _bounds(keep: np.ndarray, values: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    if lo is not None:
        keep &= values >= lo
    if hi is not None:
        keep &= values <= hi
    return keep


def run_query(run: RunData, query: ListQuery) -> ListResult:
    idx = run.index
    keep = np.ones(run.d_sae, dtype=bool)
    keep = _bounds(keep, idx.frequency, query.freq_min, query.freq_max)
    keep = _bounds(keep, idx.max_act, query.act_min, query.act_max)
    if query.score_key:
        col = idx.metrics(query.metric)[query.score_key]
        keep = _bounds(keep & ~np.isnan(col), col, query.score_min, query.score_max)
    if query.q or query.model or query.explained:
        needle = query.q.lower()
        ok = np.zeros_like(keep)
        for latent, recs in idx.explanations.items():
            ok[latent] = any(
                r.explanation is not None
                and (not needle or needle in r.explanation.lower())
                and (not query.model or r.model == query.model)
                for r in recs
            )
        keep &= ok
    ids = np.flatnonzero(keep)
    ids = ids[_order(run, ids, query)]
    pages = max(1, math.ceil(len(ids) / query.per_page))
    start = (query.page - 1) * query.per_page
    rows = [_row(run, int(i), query.metric) for i in ids[start : start + query.per_page]]
    return ListResult(rows, len(ids), pages)


def _order(run: RunData, ids: np.ndarray, query: ListQuery) -> np.ndarray:
    """Positions sorting `ids` by the query's key; missing scores (NaN) always last, ties by latent id."""
    idx = run.index
    if query.sort == "latent":
        order = np.argsort(ids, kind="stable")
        return order[::-1] if query.desc else order
    col = {"frequency": idx.frequency, "max_act": idx.max_act}.get(query.sort)
    values = np.asarray(col if col is not None else idx.metrics(query.metric)[query.sort], dtype=np.float64)[
        ids
    ]
    key = -values if query.desc else values
    missing = np.isnan(key)
    return np.lexsort((ids, np.where(missing, 0.0, key), missing))  # the last key sorts first


def _row(run: RunData, latent: int, metric: str) -> dict[str, Any]:
    idx = run.index
    return {
        "latent": latent,
        "frequency": float(idx.frequency[latent]),
        "max_act": float(idx.max_act[latent]),
        "explanations": [r for r in idx.explanations.get(latent, []) if r.explanation is not None],
        "scores": {
            k: (None if np.isnan(col[latent]) else float(col[latent]))
            for k, col in idx.metrics(metric).items()
        },
    }


def models(run: RunData) -> list[str]:
    """Explainer models of the run's explanations."""
    return sorted({r.model for recs in run.index.explanations.values() for r in recs})
