"""Naming a broken artifact: which of a served run's artifacts its stage's loader cannot read, and the command
that writes it again.

The browser (`saelab.web.pages`) answers a page that failed on an unreadable artifact with these lines instead of
a bare 500; `signature` lets it read a broken run whole only once until one of its artifacts changes.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saelab.autointerp.explain import EXPLANATIONS, load_explanations
from saelab.latents.cache import LATENTS, LatentCache
from saelab.latents.sampling import SAMPLES, SampleSet
from saelab.web.data import SAE_WEIGHTS, SCORES


def _read_jsonl(path: Path) -> None:
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    raise ValueError(f"line {n}: {err}") from None


def _read_cache(path: Path) -> None:
    cache = LatentCache.open(path)
    for shard in cache.info.shards:
        if shard.end > shard.start:
            cache.latent(shard.start)


def _read_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        fh.keys()


@dataclass(frozen=True)
class Artifact:
    """A run artifact the browser reads, and how to tell that it is unreadable."""

    rel: str
    """Its path in the run folder."""
    stage: str
    """The saelab command that writes it."""
    read: Callable[[Path], object]
    """Reads it whole, with its owner's loader where there is one; raises when it is unreadable."""


ARTIFACTS = (
    Artifact(EXPLANATIONS, "explain", load_explanations),
    Artifact(SCORES, "score", _read_jsonl),
    Artifact(SAMPLES, "sample", SampleSet.load),
    Artifact(LATENTS, "cache", _read_cache),
    Artifact(SAE_WEIGHTS, "train", _read_safetensors),
)


def signature(folder: Path) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for a in ARTIFACTS:
        try:
            st = os.stat(folder / a.rel)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def unreadable(folder: Path) -> list[str]:
    """One line for each of the run's artifacts that cannot be read, naming the command that writes it again."""
    found = []
    for a in ARTIFACTS:
        path = folder / a.rel
        if not path.exists():
            continue
        try:
            a.read(path)
        except Exception as err:  # whatever the loader raises: the page names it, the log has the traceback
            why = f"{type(err).__name__}: {err}"
            found.append(
                f"{a.rel} is unreadable ({why[:300]}); rerun `saelab {a.stage} --run-dir "
                f"{shlex.quote(str(folder))}` to write it again (and the stages after it that you use)"
            )
    return found
