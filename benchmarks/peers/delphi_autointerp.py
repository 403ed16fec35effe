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

Nothing in Delphi's code is changed. Around it: its client module imports `vllm` at import time (for its offline
client, unused here), so a stub module stands in for it; `OpenRouter.postprocess` is wrapped to count requests and
the server's `usage` token counts (the text it returns is unchanged); its fixed 100 s request timeout is replaced
by IN.json's `timeout_s` (its few-shot scorer prompts of ~1,650 tokens can take longer than 100 s on a 2-core CPU
server, and then Delphi returns no judgement at all), with timed-out requests counted.

With IN.json `constrain` true (the default of the benchmark), the request body Delphi's client posts gets one more
field, llama-server's `grammar` (a GBNF grammar the server samples under; llama.cpp copies request fields it does
not map itself into the slot's parameters, so /v1/chat/completions honours it), chosen by which of Delphi's
objects sends the request (each gets its own client):
- the explainer: `[EXPLANATION]: ` then 1-200 characters other than a newline (EXPLANATION_GRAMMAR), the form its
  `parse_explanation` reads (its prompt asks for reasoning lines first and this line last; the grammar leaves
  only the last line);
- the scorers: a list of exactly as many 0/1 as the prompt's last message shows examples, e.g. `[1, 0, 0, 1, 0]`
  (`list_grammar`), the form `Classifier._parse` reads (json.loads of the first `[...]`, length checked).
Everything else Delphi sends (messages, max_tokens 3000, temperature) is unchanged; the answers are parsed by
Delphi's own code. Without a grammar SmolLM2-135M never writes that list and each scorer answer runs to 3,000
tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import types
from collections.abc import Callable
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

EXPLANATION_GRAMMAR = r"""root ::= "[EXPLANATION]: " [^\n]{1,200}"""
"""Delphi's explainer answer: its `[EXPLANATION]:` line alone, at most 200 characters after the tag (saelab's
explainer has a 40-token budget)."""

Grammar = Callable[[list[dict[str, Any]]], str]


def list_grammar(n: int) -> str:
    """A Python list of n 0/1 answers, with or without a space after each comma (Delphi's few-shot answers have
    none, json.loads reads both)."""
    return 'root ::= "[" d' + " sep d" * (n - 1) + ' "]"\nsep ::= "," " "?\nd ::= [01]'


def examples_in(messages: list[dict[str, Any]]) -> int:
    """How many examples the last message of a Delphi scorer prompt shows (`Example i:` lines, i from 0)."""
    ids = {int(m) for m in re.findall(r"^Example (\d+):", str(messages[-1]["content"]), re.M)}
    assert ids == set(range(len(ids))) and ids, f"unexpected scorer prompt: example ids {sorted(ids)}"
    return len(ids)


def scorer_grammar(messages: list[dict[str, Any]]) -> str:
    return list_grammar(examples_in(messages))


def explainer_grammar(messages: list[dict[str, Any]]) -> str:
    return EXPLANATION_GRAMMAR


class CountingClient(OpenRouter):
    """Delphi's OpenRouter client, counting requests and the server's usage fields, and adding `grammar(messages)`
    to the request body when given."""

    def __init__(self, *args: Any, grammar: Grammar | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.timeouts = 0
        self.answers: list[str] = []
        post = self.client.post

        async def post_with_timeout(*args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = TIMEOUT_S
            if grammar is not None:
                body = dict(kwargs["json"])
                body["grammar"] = grammar(body["messages"])
                kwargs["json"] = body
            try:
                return await post(*args, **kwargs)
            except httpx.TimeoutException:
                self.timeouts += 1
                raise

        self.client.post = post_with_timeout  # type: ignore[method-assign]

    def postprocess(self, response: Any) -> Any:
        self.requests += 1
        try:
            body = response.json()
            usage = body.get("usage") or {}
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
            self.answers.append(str(body["choices"][0]["message"]["content"])[:300])
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
    le: dict[str, Any],
    explainer_client: CountingClient,
    scorer_client: CountingClient,
    sem: asyncio.Semaphore,
    threshold: float,
) -> dict[str, Any]:
    async with sem:
        rec = record_of(le)
        out: dict[str, Any] = {"latent": le["latent"]}
        try:
            result = await DefaultExplainer(explainer_client, threshold=threshold)(rec)
            rec.explanation = result.explanation
        except Exception as err:  # Delphi's explainer does not catch request errors
            out["error"] = f"explainer: {err!r}"
            rec.explanation = ""
        out["explanation"] = rec.explanation
        for scorer in (
            DetectionScorer(scorer_client, n_examples_shown=5, log_prob=False),
            FuzzingScorer(scorer_client, n_examples_shown=5, log_prob=False),
        ):
            res = (await scorer(rec)).score
            judged = [r for r in res if r.prediction is not None]
            out[scorer.name] = {
                "n": len(res),
                "parsed": len(judged),
                "correct": sum(bool(r.correct) for r in judged),
                "positives": sum(bool(r.activating) for r in judged),
                "true_positives": sum(bool(r.activating and r.prediction) for r in judged),
                "true_negatives": sum(bool(not r.activating and not r.prediction) for r in judged),
                "predicted_1": sum(bool(r.prediction) for r in judged),
            }
        return out  # requests and tokens are counted over all latents (they run concurrently)


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    global TIMEOUT_S
    TIMEOUT_S = float(cfg.get("timeout_s", 100.0))
    constrain = bool(cfg.get("constrain", False))
    url = cfg["url"].rstrip("/") + "/chat/completions"
    explainer_client = CountingClient(
        cfg["model"], base_url=url, grammar=explainer_grammar if constrain else None
    )
    scorer_client = CountingClient(cfg["model"], base_url=url, grammar=scorer_grammar if constrain else None)
    clients = {"explainer": explainer_client, "scorers": scorer_client}
    sem = asyncio.Semaphore(int(cfg["concurrency"]))
    t0 = time.perf_counter()
    rows = await asyncio.gather(
        *(one_latent(le, explainer_client, scorer_client, sem, 0.3) for le in cfg["latents"])
    )
    wall = time.perf_counter() - t0
    judged = [r[s] for r in rows for s in ("detection", "fuzz")]
    return {
        "wall_s": wall,
        "constrained": constrain,
        "grammars": {"explainer": EXPLANATION_GRAMMAR, "scorers (5 examples)": list_grammar(5)}
        if constrain
        else None,
        "requests": sum(c.requests for c in clients.values()),
        "prompt_tokens": sum(c.prompt_tokens for c in clients.values()),
        "completion_tokens": sum(c.completion_tokens for c in clients.values()),
        "by_role": {
            name: {
                "requests": c.requests,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "timed_out_requests": c.timeouts,
            }
            for name, c in clients.items()
        },
        "timed_out_requests": sum(c.timeouts for c in clients.values()),
        "timeout_s": TIMEOUT_S,
        "explanations_parsed": sum(r["explanation"] not in ("", UNPARSED) for r in rows),
        "judgements_asked": sum(j["n"] for j in judged),
        "judgements": sum(j["parsed"] for j in judged),
        "correct": sum(j["correct"] for j in judged),
        "positives": sum(j["positives"] for j in judged),
        "true_positives": sum(j["true_positives"] for j in judged),
        "true_negatives": sum(j["true_negatives"] for j in judged),
        "predicted_1": sum(j["predicted_1"] for j in judged),
        "latents": rows,
        "answers": {name: c.answers for name, c in clients.items()},
    }


if __name__ == "__main__":
    cfg = json.loads(Path(sys.argv[1]).read_text())
    result = asyncio.run(main(cfg))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
