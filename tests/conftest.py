"""Shared fixtures: a tiny real Llama model with a real word-level tokenizer, a small synthetic corpus, and a
finished run made of them through the CLI (`finished`, with a fresh copy per test to break: `run`).

The tiny model goes through the same code paths as any HF causal LM (from_pretrained on a local folder), so the
fast tests exercise the real loading, hooking and splicing code in seconds.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

pytest_plugins = [
    "reliability"
]  # README's reliability table, written from the marked tests (tests/reliability.py)

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "river", "city", "paris", "france", "king", "queen", "war",
    "music", "song", "wrote", "in", "of", "and", "was", "is", "born", "year", "1901", "2000", "church", "team",
    "football", "played", "science", "atom", "energy", "light", "star", "planet", "orbit", "red", "blue", "green",
]  # fmt: skip


def make_corpus(n_docs: int = 120, seed: int = 0) -> str:
    """Blank-line separated documents of random words (with repeated themes so latents have structure)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        theme = rng.sample(WORDS, 6)
        docs.append(
            " ".join(rng.choice(theme if rng.random() < 0.6 else WORDS) for _ in range(rng.randint(20, 60)))
        )
    return "\n\n".join(docs) + "\n"


def build_tiny_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path) -> Path:
    """A run of every stage (support_run.SMALL) and the report, built once per test module."""
    from support_run import run_stages  # here, not above: the tests that never run a stage skip saelab.cli

    from saelab.cli import main

    folder = tmp_path_factory.mktemp("finished") / "r"
    run_stages(folder, tiny_model_dir, corpus_file)
    assert main(["report", "--run-dir", str(folder)]) == 0
    return folder


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, to break."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy
