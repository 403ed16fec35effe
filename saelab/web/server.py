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

This module is the HTTP side; the pages are `saelab.web.pages` (routes and rendering), what they may read
`saelab.web.confine`, a broken artifact's line `saelab.web.diagnose`, and who is answered `saelab.web.access`.

    saelab serve runs/demo runs/other --port 8000
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import sys
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from saelab.web.access import Access, pop_token
from saelab.web.pages import Browser, Response

log = logging.getLogger(__name__)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; form-action 'self'"

LISTEN_BACKLOG = 1024
"""Connections the kernel holds for the accept loop (http.server's 5 drops the rest of a burst; clients retry
their SYN only after 1 s, 3 s, 7 s)."""
MAX_CONNECTIONS = 256
"""Connections served at once, a thread each; more wait in the listen queue."""
PAGE_WORKERS = 2
"""Pages computed at once. Connection threads queue their pages for these workers in arrival order: with a thread
per connection computing its own page, the GIL's handover starved some of 200 clients past 10 s (BENCHMARKS.md).
A page is mostly Python under the GIL (JSON, templates), so more workers only contend: 2 served 200 clients at
144 pages/s, 4 at 113, 8 at 101."""
IDLE_TIMEOUT_S = 30.0
"""A keep-alive connection silent this long is closed (and its thread ends)."""

_TOKEN = re.compile(r"(?<=token=)[^&\s]+")


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
        target, token = pop_token(self.path)
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
        """Set while a connection waits for a slot."""
        self.pages = ThreadPoolExecutor(page_workers, thread_name_prefix="saelab-page")
        """Computes the pages, first come first served."""
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
