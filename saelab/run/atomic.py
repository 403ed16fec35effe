"""Writing files so that a kill, a full disk or an error never leaves half a file under its final name.

Every artifact a later stage reads, and every report, is written under a temporary name of its own beside its final
name (`<name>.<random>.tmp`, created exclusively, so two writers of one file never share one) and renamed onto it
(one atomic rename on a POSIX file system); a write that fails removes its temporary file. The temporary file is
created with the mode any new file gets (0666 less the umask, as `open` makes it), so an artifact written through
one has the same permissions as the files written directly. A folder of files is built as `<folder>.tmp`
(collect's store, the latent cache): a killed build is resumed from it, and the run's lock
(`saelab.run.lock`) keeps two stages from building one at once."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r".+\.[0-9a-f]{8}\.tmp")


def temporary_path(path: Path) -> Path:
    """A new, empty file beside `path` that no other writer uses (`<name>.<random>.tmp`), mode 0666 less the umask."""
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:  # a full or read-only disk: name the file being written, not its temporary
            raise OSError(err.errno, err.strerror, str(path)) from err
        return tmp


def sweep_temporaries(root: Path) -> int:
    """Remove every temporary file (`<name>.<random>.tmp`) a killed writer left anywhere under `root`; how many
    there were. Only for a folder no other writer can be using: a run whose lock this process holds, or a folder
    build it resumes."""
    n = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if _TEMPORARY.fullmatch(name):
                Path(folder, name).unlink(missing_ok=True)
                n += 1
    return n


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; renamed onto `path` when the block ends without error."""
    tmp = temporary_path(path)
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
