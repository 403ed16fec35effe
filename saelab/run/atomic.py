"""Writing files so that a kill, a full disk or an error never leaves half a file under its final name.

Every artifact a later stage reads, and every report, is written under `<name>.tmp` beside its final name and
renamed onto it (one atomic rename on a POSIX file system); a write that fails removes its temporary file. A
folder of files is built the same way as `<folder>.tmp` (collect's store, the latent cache, checkpoints)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; renamed onto `path` when the block ends without error."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed flush or close names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` (UTF-8), or is left as it was."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """`path` holds `data` as JSON, or is left as it was."""
    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")
