"""Run records: the manifest of a run folder (config, seed, code version, hashes, time per stage).

Each stage records its config, wall time, peak memory, and the sha256 of every artifact it wrote. A later stage
verifies the hashes of the artifacts it reads against the manifest, so one run's results cannot be passed off as
another's and an artifact altered after the fact is refused with its name. Every update re-reads the manifest and
changes only its own keys, so an update made by another process in between is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import saelab
from saelab.run import atomic

MANIFEST = "manifest.json"
_PACKAGES = (
    "torch", "transformers", "accelerate", "numpy", "safetensors", "tyro", "gguf", "scikit-learn", "matplotlib",
    "httpx", "tokenizers", "duckdb",
)  # fmt: skip


class RunError(RuntimeError):
    """The run folder is inconsistent: a missing stage, or an artifact whose hash does not match."""


_T = TypeVar("_T")
_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path` ({} when there is none); a file that is no saelab manifest is refused naming it."""
    if not path.exists():
        return {}
    fix = "restore it from a copy of the run, or start a new run in another --run-dir"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err}); {fix}") from None
    problem = _manifest_problem(data)
    if problem is not None:
        raise RunError(f"{path} is not a saelab manifest ({problem}); {fix}")
    return dict(data)


def _manifest_problem(data: Any) -> str | None:
    """What makes `data` no manifest, or None."""
    if not isinstance(data, dict):
        return f"a JSON {_JSON_TYPES.get(type(data), type(data).__name__)}, not an object"
    for key in ("stages", "hashes", "config"):
        if not isinstance(data.get(key, {}), dict):
            return f"its {key!r} is not an object"
    for name, rec in data.get("stages", {}).items():
        if not isinstance(rec, dict) or not isinstance(rec.get("outputs", {}), dict):
            return f"its record of stage {name!r} is not an object with outputs"
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _git(*args: str) -> str | None:
    """Output of a git command in the saelab checkout, or None when it does not run from one."""
    root = Path(saelab.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """Commit of the saelab checkout, when it runs from one."""
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> bool | None:
    """Whether the saelab checkout has uncommitted changes (then the commit alone does not pin the code)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def _reset_peak_memory() -> bool:
    """Start a stage's peak-memory window: Linux resets VmHWM on `echo 5 > /proc/self/clear_refs`; CUDA keeps
    its own counter. False where the reset is not possible (then the process-wide peak is recorded)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory(stage_scoped: bool) -> dict[str, Any]:
    """Peak resident memory of the stage (or of the process so far when not `stage_scoped`), and the CUDA peak
    when CUDA is in use, in MiB."""
    out: dict[str, Any] = {}
    if stage_scoped:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
                    out["peak_rss_scope"] = "stage"
    if "peak_rss_mib" not in out:
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["peak_rss_scope"] = "process"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


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
        self.data: dict[str, Any] = read_manifest(self.path)

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
                "git_dirty": git_dirty(),
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

    def check_writable(self) -> None:
        """Refuse, before any work, a stage whose run folder cannot be written."""
        if not os.access(self.folder, os.W_OK):
            raise RunError(
                f"run folder {self.folder} is not writable; make it writable or copy the run to a writable place"
            )

    def check_free_space(self, need_bytes: int, what: str, fix: str) -> None:
        """Refuse, before any work, a stage whose artifacts will not fit on the run folder's disk."""
        free = shutil.disk_usage(self.folder).free
        if need_bytes > free:
            raise RunError(
                f"{what} needs about {need_bytes / 2**30:.2f} GiB in {self.folder} but {free / 2**30:.2f} GiB "
                f"are free; free space, {fix}, or pass another --run-dir"
            )

    def save(self) -> None:
        """Write the manifest as held here (a new run's first manifest; updates go through `_commit`)."""
        atomic.write_json(self.path, self.data)

    def _commit(self, change: Callable[[dict[str, Any]], _T]) -> _T:
        """Apply `change` to the manifest as it is on disk now and write it: an update another process made since
        this one read it is kept, not overwritten."""
        data = read_manifest(self.path) or self.data
        out = change(data)
        atomic.write_json(self.path, data)
        self.data = data
        return out

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
        scoped = _reset_peak_memory()
        start = time.perf_counter()
        yield record
        record["seconds"] = round(time.perf_counter() - start, 3)
        record.update(_peak_memory(scoped))
        # the code that ran this stage (a run's stages may run under different checkouts)
        record["saelab_version"] = saelab.__version__
        record["git_commit"] = git_commit()
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["outputs"] = {rel: sha256_file(self.folder / rel) for rel in record["outputs"]}

        def change(data: dict[str, Any]) -> None:
            data.setdefault("stages", {})[name] = record
            data.setdefault("config", {}).update(config)

        self._commit(change)

    def set_hash(self, key: str, value: str) -> None:
        def change(data: dict[str, Any]) -> None:
            data.setdefault("hashes", {})[key] = value

        self._commit(change)
