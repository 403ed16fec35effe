"""`saelab serve RUN [RUN ...]`: the feature browser, a local web app over run folders.

Routes (nothing else is served; no path from a request ever reaches the file system):

    /                               the served runs
    /run/NAME/                      latent list: ?q= &model= &sort= &order= &freq_min= ... &page=
    /run/NAME/latent/F              one latent: explanations, scores, histogram, examples, nearest latents
    /run/NAME/report                the run's own report.html
    /compare/NAME_A/NAME_B          two runs side by side on the latents both explained
    /compare/NAME_A/NAME_B/latent/F one latent in both runs side by side

NAME is a served run's folder name. What a page may read of a run is confined to the run folder (resolved once,
at start): before each page, the artifacts it reads are checked for symbolic links leading out of it, and a page
that would read through one is refused (403, and a line in the log). All run data is HTML-escaped and every page
is sent with a Content-Security-Policy that allows no script. An artifact that its stage's loader cannot read
answers a page naming it and the command that writes it again; the other pages and runs keep being served.

Who is answered: binds to 127.0.0.1 unless --host says otherwise. Every request's Host header must name this
server (the address it was reached on, the bound address, this machine's names; `localhost` over loopback), so a
page elsewhere whose own name resolves here (DNS rebinding) reads nothing. Bound to any other address, the server
logs a warning naming the runs it exposes and where, and requires a random token (as Jupyter does): the URL it
prints carries `?token=`, which the first request trades for a cookie.

The HTTP side is http.server's threaded server with a listen queue of 1024 (its default of 5 drops simultaneous
connections), HTTP/1.1 keep-alive, and at most 256 connections served at once; while more wait, connections close
after their current response so that the waiting ones get a turn. Each connection's thread hands its pages to a
small pool of page workers, first come first served, so that no client starves under load.

    saelab serve runs/demo runs/other --port 8000
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import socket
import stat
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import numpy as np

from saelab.autointerp.explain import EXPLANATIONS, load_explanations
from saelab.autointerp.results import SCORE_DIR, SUMMARY_FILE
from saelab.latents.cache import LATENTS, CacheError, LatentCache
from saelab.latents.sampling import SAMPLES, Example, SampleSet
from saelab.web.data import (
    LIST_METRICS,
    METRIC,
    REPORT,
    SAE_WEIGHTS,
    SCORES,
    RunData,
    ScoreResult,
)
from saelab.web.listing import FIXED_SORTS, ListQuery, QueryError, models, run_query
from saelab.web.templates import environment

log = logging.getLogger(__name__)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; form-action 'self'"
METRIC_NAMES = ("f1", "precision", "recall", "balanced_accuracy", "auc", "correlation", "n_pos", "n_neg")
COMPARE_ROWS = 1000
HIST_W, HIST_H = 480, 120

LISTEN_BACKLOG = 1024
"""Connections the kernel holds for the accept loop (http.server's 5 drops the rest of a burst; clients retry
their SYN only after 1 s, 3 s, 7 s)."""
MAX_CONNECTIONS = 256
PAGE_WORKERS = 2
"""Pages computed at once. Connection threads queue their pages for these workers in arrival order: with a thread
per connection computing its own page, the GIL's handover starved some of 200 clients past 10 s (BENCHMARKS.md).
A page is mostly Python under the GIL (JSON, templates), so more workers only contend: 2 served 200 clients at
144 pages/s, 4 at 113, 8 at 101."""
"""Connections served at once, a thread each; more wait in the listen queue."""
IDLE_TIMEOUT_S = 30.0
"""A keep-alive connection silent this long is closed (and its thread ends)."""

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


class Refused(Exception):
    """A file a page would read leads out of its run folder: answered with 403 and the message."""


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


# ------------------------------------------------------------------------- confinement to the run folder


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def link_out(root: Path, tops: tuple[str, ...]) -> tuple[str, str] | None:
    """(path relative to `root` as a page would read it, where it leads) of the first entry at or under
    `root/top` (each of `tops`) whose real path is outside `root`: a symbolic link out, or one inside a linked
    folder. None when all stay inside. Regular files in real folders are inside by construction, so only links
    cost a realpath."""
    base = str(root)
    seen: set[str] = set()

    def link(path: str, rel: str) -> tuple[str, str] | None:
        real = os.path.realpath(path)
        if not _within(real, base):
            return rel, real
        return folder(real, rel) if os.path.isdir(real) else None

    def folder(real: str, rel: str) -> tuple[str, str] | None:
        if real in seen:
            return None
        seen.add(real)
        with os.scandir(real) as entries:
            for e in entries:
                if e.is_symlink():
                    found = link(e.path, os.path.join(rel, e.name))
                elif e.is_dir(follow_symlinks=False):
                    found = folder(e.path, os.path.join(rel, e.name))
                else:
                    continue
                if found is not None:
                    return found
        return None

    for top in tops:  # `root` is a real path (resolved at start): only a link costs a realpath
        path = os.path.join(base, top)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or os.sep in top:  # a nested top may lie in a linked folder
            found = link(path, top)
        else:
            found = folder(path, top) if stat.S_ISDIR(mode) else None
        if found is not None:
            return found
    return None


def _read_inside(root: Path, rel: str) -> bytes | None:
    """The bytes of the regular file `root/rel` (checked by `link_out` just before), or None when there is none;
    opened by its real path with O_NOFOLLOW, so that a link put in its place since is not followed."""
    real = os.path.realpath(root / rel)
    if not _within(real, str(root)):
        raise Refused(f"{rel} leads out of the run folder")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise Refused(f"{rel} cannot be opened ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read()


# ---------------------------------------------------------------------------- naming a broken artifact


def _read_jsonl(path: Path) -> None:
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    raise ValueError(f"line {n}: {err}") from None


def _read_cache(path: Path) -> None:
    cache = LatentCache.open(path)
    for shard in cache.info.shards:
        if shard.end > shard.start:
            cache.latent(shard.start)


def _read_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        fh.keys()


@dataclass(frozen=True)
class Artifact:
    """A run artifact the browser reads, and how to tell that it is unreadable."""

    rel: str
    """Its path in the run folder."""
    stage: str
    """The saelab command that writes it."""
    read: Callable[[Path], object]
    """Reads it whole, with its owner's loader where there is one; raises when it is unreadable."""


