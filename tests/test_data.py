"""Corpus readers, token windows, exclusion mask, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from saelab.config import ConfigError, DataConfig
from saelab.data.windows import DataError, build_windows, iter_documents


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_windows_mask_and_split(tokenizer, corpus_file) -> None:
    w = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=16, exclude_first=2), tokenizer, seed=3)
    assert w.tokens.shape[1] == 16
    assert not w.keep[:, :2].any()
    eos = tokenizer.eos_token_id
    assert (w.tokens == eos).any()  # documents are separated by EOS ...
    assert not w.keep[w.tokens == eos].any()  # ... which never enters training or metrics
    assert set(w.eval_idx).isdisjoint(w.train_idx)
    assert len(w.eval_idx) + len(w.train_idx) == len(w.tokens)
    same = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=16, exclude_first=2), tokenizer, seed=3)
    assert w.sha256() == same.sha256()


def test_kept_before_batches(tokenizer, corpus_file) -> None:
    w = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=16, exclude_first=2), tokenizer, seed=3)
    for idx in (w.train_idx, w.eval_idx[::-1], w.eval_idx[:1], w.eval_idx[:0]):
        for batch in (1, 3, len(idx) + 5):
            before = w.kept_before_batches(idx, batch)
            by_hand = [int(w.keep[idx[:b]].sum()) for b in range(0, len(idx), batch)] + [
                int(w.keep[idx].sum())
            ]
            assert before.tolist() == by_hand


def test_save_load(tokenizer, corpus_file, tmp_path: Path) -> None:
    w = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=16), tokenizer, seed=0)
    w.save(tmp_path / "w.npz")
    from saelab.data.windows import TokenWindows

    assert TokenWindows.load(tmp_path / "w.npz").sha256() == w.sha256()


def test_jsonl_and_json_sources(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one two"}) + "\n\n" + json.dumps({"text": "three"}) + "\n"
    )
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == ["one two", "three"]
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x y"}]))
    assert list(iter_documents(str(tmp_path / "b.json"), "body")) == ["x y"]
    with pytest.raises(DataError, match="text-field"):
        list(iter_documents(str(tmp_path / "b.json"), "text"))


@pytest.mark.bad_input
def test_bad_inputs(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_documents(str(tmp_path / "latin1.txt")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="fewer than two windows"):
        build_windows(DataConfig(dataset=str(tmp_path / "empty.txt")), tokenizer, seed=0)


def test_bundled_wikipedia_is_read_by_path() -> None:
    docs = iter_documents("bundled:wikipedia-en")
    first = [next(docs) for _ in range(3)]
    assert all(len(d) > 50 for d in first)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="eval_fraction"):
        DataConfig(eval_fraction=1.5)
    with pytest.raises(ConfigError, match="exclude_first"):
        DataConfig(ctx_len=16, exclude_first=16)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "c.jsonl",
            '{"text": "cat sat on"\n',
            ":2: not valid JSON (Expecting ',' delimiter at column 22); fix or remove line 2",
        ),
        ("c.jsonl", '{"text": 12345}\n', ":2: field 'text' is a number (12345), not a string"),
        ("c.jsonl", '{"text": null}\n', ":2: field 'text' is null (null), not a string"),
        (
            "c.json",
            '[{"text": "the cat"},\n {"text": "a dog"\n',
            ": not valid JSON (Expecting ',' delimiter at line 3, column 1); fix line 3",
        ),
    ],
)
def test_a_bad_json_corpus_is_one_line_naming_file_and_line(
    name: str,
    content: str,
    message: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI: collect stops before any window is written, naming the corpus file and the line."""
    from support_run import error_line

    from saelab.cli import main

    corpus = tmp_path / name
    first = json.dumps({"text": "the cat sat on the mat"}) + "\n" if name.endswith(".jsonl") else ""
    corpus.write_text(first + content)
    run = tmp_path / "run"
    args = [
        "collect",
        "--run-dir",
        str(run),
        "--model.name",
        str(tiny_model_dir),
        "--data.dataset",
        str(corpus),
    ]
    assert main(args) == 1
    assert f"{corpus}{message}" in error_line(capsys.readouterr().err)
    assert "collect" not in json.loads((run / "manifest.json").read_text())["stages"]
    assert not (run / "data").exists()
