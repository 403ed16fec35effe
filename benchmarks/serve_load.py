"""Feature browser under load: many concurrent clients on the 50k-latent run of serve_latency.py, over loopback.

    .venv/bin/python benchmarks/serve_load.py [--clients 1 50 200] [--seconds 10] [--out benchmarks/results/serve_load.json]

The run is serve_latency.py's (`write_run`: 50,000 latents, 5,000 with examples, explanations and scores). The
server runs in a thread of this process, warmed up (the run's index and the decoder's row norms built); the load
comes from another process (spawned, so it shares no GIL with the server): one asyncio task per client on a
connection of its own, asking for the next page as soon as the last one is answered (keep-alive, reconnecting
when the server closes), for `--seconds`. The pages cycle through a fixed mix: half latent pages of random latents,
a quarter latent pages of sampled latents (examples, explanations, scores), a quarter list pages (sorted by a
score, searched, filtered, page 500). A request unanswered after `--timeout` s is an error, as is a refused or
reset connection or a status other than 200.

Each load runs against saelab's server and, for contrast, against the same app on http.server's defaults as
`saelab serve` ran before (a listen queue of 5, HTTP/1.0 so a connection per request, a thread per connection
computing its own page), in the same run. `--page-workers 2 4 8` compares saelab's page pool sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")


async def _request(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, port: int, path: str
) -> tuple[int, bool, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """(status, whether the server keeps the connection open, the connection) of one GET."""
    reader, writer = conn if conn is not None else await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    version, status = head.split(maxsplit=2)[:2]
    length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
    await reader.readexactly(length)
    keep = version == "http/1.1" and "connection: close" not in head
    return int(status), keep, (reader, writer)


async def _client(
    port: int, paths: list[str], offset: int, until: float, timeout: float, out: dict[str, Any]
) -> None:
    conn = None
    i = offset
    while time.monotonic() < until:
        path = paths[i % len(paths)]
        i += 1
        start = time.monotonic()
        try:
            status, keep, conn = await asyncio.wait_for(_request(conn, port, path), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            out["timeouts"] += 1
            conn = _close(conn)
            continue
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
            out["connection_errors"] += 1
            out["last_error"] = repr(err)
            conn = _close(conn)
            await asyncio.sleep(0.05)
            continue
        done = time.monotonic()
        if status != 200:
            out["bad_status"] += 1
        out["latencies"].append(done - start)
        if done <= until:
            out["answered_in_window"] += 1
        if not keep:
            conn = _close(conn)
    _close(conn)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> Any:
    """None, having closed `conn`."""
    if conn is not None:
        conn[1].close()
    return None


async def _load(port: int, paths: list[str], clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "latencies": [],
        "answered_in_window": 0,
        "timeouts": 0,
        "connection_errors": 0,
        "bad_status": 0,
        "last_error": None,
    }
    until = time.monotonic() + seconds
    step = max(1, len(paths) // clients)
    await asyncio.gather(*(_client(port, paths, c * step, until, timeout, out) for c in range(clients)))
    return out


def load_process(
    port: int, paths: list[str], clients: int, seconds: float, timeout: float, queue: Any
) -> None:
    """The load generator (a process of its own)."""
    queue.put(asyncio.run(_load(port, paths, clients, seconds, timeout)))


def summary(raw: dict[str, Any], clients: int, seconds: float) -> dict[str, Any]:
    lat = sorted(raw["latencies"])
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1) if lat else None  # noqa: E731
    errors = raw["timeouts"] + raw["connection_errors"] + raw["bad_status"]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests_per_s": round(raw["answered_in_window"] / seconds, 1),
        "answered": len(lat),
        "p50_ms": round(statistics.median(lat) * 1e3, 1) if lat else None,
        "p99_ms": pick(0.99),
        "max_ms": round(lat[-1] * 1e3, 1) if lat else None,
        "errors": errors,
        "timeouts": raw["timeouts"],
        "connection_errors": raw["connection_errors"],
        "bad_status": raw["bad_status"],
        "last_error": raw["last_error"],
    }


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    import torch
    from machine import machine_facts
    from serve_latency import timed_get, write_run

    from saelab.web.server import PAGE_WORKERS, Browser, BrowserServer, Handler, serve_in_thread, url_of

    class StdlibDefaults(BrowserServer):
        """The app on http.server's defaults, as `saelab serve` ran before."""

        request_queue_size = 5

    class Http10(Handler):
        protocol_version = "HTTP/1.0"

    p = argparse.ArgumentParser()
    p.add_argument("--d-sae", type=int, default=50_000)
    p.add_argument("--sampled", type=int, default=5000)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 50, 200])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--servers", nargs="+", default=["saelab", "stdlib-defaults"])
    p.add_argument(
        "--page-workers", type=int, nargs="+", default=[PAGE_WORKERS], help="saelab's, one run each"
    )
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        chosen = write_run(folder, 256, args.d_sae, 32, 16_384, args.sampled)
        rng = np.random.default_rng(3)
        lists = [
            "?sort=default/detection&order=desc",
            "?q=river",
            "?freq_min=0.001&sort=max_act&order=desc",
            "?page=500",
        ]
        paths = []
        for i in range(400):
            kind = i % 4
            if kind in (0, 2):
                paths.append(f"/run/run/latent/{int(rng.integers(args.d_sae))}")
            elif kind == 1:
                paths.append(f"/run/run/latent/{int(rng.choice(chosen))}")
            else:
                paths.append(f"/run/run/{lists[(i // 4) % len(lists)]}")
        configs = [
            (name, w) for name in args.servers for w in (args.page_workers if name == "saelab" else [0])
        ]
        for name, workers in configs:
            for clients in args.clients:
                app = Browser([folder])  # a fresh app: no page cache carried over between servers
                if name == "saelab":
                    server = BrowserServer("127.0.0.1", 0, app, page_workers=workers)
                else:  # a thread per connection computing its own page, as before the page workers
                    server = StdlibDefaults(
                        "127.0.0.1", 0, app, handler=Http10, max_connections=10_000, page_workers=10_000
                    )
                serve_in_thread(server)
                base = url_of(server)
                timed_get(base + "run/run/")  # warm: the run's index and the decoder's norms
                timed_get(base + "run/run/latent/0")
                queue = ctx.Queue()
                proc = ctx.Process(
                    target=load_process,
                    args=(int(server.server_address[1]), paths, clients, args.seconds, args.timeout, queue),
                )
                proc.start()
                raw = queue.get()
                proc.join()
                server.shutdown()
                server.server_close()
                row = {"server": name, "page_workers": workers or None, **summary(raw, clients, args.seconds)}
                print(json.dumps(row), flush=True)
                results.append(row)
                time.sleep(2)  # let the previous load's connections and threads drain
    result = {
        "args": vars(args),
        "pages": "1/2 random latents, 1/4 sampled latents, 1/4 list pages",
        "runs": results,
    }
    result["machine"] = machine_facts(torch.get_num_threads(), load_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