ARTIFACTS = (
    Artifact(EXPLANATIONS, "explain", load_explanations),
    Artifact(SCORES, "score", _read_jsonl),
    Artifact(SAMPLES, "sample", SampleSet.load),
    Artifact(LATENTS, "cache", _read_cache),
    Artifact(SAE_WEIGHTS, "train", _read_safetensors),
)


def _signature(folder: Path) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for a in ARTIFACTS:
        try:
            st = os.stat(folder / a.rel)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def unreadable(folder: Path) -> list[str]:
    """One line for each of the run's artifacts that cannot be read, naming the command that writes it again."""
    found = []
    for a in ARTIFACTS:
        path = folder / a.rel
        if not path.exists():
            continue
        try:
            a.read(path)
        except Exception as err:  # whatever the loader raises: the page names it, the log has the traceback
            why = f"{type(err).__name__}: {err}"
            found.append(
                f"{a.rel} is unreadable ({why[:300]}); rerun `saelab {a.stage} --run-dir "
                f"{shlex.quote(str(folder))}` to write it again (and the stages after it that you use)"
            )
    return found


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
            sig = _signature(run.folder)
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
                body = _read_inside(self.run(name, (REPORT,)).folder, REPORT)
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


# ---------------------------------------------------------------------------------- who is answered

_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")
_TOKEN = re.compile(r"(?<=token=)[^&\s]+")


