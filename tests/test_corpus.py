"""Streamed corpora (saelab.data.corpus, saelab.data.columnar) and windows packed on the fly with the per-document
held-out split and a reading budget (saelab.data.windows)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from support_run import SMALL, error_line
from transformers import AutoTokenizer

from saelab import cli
from saelab.config import DataConfig
from saelab.data import corpus, windows
from saelab.data.corpus import DataError, iter_documents, iter_token_documents
from saelab.data.windows import build_windows, held_out, read_windows


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_corpus().strip().split("\n\n")


def ids_of(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def windows_of(
    dataset: Path | str, tokenizer, n_train_tokens: int | None = None, **data
) -> windows.TokenWindows:
    cfg = DataConfig(dataset=str(dataset), ctx_len=16, **data)
    return build_windows(cfg, tokenizer, seed=0, n_train_tokens=n_train_tokens)


# --- plain text, read in chunks ---


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=["a", "b", " ", "\n", "\r", "é"], max_size=60), chunk=st.integers(1, 7))
def test_text_chunks_give_the_documents_of_the_whole_text(text: str, chunk: int) -> None:
    """Documents read in chunks (of 1-7 bytes here, 1 MiB in use) are those of splitting the whole text, read with
    universal newlines, on blank lines (the reader this one replaced)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.txt"
        path.write_bytes(text.encode("utf-8"))
        whole = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(corpus, "CHUNK_BYTES", chunk)
            assert list(iter_documents(str(path))) == whole


def test_text_is_read_only_as_far_as_the_run_needs(tokenizer, tmp_path: Path) -> None:
    """A budget met early never reaches the end of the file: bytes that are not UTF-8 there go unread."""
    path = tmp_path / "c.txt"
    text = (make_corpus(400) + "\n\n") * 8
    path.write_bytes(text.encode() + b"caf\xe9\n")
    w = windows_of(path, tokenizer, n_train_tokens=300, min_eval_windows=4)
    assert int(w.keep[w.train_idx].sum()) >= 300
    with pytest.raises(DataError, match=rf"not UTF-8 text \(line {text.count(chr(10)) + 1}\)"):
        windows_of(path, tokenizer)


# --- JSON and JSONL ---


@pytest.mark.bad_input
def test_malformed_jsonl_line_named_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "one"}) + '\n{"text": "two"\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON .*fix or remove line 2"):
        list(iter_documents(str(path)))


@pytest.mark.bad_input
@pytest.mark.parametrize(("value", "shown"), [(12345, "a number (12345)"), (None, "null (null)")])
def test_non_string_text_refused_with_file_and_line(tmp_path: Path, value: object, shown: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: field 'text' is {re.escape(shown)}, not a"
    ):
        list(iter_documents(str(path)))
    (tmp_path / "c.json").write_text(json.dumps({"a": {"text": "x"}, "b": {"text": value}}))
    with pytest.raises(DataError, match=r'c\.json\["b"\]: field \'text\' is .*not a string'):
        list(iter_documents(str(tmp_path / "c.json")))


def test_json_forms(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(["x y", {"text": "z"}, "  "]))
    assert list(iter_documents(str(tmp_path / "list.json"))) == ["x y", "z"]
    (tmp_path / "dict.json").write_text(json.dumps({"k1": {"body": "b1"}, "k2": {"body": "b2"}}))
    assert list(iter_documents(str(tmp_path / "dict.json"), "body")) == ["b1", "b2"]


# --- columnar: Parquet, Arrow, save_to_disk ---


def test_columnar_formats_give_the_same_documents(docs: list[str], tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=25)
    feather.write_feather(table, tmp_path / "c.feather")  # Arrow IPC file format (Feather v2)
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=30):  # the stream format save_to_disk writes
            writer.write_batch(batch)
    for name in ("c.parquet", "c.feather", "c.arrow"):
        assert list(iter_documents(str(tmp_path / name))) == docs, name


def test_save_to_disk_folder_is_iterated(docs: list[str], tmp_path: Path, tokenizer) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"), "body")) == docs
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": ["no"]}),
                               "train": datasets.Dataset.from_dict({"body": docs})})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(str(tmp_path / "dd"), "body")) == docs  # the train split
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\); set --data.text-field"):
        list(iter_documents(str(tmp_path / "ds")))


