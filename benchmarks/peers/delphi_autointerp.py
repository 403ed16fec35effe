"""Delphi's side of benchmarks/autointerp_delphi.py; runs in .venv-peers/delphi (eai-delphi 0.1.3).

    .venv-peers/delphi/bin/python benchmarks/peers/delphi_autointerp.py IN.json OUT.json

IN.json (written by the benchmark): the server URL and model, the concurrency, and per latent the examples saelab
sampled (token strings, activations, quantiles). Each latent becomes a `LatentRecord` as Delphi's own pipeline
builds it (`latents/samplers.py`): `train` and `test` are `ActivatingExample`s with `str_tokens` (decoded per
token by saelab, so the highlighting is intact) and, for `train`, `normalized_activations` =
ceil(10 * act / max_act of the record) clamped to [0, 10]; `not_active` are `NonActivatingExample`s (distance 0).

Then Delphi's defaults as its CLI (`delphi/__main__.py`) sets them up: `DefaultExplainer(threshold=0.3)` (its
default prompt, activations shown, no chain of thought), then `DetectionScorer` and `FuzzingScorer` with
`n_examples_shown=5` (`num_examples_per_scorer_prompt`), `log_prob=False` (its default), through Delphi's
`OpenRouter` client pointed at the local server (its defaults: max_tokens 3000, temperature 1.0 for the explainer
client, but its explainer and scorers pass temperature 0.0), 100 s timeout, one attempt). Latents run concurrently,
at most `concurrency` at a time, explain -> detection -> fuzzing per latent, as Delphi's `Pipeline` runs them.

The changes to Delphi: its client module imports `vllm` at import time (for its offline client, unused here), so a
stub module stands in for it; `OpenRouter.postprocess` is wrapped to count requests and the server's `usage`
token counts (the text it returns is unchanged); and its fixed 100 s request timeout is replaced by IN.json's
`timeout_s` (its few-shot scorer prompts of ~1,650 tokens can take longer than 100 s on a 2-core CPU server, and
then Delphi returns no judgement at all), with timed-out requests counted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types
from pathlib import Path
from typing import Any


def stub_vllm() -> None:
    """delphi.clients.offline does `from vllm import LLM, SamplingParams` etc.; nothing here calls them."""

    class _Any:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("vllm is not installed (stubbed for the benchmark)")

    def attribute(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Any

    for name in ("vllm", "vllm.distributed", "vllm.distributed.parallel_state", "vllm.inputs"):
        mod = types.ModuleType(name)
        mod.__getattr__ = attribute  # type: ignore[method-assign]
        sys.modules[name] = mod


stub_vllm()

import httpx  # noqa: E402
import torch  # noqa: E402
from delphi.clients import OpenRouter  # noqa: E402
from delphi.explainers import DefaultExplainer  # noqa: E402
from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample  # noqa: E402
from delphi.scorers import DetectionScorer, FuzzingScorer  # noqa: E402

UNPARSED = "Explanation could not be parsed."
TIMEOUT_S = 100.0
"""Request timeout (IN.json `timeout_s`; Delphi's own is 100 s)."""


class CountingClient(OpenRouter):
    """Delphi's OpenRouter client, counting requests and the server's usage fields."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.timeouts = 0
        post = self.client.post

        async def post_with_timeout(*args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = TIMEOUT_S
            try:
                return await post(*args, **kwargs)
            except httpx.TimeoutException:
                self.timeouts += 1
                raise

        self.client.post = post_with_timeout  # type: ignore[method-assign]

    def postprocess(self, response: Any) -> Any:
        self.requests += 1
        try:
            usage = response.json().get("usage") or {}
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        except Exception:  # the original postprocess raises on a bad body
            pass
        return super().postprocess(response)


def activating(ex: dict[str, Any], max_act: float, train: bool) -> ActivatingExample:
    acts = torch.tensor(ex["acts"], dtype=torch.float32)
    out = ActivatingExample(
        tokens=torch.tensor(ex["tokens"]),
        activations=acts,
        str_tokens=list(ex["token_strs"]),
        quantile=max(int(ex.get("quantile", 0)), 0),
    )
    if train:
        out.normalized_activations = (acts * 10 / max(max_act, 1e-6)).ceil().clamp(0, 10)
    return out


def record_of(le: dict[str, Any]) -> LatentRecord:
    max_act = max(max(ex["acts"]) for ex in le["train"] + le["test_pos"])
    rec = LatentRecord(Latent("layer", int(le["latent"])))
    rec.train = [activating(ex, max_act, True) for ex in le["train"]]
    rec.examples = list(rec.train)
    rec.test = [activating(ex, max_act, False) for ex in le["test_pos"]]
    rec.not_active = [
        NonActivatingExample(
            tokens=torch.tensor(ex["tokens"]),
            activations=torch.tensor(ex["acts"], dtype=torch.float32),
            str_tokens=list(ex["token_strs"]),
            distance=0.0,
        )
        for ex in le["test_neg"]
    ]
    return rec


async def one_latent(
    le: dict[str, Any], client: CountingClient, sem: asyncio.Semaphore, threshold: float
) -> dict[str, Any]:
    async with sem:
        rec = record_of(le)
        out: dict[str, Any] = {"latent": le["latent"]}
        try:
            result = await DefaultExplainer(client, threshold=threshold)(rec)
            rec.explanation = result.explanation
        except Exception as err:  # Delphi's explainer does not catch request errors
            out["error"] = f"explainer: {err!r}"
            rec.explanation = ""
        out["explanation"] = rec.explanation
        for scorer in (
            DetectionScorer(client, n_examples_shown=5, log_prob=False),
            FuzzingScorer(client, n_examples_shown=5, log_prob=False),
        ):
            res = (await scorer(rec)).score
            out[scorer.name] = {
                "n": len(res),
                "parsed": sum(r.prediction is not None for r in res),
                "correct": sum(bool(r.correct) for r in res),
            }
        return out  # requests and tokens are counted over all latents (they run concurrently)


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    global TIMEOUT_S
    TIMEOUT_S = float(cfg.get("timeout_s", 100.0))
    client = CountingClient(cfg["model"], base_url=cfg["url"].rstrip("/") + "/chat/completions")
    sem = asyncio.Semaphore(int(cfg["concurrency"]))
    t0 = time.perf_counter()
    rows = await asyncio.gather(*(one_latent(le, client, sem, 0.3) for le in cfg["latents"]))
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "requests": client.requests,
        "prompt_tokens": client.prompt_tokens,
        "completion_tokens": client.completion_tokens,
        "timed_out_requests": client.timeouts,
        "timeout_s": TIMEOUT_S,
        "explanations_parsed": sum(r["explanation"] not in ("", UNPARSED) for r in rows),
        "latents": rows,
    }


if __name__ == "__main__":
    cfg = json.loads(Path(sys.argv[1]).read_text())
    result = asyncio.run(main(cfg))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
