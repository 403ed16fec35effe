"""Shared helpers for the LLM, explainer and scorer tests (imported by those tests; not a pytest conftest).

- `RuleClient`: a small, deterministic, real `LLMClient`. It reads the prompts saelab builds the way a model would
  have to (examples from their quoted lines, the description and the text of a judge prompt) and answers by
  rule: an explanation names the most frequent marked token; a judge says Yes when that token occurs in the text
  (detection) or inside a mark (fuzzing), with first-token log-probabilities like an OpenAI server; a simulator
  gives 10 to every token equal to that token.
- `synthetic_samples`: a SampleSet whose latent `i` fires exactly on a planted word.
- `ScriptedServer`: an HTTP server on 127.0.0.1 answering from a list of canned responses (retry tests).
- `DripServer`: an HTTP server on 127.0.0.1 whose answers (body or headers) come a byte at a time, never ending.
- `tiny_chat_model`: a randomly initialised 2-layer Llama with a word-level tokenizer and a chat template.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import torch

from saelab.autointerp.explain import prompt_examples
from saelab.autointerp.llm.base import ChatResponse, LLMError
from saelab.latents.sampling import Example, LatentExamples, SampleSet
from saelab.models.loading import LoadedModel

FILLER = "the a of and in was is on city river year song team star light music war king born".split()  # noqa: SIM905
PLANTED = ["Paris", "guitar", "planet", "river", "seven"]

# ------------------------------------------------------------------------------------------- rule client

_DESCRIPTION = re.compile(r"^Description: (.*)$", re.MULTILINE)
_TEXT = re.compile(r"^Text: (\".*\")$", re.MULTILINE)
_KEYWORD = re.compile(r"the token (\S+)")


class RuleClient:
    """A deterministic LLM (see module docstring). `explain_answer` overrides the explainer's answer text;
    `judge_text` makes judges answer with that text and no log-probabilities."""

    def __init__(
        self,
        explain_answer: Callable[[list[str]], str] | None = None,
        judge_text: str | None = None,
        fail_with: str | None = None,
    ) -> None:
        self.model_name = "rule-client"
        self.explain_answer = explain_answer
        self.judge_text = judge_text
        self.fail_with = fail_with
        self.prompts: list[str] = []

    async def chat(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0, logprobs: int = 0
    ) -> ChatResponse:
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        if self.fail_with:
            raise LLMError(self.fail_with)
        if (desc := _DESCRIPTION.search(prompt)) and "\nTokens:\n" in prompt:
            return self._simulate(desc.group(1), prompt.split("\nTokens:\n", 1)[1])
        if (desc := _DESCRIPTION.search(prompt)) and (text := _TEXT.search(prompt)):
            return self._judge(desc.group(1), json.loads(text.group(1)), "marked tokens" in prompt, logprobs)
        examples = prompt_examples(prompt)
        if self.explain_answer is not None:
            answer = self.explain_answer(examples)
        else:
            marked = Counter(m.strip() for ex in examples for m in re.findall(r"<<(.*?)>>", ex))
            answer = f'Explanation: "the token {marked.most_common(1)[0][0]}"\nmore text' if marked else ""
        return ChatResponse(answer, len(prompt.split()), len(answer.split()), 0.0, None, self.model_name)

    def _simulate(self, description: str, token_lines: str) -> ChatResponse:
        """Simulation: `index: 10` for every numbered token equal to the description's keyword, else `none`."""
        if self.judge_text is not None:
            return ChatResponse(self.judge_text, 10, 1, 0.0, None, self.model_name)
        keyword = m.group(1).strip("\"'") if (m := _KEYWORD.search(description)) else description.split()[-1]
        hits = []
        for line in token_lines.splitlines():
            index, token = line.split(" ", 1)
            if json.loads(token).strip().lower() == keyword.lower():
                hits.append(f"{index}: 10")
        answer = "\n".join(hits) or "none"
        return ChatResponse(answer, 10, len(hits) * 4 + 1, 0.0, None, self.model_name)

    def _judge(self, description: str, text: str, fuzzing: bool, logprobs: int) -> ChatResponse:
        keyword = m.group(1).strip("\"'") if (m := _KEYWORD.search(description)) else description.split()[-1]
        where = " ".join(re.findall(r"<<(.*?)>>", text)) if fuzzing else text
        yes = keyword.lower() in where.lower()
        if self.judge_text is not None:
            return ChatResponse(self.judge_text, 10, 1, 0.0, None, self.model_name)
        top = None
        if logprobs > 0:
            p = 0.9 if yes else 0.2
            top = {" Yes": math.log(p * 0.8), "yes": math.log(p * 0.2), "No": math.log(1 - p), "The": -5.0}
        return ChatResponse("Yes" if yes else "No", 10, 1, 0.0, top, self.model_name)