@pytest.mark.bad_input
def test_parquet_without_the_text_column_names_its_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"title": ["a"], "body": ["b"]}), tmp_path / "c.parquet")
    with pytest.raises(
        DataError, match=r"c\.parquet: no column 'text' \(columns: title, body\); set --data.text-f"
    ):
        list(iter_documents(str(tmp_path / "c.parquet")))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: row 1 of column 'text' is null"):
        list(iter_documents(str(tmp_path / "n.parquet")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"column 'text' holds int64, not strings"):
        list(iter_documents(str(tmp_path / "i.parquet")))


# --- folders and globs of shards ---


def test_folder_and_glob_read_shards_sorted(docs: list[str], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = [docs[:40], docs[40:90], docs[90:]]
    (shards / "b-001.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in parts[1]))
    (shards / "a-000.txt").write_text("\n\n".join(parts[0]))
    (shards / "c-002.txt").write_text("\n\n".join(parts[2]))
    (shards / "notes.md").write_text("not a shard")
    assert list(iter_documents(str(shards))) == docs
    assert list(iter_documents(str(tmp_path / "sh*" / "*.txt"))) == parts[0] + parts[2]
    assert list(iter_documents(str(tmp_path / "**" / "*-00[12].*"))) == parts[1] + parts[2]


@pytest.mark.bad_input
def test_glob_matching_nothing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"glob '.*/\*\.parquet' matches no files"):
        list(iter_documents(str(tmp_path / "*.parquet")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(DataError, match=r"holds no corpus files .*it holds: README"):
        list(iter_documents(str(tmp_path / "empty")))


# --- pre-tokenised corpora ---


def test_pretokenised_forms_give_the_windows_of_the_text(docs: list[str], tokenizer, tmp_path: Path) -> None:
    """Token ids written by any form (JSONL, Parquet, save_to_disk, a 1-D .npy stream) pack into the very windows
    the text does."""
    ids = ids_of(tokenizer, docs)
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    text = windows_of(tmp_path / "c.txt", tokenizer, n_train_tokens=600, min_eval_windows=5)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    stream = np.concatenate([[*i, tokenizer.eos_token_id] for i in ids]).astype(np.uint16)
    np.save(tmp_path / "c.npy", stream)
    sources = {"c.jsonl": "input_ids", "c.npy": ""}
    try:  # the columnar forms need the `data` extra
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs, "input_ids": ids}), tmp_path / "c.parquet", row_group_size=16)
        datasets.Dataset.from_dict({"tokens": ids}).save_to_disk(str(tmp_path / "ds"))
        sources.update({"c.parquet": "input_ids", "ds": "tokens"})
    except ImportError:
        pass
    for name, token_field in sources.items():
        got = windows_of(
            tmp_path / name, tokenizer, n_train_tokens=600, min_eval_windows=5, token_field=token_field
        )
        assert got.sha256() == text.sha256(), name


def test_npy_rows_are_documents(tokenizer, tmp_path: Path) -> None:
    rows = np.arange(3, 3 + 5 * 12).reshape(5, 12) % 40 + 3
    np.save(tmp_path / "rows.npy", rows.astype(np.int32))
    got = list(iter_token_documents(str(tmp_path / "rows.npy"), "", len(tokenizer), tokenizer.eos_token_id))
    assert [d.tolist() for d in got] == rows.tolist()


@pytest.mark.bad_input
def test_ids_beyond_the_vocabulary_refused_naming_file_max_id_and_vocab(tokenizer, tmp_path: Path) -> None:
    vocab = len(tokenizer)
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"input_ids": [3, 4]}) + "\n" + json.dumps({"input_ids": [5, vocab + 7]})
    )
    with pytest.raises(
        DataError,
        match=rf"c\.jsonl:2: token id {vocab + 7} \(max id {vocab + 7}\) is outside the model's vocabulary of {vocab} ids",
    ):
        windows_of(tmp_path / "c.jsonl", tokenizer, token_field="input_ids")
    np.save(tmp_path / "c.npy", np.array([[3, 4], [50_000, 6]], dtype=np.int64))
    with pytest.raises(DataError, match=rf"c\.npy \(rows 0-1\): token id 50000 .*vocabulary of {vocab} ids"):
        windows_of(tmp_path / "c.npy", tokenizer)
    (tmp_path / "t.jsonl").write_text(json.dumps({"input_ids": "3 4"}) + "\n")
    with pytest.raises(
        DataError, match=r"t\.jsonl:1: field 'input_ids' is a string .*not a list of token ids"
    ):
        windows_of(tmp_path / "t.jsonl", tokenizer, token_field="input_ids")
    (tmp_path / "x.txt").write_text("plain text")
    with pytest.raises(DataError, match=r"x\.txt is plain text, but --data.token-field is set"):
        windows_of(tmp_path / "x.txt", tokenizer, token_field="input_ids")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[1, 2], [3, vocab]]}), tmp_path / "c.parquet")
    with pytest.raises(
        DataError, match=rf"c\.parquet \(rows 0-1\): token id {vocab} \(max id {vocab}\) is outside"
    ):
        windows_of(tmp_path / "c.parquet", tokenizer, token_field="input_ids")


# --- the per-document split and the budget ---


def test_held_out_is_a_seeded_hash_of_the_document_index() -> None:
    key = hashlib.blake2b(b"3:17", digest_size=8).digest()
    assert held_out(3, 17, 0.5) == (int.from_bytes(key, "little") / 2**64 < 0.5)
    share = np.mean([held_out(0, i, 0.1) for i in range(20_000)])
    assert abs(share - 0.1) < 0.01
    assert [held_out(1, i, 0.1) for i in range(200)] != [held_out(0, i, 0.1) for i in range(200)]


