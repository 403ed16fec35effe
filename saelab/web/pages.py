"""The feature browser's pages: the served runs by name, the route of a request's path, and each page rendered
from its run's data (`saelab.web.data`) through the templates (`saelab.web.templates`).

`Browser.handle(target)` answers a GET of a path and query with a `Response`; it knows nothing of HTTP
connections, which `saelab.web.server` serves. Before a run's page, the artifacts it reads are checked to stay in
the run folder (`saelab.web.confine`); a page that fails on an unreadable artifact names it
(`saelab.web.diagnose`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import numpy as np

from saelab.autointerp.explain import EXPLANATIONS
from saelab.autointerp.results import SCORE_DIR, SUMMARY_FILE
from saelab.latents.cache import LATENTS, CacheError
from saelab.latents.sampling import SAMPLES, Example
from saelab.web.confine import Refused, link_out, read_inside
from saelab.web.data import (
    LIST_METRICS,
    METRIC,
    REPORT,
    SAE_WEIGHTS,
    SCORES,
    RunData,
    ScoreResult,
)
from saelab.web.diagnose import signature, unreadable
from saelab.web.listing import FIXED_SORTS, ListQuery, QueryError, models, run_query
from saelab.web.templates import environment

log = logging.getLogger(__name__)

METRIC_NAMES = ("f1", "precision", "recall", "balanced_accuracy", "auc", "correlation", "n_pos", "n_neg")
COMPARE_ROWS = 1000
HIST_W, HIST_H = 480, 120

RUN_DATA = tuple(
    sorted(
        {
            rel.split("/")[0]
            for rel in (LATENTS, EXPLANATIONS, SCORES, f"{SCORE_DIR}/{SUMMARY_FILE}", SAMPLES, SAE_WEIGHTS)
        }
    )
)
"""The top-level entries of a run folder that RunData reads, checked with everything under them before a run's
data pages (the report route checks report.html alone)."""


class NotFound(Exception):
    """Answered with 404 and the message."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _judge(score: ScoreResult, ex: Example) -> tuple[str, str]:
    """(correct | incorrect | failed | not scored, hover text) of one scorer on one example."""
    p = score.predictions.get(ex.example_id)
    if p is None:
        return "not scored", ""
    if p["pred"] is None:
        return "failed", "the judgement failed"
    verdict = "correct" if p["pred"] == p["label"] else "incorrect"
    s = "" if p["score"] is None else f", score {p['score']:.3f}"
    return verdict, f"predicted {p['pred']}, label {p['label']}{s}"