@dataclass(frozen=True)
class Access:
    """Which requests the server answers: those naming it in their Host header, and off loopback those carrying
    its token."""

    bound: str
    """The bound IP address."""
    port: int
    names: frozenset[str]
    """Host names answered (lower case) besides IP addresses: this machine's names, off loopback."""
    token: str | None = None
    """Required as ?token= (then the cookie it sets), or None (a loopback bind, or --no-token)."""

    @classmethod
    def for_bind(cls, host: str, bound: str, port: int, token: bool) -> Access:
        if host == "localhost" or ipaddress.ip_address(bound).is_loopback:
            return cls(bound, port, frozenset())
        names = {socket.gethostname(), socket.getfqdn()} | ({host} if not _is_ip(host) else set())
        secret = secrets.token_urlsafe(24) if token else None
        return cls(bound, port, frozenset(n.lower() for n in names if n), secret)

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.bound).is_loopback

    def host_ok(self, header: str, local: str) -> bool:
        """Whether `header` (a request's Host, which reached us on address `local`) names this server: a page
        whose own name resolves here (DNS rebinding) sends its own name and is refused."""
        m = _HOST.fullmatch(header.strip().lower())
        if m is None or int(m.group(2) or 80) != self.port:
            return False
        name = m.group(1).strip("[]")
        if name in self.names:
            return True
        here = ipaddress.ip_address(local)
        if name == "localhost":
            return here.is_loopback
        return _is_ip(name) and ipaddress.ip_address(name) in (here, ipaddress.ip_address(self.bound))

    @property
    def cookie_name(self) -> str:
        return f"saelab-token-{self.port}"  # cookies are per host, not per port: one per server

    def token_ok(self, given: str | None) -> bool:
        return self.token is not None and given is not None and hmac.compare_digest(given, self.token)

    def cookie_ok(self, header: str | None) -> bool:
        try:
            morsel = SimpleCookie(header or "").get(self.cookie_name)
        except CookieError:
            return False
        return morsel is not None and self.token_ok(morsel.value)

    def set_cookie(self) -> str:
        return f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pop_token(target: str) -> tuple[str, str | None]:
    """(target without its `token` parameter, the token or None)."""
    parts = urlsplit(target)
    params = parse_qsl(parts.query, keep_blank_values=True)
    tokens = [v for k, v in params if k == "token"]
    if not tokens:
        return target, None
    query = urlencode([(k, v) for k, v in params if k != "token"])
    return (parts.path or "/") + (f"?{query}" if query else ""), tokens[-1]


# ------------------------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, each request checked by the server's Access, then the Browser."""

    server_version = "saelab"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # or a body written after its headers waits for the client's delayed ACK

    def do_GET(self) -> None:
        self._send(self._answer(), body=True)

    def do_HEAD(self) -> None:
        self._send(self._answer(), body=False)

    def _answer(self) -> Response:
        server = cast(BrowserServer, self.server)
        access, app = server.access, server.app
        if not access.host_ok(self.headers.get("Host") or "", str(self.connection.getsockname()[0])):
            return app.error(
                HTTPStatus.MISDIRECTED_REQUEST,
                "this server answers only requests that name it (its address or this machine's name)",
            )
        target, token = _pop_token(self.path)
        if access.token is not None:
            if access.token_ok(
                token
            ):  # the printed URL: the token becomes a cookie, the address bar loses it
                return Response(303, b"", headers=(("Location", target), ("Set-Cookie", access.set_cookie())))
            if not access.cookie_ok(self.headers.get("Cookie")):
                return app.error(
                    HTTPStatus.FORBIDDEN,
                    "this server needs its token: open the URL that `saelab serve` printed (it ends in ?token=)",
                )
        try:
            return server.pages.submit(app.handle, target).result()
        except (CancelledError, RuntimeError):  # the server is closing
            return app.error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping")

    def _send(self, r: Response, body: bool) -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in r.headers:
            self.send_header(key, value)
        unread_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if cast(BrowserServer, self.server).waiting.is_set() or unread_body:
            self.send_header("Connection", "close")  # a waiting connection gets this one's turn
        self.end_headers()
        if body:
            self.wfile.write(r.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), _TOKEN.sub("…", format % args))


