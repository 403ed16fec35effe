"""Confinement of the feature browser to its run folders: what a page reads must lie inside the served run.

A run folder is resolved once, when the browser starts; before each page, `link_out` walks the artifacts the page
reads for a symbolic link (or a linked folder) leading out of it, and `read_inside` opens a file by its real path
with O_NOFOLLOW, so that a link put in its place since is not followed either. A page that would read outside is
`Refused` (403). Used by `saelab.web.pages`; see `saelab.web.server` for the whole browser.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class Refused(Exception):
    """A file a page would read leads out of its run folder: answered with 403 and the message."""


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def link_out(root: Path, tops: tuple[str, ...]) -> tuple[str, str] | None:
    """(path relative to `root` as a page would read it, where it leads) of the first entry at or under
    `root/top` (each of `tops`) whose real path is outside `root`: a symbolic link out, or one inside a linked
    folder. None when all stay inside. Regular files in real folders are inside by construction, so only links
    cost a realpath."""
    base = str(root)
    seen: set[str] = set()

    def link(path: str, rel: str) -> tuple[str, str] | None:
        real = os.path.realpath(path)
        if not _within(real, base):
            return rel, real
        return folder(real, rel) if os.path.isdir(real) else None

    def folder(real: str, rel: str) -> tuple[str, str] | None:
        if real in seen:
            return None
        seen.add(real)
        with os.scandir(real) as entries:
            for e in entries:
                if e.is_symlink():
                    found = link(e.path, os.path.join(rel, e.name))
                elif e.is_dir(follow_symlinks=False):
                    found = folder(e.path, os.path.join(rel, e.name))
                else:
                    continue
                if found is not None:
                    return found
        return None

    for top in tops:  # `root` is a real path (resolved at start): only a link costs a realpath
        path = os.path.join(base, top)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or os.sep in top:  # a nested top may lie in a linked folder
            found = link(path, top)
        else:
            found = folder(path, top) if stat.S_ISDIR(mode) else None
        if found is not None:
            return found
    return None


def read_inside(root: Path, rel: str) -> bytes | None:
    """The bytes of the regular file `root/rel` (checked by `link_out` just before), or None when there is none;
    opened by its real path with O_NOFOLLOW, so that a link put in its place since is not followed."""
    real = os.path.realpath(root / rel)
    if not _within(real, str(root)):
        raise Refused(f"{rel} leads out of the run folder")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise Refused(f"{rel} cannot be opened ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read()