# ------------------------------------------------------------------------------------------- sample sets


def make_example(
    words: list[str], fire_on: str | None, window: int, start: int, quantile: int = -1
) -> Example:
    token_strs = tuple((" " if i else "") + w for i, w in enumerate(words))
    acts = tuple(
        (2.0 + (i % 3)) if fire_on is not None and w == fire_on else 0.0 for i, w in enumerate(words)
    )
    return Example(tuple(range(len(words))), token_strs, acts, window, start, quantile)


def synthetic_samples(n_latents: int = 3, n_train: int = 6, n_test: int = 4, seed: int = 0) -> SampleSet:
    """Latent i fires on PLANTED[i]; its negatives never contain that word. Example ids are unique."""
    import random

    rng = random.Random(seed)
    window = iter(range(10_000))
    latents = []
    for i in range(n_latents):
        word = PLANTED[i]

        def sentence(with_word: bool, word: str = word) -> list[str]:
            words = [rng.choice(FILLER) for _ in range(12)]
            if with_word:
                for pos in rng.sample(range(1, 12), 2):
                    words[pos] = word
            return words

        train = tuple(make_example(sentence(True), word, next(window), 0) for _ in range(n_train))
        pos = tuple(make_example(sentence(True), word, next(window), 0, q % 3) for q in range(n_test))
        neg = tuple(make_example(sentence(False), None, next(window), 0) for _ in range(n_test))
        train_neg = tuple(make_example(sentence(False), None, next(window), 0) for _ in range(3))
        latents.append(LatentExamples(i, 0.01 * (i + 1), 4.0, train, pos, neg, train_neg))
    return SampleSet(latents)


# ---------------------------------------------------------------------------------------- scripted server


class ScriptedServer:
    """Answers POST/GET on 127.0.0.1 with canned (status, body) pairs in order (the last one repeats)."""

    def __init__(self, responses: list[tuple[int, str]], delay_s: float = 0.0) -> None:
        self.responses = responses
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                outer.requests.append((self.command, self.path, body))
                status, text = outer.responses[min(len(outer.requests), len(outer.responses)) - 1]
                time.sleep(delay_s)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DripServer:
    """A server on 127.0.0.1 that never finishes an answer to POST: `drip="body"` sends 200 and
    `Content-Length: 100000` at once, then one byte of the body every `every_s`; `drip="headers"` sends the status
    line and headers themselves a byte at a time. Each byte comes sooner than a read timeout longer than
    `every_s`, so only a deadline on the whole request ends it. `GET /v1/models` is answered at once (model
    `drip`). A connection the client closed stops dripping."""

    def __init__(self, drip: Literal["body", "headers"], every_s: float = 0.2) -> None:
        self.posts = 0
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                data = b'{"object": "list", "data": [{"id": "drip"}]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                try:
                    if drip == "body":
                        self.wfile.write(head)
                        self._drip(b'{"choices": [' + b" " * 99_986)
                    else:
                        self._drip(head + b" " * 100_000)
                except OSError:  # the client gave up and closed the connection
                    self.close_connection = True

            def _drip(self, data: bytes) -> None:
                for i in range(len(data)):
                    if outer.stop.wait(every_s):
                        return
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> DripServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def completion_body(text: str, top: dict[str, float] | None = None) -> str:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if top is not None:
        alts = [{"token": t, "logprob": lp} for t, lp in top.items()]
        first = next(iter(top))
        choice["logprobs"] = {"content": [{"token": first, "logprob": top[first], "top_logprobs": alts}]}
    return json.dumps(
        {"model": "scripted", "choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
    )


# ------------------------------------------------------------------------------------------- tiny model

TINY_WORDS = [*FILLER, *(w.lower() for w in PLANTED), "user", "assistant", "yes", "no", "describe", "words"]
TINY_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def tiny_chat_model(folder: Path, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> LoadedModel:
    """A random 2-layer Llama with a word-level tokenizer and a chat template (seconds to build), saved in
    `folder` (which `load_model` and `--llm.local-model` read). With `hidden=128, heads=2, kv_heads=1` the local
    engine's floats for a request depend on what else its batch holds, as they do for the bundled model (here
    in the last bits); with the default sizes they happen not to."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = TINY_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return LoadedModel(model, fast, "tiny-chat", "test")