class BrowserServer(ThreadingHTTPServer):
    """The browser's HTTP server: a thread per connection, at most `max_connections` at once (the accept loop
    waits for a free one, the kernel queueing up to LISTEN_BACKLOG more); while it waits, connections close after
    their current response, so keep-alive clients cannot starve new ones."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    block_on_close = False  # server_close does not wait for idle keep-alive connections

    def __init__(
        self,
        host: str,
        port: int,
        app: Browser,
        token: bool = True,
        handler: type[BaseHTTPRequestHandler] = Handler,
        max_connections: int = MAX_CONNECTIONS,
        page_workers: int = PAGE_WORKERS,
    ) -> None:
        self.app = app
        self.slots = threading.BoundedSemaphore(max_connections)
        self.waiting = threading.Event()
        self.pages = ThreadPoolExecutor(page_workers, thread_name_prefix="saelab-page")
        """Computes the pages, first come first served."""
        """Set while a connection waits for a slot."""
        super().__init__((host, port), handler)
        bound, bound_port = str(self.server_address[0]), int(self.server_address[1])
        self.access = Access.for_bind(host, bound, bound_port, token)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        # Pages run in parallel threads, and numpy's OpenBLAS, called from many threads at once with a thread pool
        # of its own, spins on its lock: 50 clients got 2 pages/s where one client got 14 (BENCHMARKS.md). One
        # BLAS thread per call (the nearest latents' matrix-vector product) while serving; threadpoolctl comes
        # with scikit-learn, a dependency.
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            super().serve_forever(poll_interval)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.waiting.set()
            got = self.slots.acquire(timeout=IDLE_TIMEOUT_S)
            self.waiting.clear()
            if not got:
                log.warning("no connection slot freed in %.0f s; closing a new connection", IDLE_TIMEOUT_S)
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_close(self) -> None:
        super().server_close()
        self.pages.shutdown(wait=False, cancel_futures=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):  # the client left or went silent
            log.debug("connection from %s: %r", client_address[0], err)
        else:
            log.exception("error on the connection from %s", client_address[0])


def make_server(
    folders: list[Path], host: str = "127.0.0.1", port: int = 0, token: bool = True
) -> BrowserServer:
    """A server for `folders` bound to (host, port); port 0 picks a free one (`server.server_address`). Off
    loopback it logs a warning naming what it exposes, and (unless `token` is False) requires a token."""
    server = BrowserServer(host, port, Browser(folders), token)
    if not server.access.loopback:
        log.warning("%s", exposure(server))
    return server


def exposure(server: BrowserServer) -> str:
    """The warning for a bind off loopback: which runs are readable, from where, by whom."""
    a = server.access
    where = (
        "every network address of this machine" if ipaddress.ip_address(a.bound).is_unspecified else a.bound
    )
    who = "with the token in the URL printed below" if a.token else "(no token: --no-token)"
    runs = ", ".join(f"{r.name} ({r.folder})" for r in server.app.runs.values())
    return (
        f"WARNING: saelab serve listens on {a.bound} port {a.port} ({where}), not only on this machine: anyone "
        f"who can reach it {who} can read the runs {runs} (their latents, examples, explanations, scores and "
        "reports). Leave out --host (127.0.0.1) to keep them on this machine."
    )


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = str(host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def server_urls(server: BrowserServer) -> list[str]:
    """The URLs to open, with ?token= where one is needed; on 0.0.0.0, by this machine's name and by loopback."""
    a = server.access
    query = f"?token={a.token}" if a.token else ""
    if ipaddress.ip_address(a.bound).is_unspecified:
        return [f"http://{socket.gethostname()}:{a.port}/{query}", f"http://127.0.0.1:{a.port}/{query}"]
    return [url_of(server) + query]


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