def test_train_and_eval_windows_are_packed_from_their_own_documents(
    docs: list[str], tokenizer, corpus_file
) -> None:
    w = windows_of(corpus_file, tokenizer)
    eos = tokenizer.eos_token_id
    for split, idx in ((True, w.eval_idx), (False, w.train_idx)):
        mine = [i for n, i in enumerate(ids_of(tokenizer, docs)) if held_out(0, n, 0.1) == split]
        stream = [t for i in mine for t in [*i, eos]]
        assert w.tokens[idx].ravel().tolist() == stream[: len(idx) * 16]
    assert len(w.eval_idx) + len(w.train_idx) == len(w.tokens)


def test_windows_do_not_depend_on_the_tokenizer_batch(tokenizer, corpus_file, monkeypatch) -> None:
    want = windows_of(corpus_file, tokenizer, n_train_tokens=700, min_eval_windows=6).sha256()
    for batch in (1, 7, 1000):
        monkeypatch.setattr(windows, "TOKENIZE_BATCH", batch)
        assert windows_of(corpus_file, tokenizer, n_train_tokens=700, min_eval_windows=6).sha256() == want


def test_budget_stops_reading_and_the_result_ignores_the_rest(
    docs: list[str], tokenizer, tmp_path: Path
) -> None:
    """Reading stops once the training windows hold the tokens asked and the held-out ones their share; the
    windows from a corpus ten times as long (same first documents) are the same."""
    (tmp_path / "short.txt").write_text("\n\n".join(docs))
    (tmp_path / "long.txt").write_text("\n\n".join(docs + make_corpus(1200, seed=5).strip().split("\n\n")))
    cfg = DataConfig(dataset=str(tmp_path / "short.txt"), ctx_len=16, min_eval_windows=4)
    short = read_windows(cfg, tokenizer, seed=0, n_train_tokens=1000)
    w = short.windows
    train_windows = len(w.train_idx)
    assert not short.exhausted and short.documents < len(docs)
    assert int(w.keep[w.train_idx].sum()) >= 1000
    assert int(w.keep[w.train_idx[:-1]].sum()) < 1000  # not one training window more than collect takes
    assert len(w.eval_idx) >= max(4, np.ceil(train_windows * 0.1 / 0.9))
    long = read_windows(dataclasses.replace(cfg, dataset=str(tmp_path / "long.txt")), tokenizer, 0, 1000)
    assert long.windows.sha256() == w.sha256() and long.documents == short.documents
    # the held-out floor: more eval windows than the share asks for, the training windows unchanged
    more = read_windows(dataclasses.replace(cfg, min_eval_windows=20), tokenizer, 0, 1000).windows
    assert len(more.eval_idx) >= 20 and more.tokens[more.train_idx].tolist() == w.tokens[w.train_idx].tolist()


@pytest.mark.bad_input
def test_corpus_that_runs_out_says_how_many_tokens_it_held(tokenizer, corpus_file) -> None:
    whole = read_windows(DataConfig(dataset=str(corpus_file), ctx_len=16), tokenizer, seed=0)
    kept = int(whole.windows.keep[whole.windows.train_idx].sum())
    with pytest.raises(
        DataError,
        match=rf"ran out after 120 documents and {whole.tokens} tokens: its training windows hold {kept} kept "
        rf"tokens, fewer than the 100000 asked; lower --collect.n-train-tokens to at most {kept}",
    ):
        windows_of(corpus_file, tokenizer, n_train_tokens=100_000)
    with pytest.raises(DataError, match=r"ran out after 10 documents \(the --data.max-docs limit\)"):
        windows_of(corpus_file, tokenizer, n_train_tokens=100_000, max_docs=10)
    assert (
        read_windows(DataConfig(dataset=str(corpus_file), ctx_len=16, max_docs=30), tokenizer, 0).documents
        == 30
    )


@pytest.mark.bad_input
def test_collect_refuses_a_short_corpus_in_one_line_and_keeps_the_run(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    collect = ["collect", "--run-dir", str(run), *SMALL["collect"], "--model.name", str(tiny_model_dir)]
    assert cli.main([*collect, "--data.dataset", str(corpus_file)]) == 0
    record = json.loads((run / "manifest.json").read_text())["stages"]["collect"]
    assert record["n_eval_windows"] > 0 and record["corpus"]["documents_read"] <= 120
    written = {
        p: p.read_bytes() for p in (run / "data" / "windows.npz", run / "activations" / "acts.safetensors")
    }
    assert cli.main([*collect, "--data.dataset", str(corpus_file), "--collect.n-train-tokens", "100000"]) == 1
    line = error_line(capsys.readouterr().err)
    assert (
        "DataError" in line and "ran out after 120 documents" in line and "--collect.n-train-tokens" in line
    )
    assert all(p.read_bytes() == data for p, data in written.items())
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["collect"]["outputs"] == record["outputs"]