class Browser:
    """The app: served runs by name, and the page for each route."""

    def __init__(self, folders: list[Path]) -> None:
        self.runs: dict[str, RunData] = {}
        for folder in folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a run folder")
            name, i = folder.resolve().name, 2
            while name in self.runs:
                name, i = f"{folder.resolve().name}-{i}", i + 1
            self.runs[name] = RunData(name, folder.resolve())
        self.env = environment()
        self._diagnosed: dict[str, tuple[tuple[Any, ...], list[str]]] = {}
        """By run: (its artifacts' stat signature, `unreadable` of it), so a broken run is read whole once."""
        self._diagnose_lock = threading.Lock()

    def run(self, name: str, reads: tuple[str, ...] = RUN_DATA) -> RunData:
        """The served run `name`, once its entries `reads` are checked to stay inside its folder."""
        if name not in self.runs:
            raise NotFound(f"no served run is named {name!r}")
        run = self.runs[name]
        out = link_out(run.folder, reads)
        if out is not None:
            log.warning(
                "refused: %s of run %s leads to %s, outside the run folder %s",
                out[0],
                name,
                out[1],
                run.folder,
            )
            raise Refused(
                f"run {name}: {out[0]} is a link leading out of the run folder; the browser reads nothing outside "
                "a served run folder (copy the file into the run, or serve the run it belongs to)"
            )
        return run

    def unreadable(self, name: str) -> list[str]:
        """`unreadable` of a served run, read again only when one of its artifacts has changed."""
        run = self.runs[name]
        with self._diagnose_lock:
            sig = signature(run.folder)
            cached = self._diagnosed.get(name)
            if cached is None or cached[0] != sig:
                cached = self._diagnosed[name] = (sig, unreadable(run.folder))
            return cached[1]

    def handle(self, target: str) -> Response:
        """The response to a GET of `target` (path and query)."""
        parts = urlsplit(target)
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        if any(s in (".", "..") or "/" in s or "\\" in s or "\0" in s for s in segments):
            return self.error(HTTPStatus.BAD_REQUEST, "bad path")
        if segments and segments[-1] == "":
            segments = segments[:-1]
        params = dict(parse_qsl(parts.query))
        try:
            return self.route(segments, params)
        except NotFound as err:
            return self.error(HTTPStatus.NOT_FOUND, str(err))
        except QueryError as err:
            return self.error(HTTPStatus.BAD_REQUEST, str(err))
        except CacheError as err:
            return self.error(HTTPStatus.NOT_FOUND, str(err))
        except Refused as err:
            return self.error(HTTPStatus.FORBIDDEN, str(err))
        except Exception:  # a broken artifact answers 500 with no traceback; the log has it
            log.exception("error answering %s", target)
            return self.failed(segments)

    def failed(self, segments: list[str]) -> Response:
        """The 500 page of a page that raised: which artifact of which run is unreadable, when that is why."""
        names = (
            segments[1:2] if segments[:1] == ["run"] else segments[1:3] if segments[:1] == ["compare"] else []
        )
        broken = [(n, line) for n in dict.fromkeys(names) if n in self.runs for line in self.unreadable(n)]
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        if not broken:
            return self.error(status, "the page failed; the server's log says why")
        runs = ", ".join(dict.fromkeys(f"{n} ({self.runs[n].folder})" for n, _ in broken))
        return self.render(
            "error",
            status=int(status),
            heading=f"{int(status)}: an artifact of run {broken[0][0]} is unreadable",
            message=f"This page reads files of {runs} that cannot be read. The other pages and runs are still "
            "served; the server's log says why in full.",
            items=[f"{n}: {line}" for n, line in broken],
        )

    def route(self, seg: list[str], params: dict[str, str]) -> Response:
        match seg:
            case []:
                return self.render("index", runs=list(self.runs.values()))
            case ["run", name]:
                return self.latent_list(self.run(name), params)
            case ["run", name, "latent", latent] if _is_id(latent):
                return self.latent_page(self.run(name), int(latent))
            case ["run", name, "report"]:
                run = self.run(name, (REPORT,))
                body = read_inside(run.folder, REPORT) if "report" in run.recorded() else None
                if body is None:
                    raise NotFound(f"{name} has no report.html; run `saelab report --run-dir RUN`")
                return Response(200, body)
            case ["compare", a, b]:
                metric = params.get("metric", "") or METRIC
                if metric not in LIST_METRICS:
                    raise QueryError(f"unknown metric {metric!r}")
                return self.compare(self.run(a), self.run(b), metric)
            case ["compare", a, b, "latent", latent] if _is_id(latent):
                return self.compare_latent(self.run(a), self.run(b), int(latent))
        raise NotFound("no such page")

    def render(self, template: str, status: int = 200, **ctx: Any) -> Response:
        html = self.env.get_template(template).render(**ctx)
        return Response(status, html.encode("utf-8"))

    def error(self, status: HTTPStatus, message: str) -> Response:
        return self.render(
            "error", status=int(status), heading=f"{int(status)} {status.phrase}", message=message
        )

    def latent_list(self, run: RunData, params: dict[str, str]) -> Response:
        score_keys = sorted(run.index.metrics())
        query = ListQuery.parse(params, score_keys)
        result = run_query(run, query)
        base = {k: v for k, v in params.items() if v != "" and k != "page"}

        def sort_link(key: str) -> str:
            order = "asc" if query.sort == key and query.desc else "desc"
            order = "asc" if key == "latent" and query.sort != key else order
            return "?" + urlencode({**base, "sort": key, "order": order})

        def page_link(page: int) -> str:
            return "?" + urlencode({**base, "page": str(page)})

        columns = [(k, k.replace("_", " ")) for k in FIXED_SORTS] + [
            (k, f"{query.metric} {k}") for k in score_keys
        ]
        return self.render(
            "list",
            run=run,
            query=query,
            result=result,
            models=models(run),
            score_keys=score_keys,
            columns=columns,
            metrics=LIST_METRICS,
            sort_link=sort_link,
            page_link=page_link,
        )

    def latent_page(self, run: RunData, latent: int) -> Response:
        try:
            page = run.page(latent)
        except KeyError:
            raise NotFound(f"{run.name} has {run.d_sae} latents; {latent} is not one") from None
        counts, edges = page.histogram
        bars = []
        if len(counts):
            top, width = max(int(counts.max()), 1), HIST_W / len(counts)
            for i, c in enumerate(counts):
                h = HIST_H * np.log1p(c) / np.log1p(top)
                bars.append(
                    {
                        "x": f"{i * width:.1f}",
                        "y": f"{HIST_H - h:.1f}",
                        "w": f"{max(width - 1, 1):.1f}",
                        "h": f"{h:.1f}",
                        "title": f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)} tokens",
                    }
                )
        ex = page.examples
        scoring = [(e, 1) for e in ex.test_pos] + [(e, 0) for e in ex.test_neg] if ex else []
        return self.render(
            "latent",
            run=run,
            p=page,
            ex=ex,
            scoring=scoring,
            bars=bars,
            hist_w=HIST_W,
            hist_h=HIST_H,
            hist_lo=float(edges[0]),
            hist_hi=float(edges[-1]),
            metric_names=METRIC_NAMES,
            fmt=_fmt,
            judge=_judge,
            explanations=lambda n: [r for r in run.index.explanations.get(n, []) if r.explanation],
        )

    def compare(self, a: RunData, b: RunData, metric: str) -> Response:
        ia, ib = a.index, b.index
        common = sorted(set(ia.explanations) & set(ib.explanations))
        ma, mb = ia.metrics(metric), ib.metrics(metric)
        keys = sorted(set(ma) & set(mb))
        diff = {k: mb[k] - ma[k] for k in keys}  # NaN where either run lacks the score
        rows = []
        for latent in common[:COMPARE_ROWS]:
            sa = {k: _value(ma[k], latent) for k in keys}
            sb = {k: _value(mb[k], latent) for k in keys}
            delta = {k: _value(diff[k], latent) for k in keys}
            rows.append(
                {
                    "latent": latent,
                    "a": [e for e in ia.explanations[latent] if e.explanation],
                    "b": [e for e in ib.explanations[latent] if e.explanation],
                    "sa": sa,
                    "sb": sb,
                    "delta": delta,
                }
            )
        same = a.cache.info.sae_sha256 == b.cache.info.sae_sha256
        return self.render(
            "compare",
            a=a,
            b=b,
            common=common,
            rows=rows,
            truncated=len(common) > COMPARE_ROWS,
            keys=keys,
            metric=metric,
            same_sae=same,
            fmt=_fmt,
        )

    def compare_latent(self, a: RunData, b: RunData, latent: int) -> Response:
        try:
            sides = [(a, a.page(latent)), (b, b.page(latent))]
        except KeyError:
            raise NotFound(f"latent {latent} is not in both runs") from None
        return self.render(
            "compare_latent",
            a=a,
            b=b,
            latent=latent,
            sides=sides,
            same_sae=a.cache.info.sae_sha256 == b.cache.info.sae_sha256,
            metric_names=METRIC_NAMES,
            fmt=_fmt,
        )


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 12


def _value(col: np.ndarray, latent: int) -> float | None:
    v = float(col[latent])
    return None if math.isnan(v) else v
