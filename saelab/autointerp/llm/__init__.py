"""LLM clients for explainers and scorers: the interface (`base`), an OpenAI-compatible HTTP client (`openai`), a
local transformers engine (`local`) and an on-disk answer cache (`cache`).

`make_client` returns the configured backend; the backends are imported only when chosen (httpx, torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saelab.autointerp.llm.base import (
    ChatResponse,
    LLMClient,
    LLMError,
    Messages,
    gather_with_progress,
    reject_answer,
    run_sync,
)

if TYPE_CHECKING:
    from saelab.config import LLMConfig
    from saelab.models.loading import LoadedModel

__all__ = [
    "ChatResponse",
    "LLMClient",
    "LLMError",
    "Messages",
    "gather_with_progress",
    "make_client",
    "reject_answer",
    "run_sync",
]


def make_client(cfg: LLMConfig, loaded: LoadedModel | None = None) -> LLMClient:
    """The configured client: `OpenAIClient` when `cfg.url` is set, else `LocalChatClient` (reusing `loaded`
    when it is the configured local model). No I/O for HTTP: call `check()` before the work."""
    if cfg.url:
        from saelab.autointerp.llm.openai import OpenAIClient

        return OpenAIClient.from_config(cfg)
    if cfg.backend == "openai":
        raise LLMError("llm.backend is 'openai' but llm.url is empty; pass --llm.url http://HOST:PORT/v1")
    from saelab.autointerp.llm.local import LocalChatClient

    return LocalChatClient.from_config(cfg, loaded)
