"""Run records: the manifest of a run folder (config, seed, code version, hashes, time per stage).

Each stage records its config, wall time, peak memory, and the sha256 of every artifact it wrote. A later stage
verifies the hashes of the artifacts it reads against the manifest, so one run's results cannot be passed off as
another's and an artifact altered after the fact is refused with its name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import saelab

MANIFEST = "manifest.json"
_PACKAGES = ("torch", "transformers", "numpy", "safetensors", "tyro", "gguf")


class RunError(RuntimeError):
    """The run folder is inconsistent: a missing stage, or an artifact whose hash does not match."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    """Commit of the saelab checkout, when it runs from one."""
    root = Path(saelab.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class Run:
    """A run folder and its manifest."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @classmethod
    def create(cls, folder: Path | str, config: dict[str, Any], seed: int) -> Run:
        run = cls(folder)
        run.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(run.folder, os.W_OK):
            raise RunError(f"run folder {run.folder} is not writable; pass another --run-dir")
        if not run.data:
            run.data = {
                "saelab_version": saelab.__version__,
                "git_commit": git_commit(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "packages": _versions(),
                "seed": seed,
                "config": config,
                "hashes": {},
                "stages": {},
            }
        run.data["config"] = config
        run.save()
        return run

    @classmethod
    def open(cls, folder: Path | str) -> Run:
        run = cls(folder)
        if not run.data:
            raise RunError(
                f"{run.path} not found; start the run with `saelab collect --run-dir {folder}` (or demo)"
            )
        return run

    def save(self) -> None:
        tmp = self.path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.rename(self.path)

    @property
    def stages(self) -> dict[str, Any]:
        return self.data.setdefault("stages", {})

    def require(self, stage: str, hint: str) -> dict[str, Any]:
        if stage not in self.stages:
            raise RunError(
                f"stage {stage!r} has not run in {self.folder}; run `saelab {hint} --run-dir {self.folder}`"
            )
        return self.stages[stage]

    def verify(self, stage: str, hint: str) -> None:
        """Check that the artifacts `stage` wrote are still the ones it recorded."""
        for rel, digest in self.require(stage, hint)["outputs"].items():
            path = self.folder / rel
            if not path.exists():
                raise RunError(f"artifact {rel} of stage {stage!r} is missing; rerun `saelab {hint}`")
            if sha256_file(path) != digest:
                raise RunError(
                    f"artifact {rel} was altered after stage {stage!r} wrote it (sha256 differs from the manifest); "
                    f"rerun `saelab {hint} --run-dir {self.folder}`"
                )

    @contextmanager
    def stage(self, name: str, config: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills `record['outputs']` (relative paths) and may add other keys.

        `config` maps config sections to the values this stage ran with; they also replace those sections in
        the manifest's `config`, which so always holds the configuration the artifacts were made with."""
        record: dict[str, Any] = {"config": config, "outputs": []}
        start = time.perf_counter()
        yield record
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["outputs"] = {rel: sha256_file(self.folder / rel) for rel in record["outputs"]}
        self.stages[name] = record
        self.data.setdefault("config", {}).update(config)
        self.save()

    def set_hash(self, key: str, value: str) -> None:
        self.data.setdefault("hashes", {})[key] = value
        self.save()
