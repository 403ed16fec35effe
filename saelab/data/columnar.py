"""Columnar corpora: Parquet files, Arrow IPC files or streams (`.arrow`, `.feather`) and `datasets.save_to_disk`
folders, read record batch by record batch and only the one column asked for (pyarrow, the `data` extra; a
save_to_disk folder also needs `datasets`). Part of `saelab.data.corpus`, which says what the corpus forms are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saelab.data.corpus import DataError, check_vocab, is_hf_folder

BATCH_ROWS = 1024
"""Rows read per record batch."""
INSTALL = "`pip install 'saelab[data]'` (pyarrow, datasets)"


def texts(path: Path, field: str) -> Iterator[str]:
    """The non-empty strings of column `field`."""
    pa = _pyarrow(path)
    for where, start, column in _batches(path, field, "--data.text-field"):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(
                f"{where}: column {field!r} holds {column.type}, not strings; set --data.text-field to the "
                "column holding the text (or --data.token-field if it holds token ids)"
            )
        _refuse_nulls(column, where, start, field)
        for text in column.to_pylist():
            if text.strip():
                yield text


def token_lists(path: Path, field: str, vocab_size: int) -> Iterator[np.ndarray]:
    """The non-empty token-id lists of column `field`, as 1-D int64 arrays; ids outside `[0, vocab_size)` are
    refused."""
    pa = _pyarrow(path)
    for where, start, column in _batches(path, field, "--data.token-field"):
        kind = column.type
        listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        if not (listed and pa.types.is_integer(kind.value_type)):
            raise DataError(
                f"{where}: column {field!r} holds {kind}, not lists of token ids; set --data.token-field to the "
                "column holding the ids (or leave it empty for text)"
            )
        _refuse_nulls(column, where, start, field)
        ids = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        check_vocab(ids, vocab_size, f"{where} (rows {start}-{start + len(column) - 1})")
        lengths = np.asarray(pa.compute.list_value_length(column).to_numpy(zero_copy_only=False))
        for doc in np.split(ids, np.cumsum(lengths)[:-1]):
            if len(doc):
                yield doc


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow as pa
        import pyarrow.compute  # list_value_length
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: {INSTALL}") from err
    return pa


def _batches(path: Path, field: str, flag: str) -> Iterator[tuple[str, int, Any]]:
    """(where, first row, column array) of each record batch of the source's column `field`."""
    names, batches = _open(path, field)
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names)}); set {flag}")
    start = 0
    for column in batches:
        yield str(path), start, column
        start += len(column)


def _open(path: Path, field: str) -> tuple[list[str], Iterator[Any]]:
    """The source's column names and a lazy iterator over its column `field`, batch by batch."""
    import pyarrow as pa

    if is_hf_folder(path):
        return _open_hf(path, field)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        names = parquet.schema_arrow.names
        return names, (b.column(0) for b in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[field]))
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as err:
            raise DataError(f"{path}: not an Arrow IPC file or stream (Feather v2) ({err})") from err
        batches = iter(reader)
    names = reader.schema.names
    return names, (b.column(field) for b in batches)


def _open_hf(path: Path, field: str) -> tuple[list[str], Iterator[Any]]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{path} is a save_to_disk folder; reading it needs datasets: {INSTALL}") from err
    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is read until iterated
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    names = list(ds.column_names)
    if field not in names:
        return names, iter(())
    table = ds.select_columns([field]).with_format("arrow")
    return names, (b.column(0).combine_chunks() for b in table.iter(batch_size=BATCH_ROWS))


def _refuse_nulls(column: Any, where: str, start: int, field: str) -> None:
    if column.null_count:
        row = start + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{where}: row {row} of column {field!r} is null; drop or fill the empty rows")
