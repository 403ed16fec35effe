"""A small OpenAI-compatible server (stdlib http.server) backed by `LocalChatClient`, for tests and local use.

Serves `GET /v1/models` and `POST /v1/chat/completions` (with `logprobs` / `top_logprobs`) on 127.0.0.1.
Concurrent HTTP requests are handed to one event loop, so the local client micro-batches them as it does in-process.

    python tests/llm_server.py --port 8080      # then: saelab explain --llm.url http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from saelab.autointerp.llm.base import LLMError
from saelab.autointerp.llm.local import LocalChatClient


class LocalOpenAIServer:
    def __init__(self, client: LocalChatClient, port: int = 0, request_timeout_s: float = 300.0) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler(request_timeout_s))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._http_thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> LocalOpenAIServer:
        self._loop_thread.start()
        self._http_thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)

    def completion(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        n_top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        coro = self.client.chat(
            body["messages"],
            max_tokens=int(body.get("max_tokens") or 16),
            temperature=float(body.get("temperature") or 0.0),
            logprobs=n_top,
        )
        resp = asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": resp.text},
            "finish_reason": "stop",
        }
        if n_top and resp.top_logprobs is not None:
            alts = [{"token": t, "logprob": lp} for t, lp in resp.top_logprobs.items()]
            best = max(resp.top_logprobs, key=lambda t: resp.top_logprobs[t])  # type: ignore[index]
            first = {"token": best, "logprob": resp.top_logprobs[best], "top_logprobs": alts}
            choice["logprobs"] = {"content": [first]}
        return {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "model": resp.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": resp.prompt_tokens,
                "completion_tokens": resp.completion_tokens,
                "total_tokens": resp.prompt_tokens + resp.completion_tokens,
            },
        }

    def _handler(self, timeout_s: float) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200, {"object": "list", "data": [{"id": server.client.model_name, "object": "model"}]}
                    )
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    self._send(200, server.completion(body, timeout_s))
                except (LLMError, ValueError, KeyError) as err:
                    self._send(400, {"error": {"message": str(err)}})

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


if __name__ == "__main__":
    import argparse

    from saelab.models.loading import BUNDLED_SMOLLM2, load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", default=BUNDLED_SMOLLM2)
    args = parser.parse_args()
    with LocalOpenAIServer(LocalChatClient(load_model(args.model)), port=args.port) as srv:
        print(f"serving {args.model} at {srv.url}")
        threading.Event().wait()
