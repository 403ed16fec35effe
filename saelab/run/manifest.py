"""Run records: the manifest of a run folder (config, seed, code version, hashes, time per stage).

Each stage records its config, wall time, peak memory, the sha256 of every artifact it wrote, and the stages whose
artifacts it read (`reads`). Before it runs, a stage verifies the artifacts of every stage it reads, directly or
through another, upstream first, so one run's results cannot be passed off as another's, and an artifact altered
after the fact is refused with its name and the one command that remakes it (the same at every later stage).

A stage run again over artifacts that later stages were made from is refused unless `--force`; with it, those
later stages are dropped from the manifest when it is recorded (unless it wrote the very same bytes again), so the
manifest never lists a result beside artifacts it was not made from. A derived stage (the report, remade from the
manifest in seconds) never stops a rerun; it is dropped all the same. Every update re-reads the manifest and
changes only its own keys, so an update made by another process in between is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import saelab
from saelab.run import atomic

log = logging.getLogger(__name__)

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
    for key in ("stages", "hashes", "config", "invalidated"):
        if not isinstance(data.get(key, {}), dict):
            return f"its {key!r} is not an object"
    for name, rec in data.get("stages", {}).items():
        if not isinstance(rec, dict) or not isinstance(rec.get("outputs", {}), dict):
            return f"its record of stage {name!r} is not an object with outputs"
        if not isinstance(rec.get("reads", []), list):
            return f"its record of stage {name!r} has reads that are not a list"
    return None


def _reads(stages: dict[str, Any], name: str) -> list[str]:
    """The recorded stages `name` read; a record of an older saelab, which does not say, read every stage recorded
    before it."""
    rec = stages[name]
    if "reads" in rec:
        return [str(r) for r in rec["reads"] if r in stages]
    names = list(stages)
    return names[: names.index(name)]


def upstream(stages: dict[str, Any], reads: Iterable[str]) -> list[str]:
    """The recorded stages among `reads` and those they read in turn, each one after every stage it read."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in visiting or name not in stages:  # `visiting`: a hand-edited cycle
            return
        visiting.add(name)
        for r in _reads(stages, name):
            visit(r)
        order.append(name)

    for name in reads:
        visit(name)
    return order


def dependents(stages: dict[str, Any], name: str) -> list[str]:
    """The recorded stages made from `name`'s artifacts, directly or through another stage."""
    return [d for d in stages if d != name and name in upstream(stages, _reads(stages, d))]


def _record(data: dict[str, Any], name: str, record: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Put stage `name`'s `record` into the manifest `data`, dropping the stages made from its earlier artifacts
    (none when it wrote the same bytes again); returns the dropped stages."""
    stages = data.setdefault("stages", {})
    hashes = data.setdefault("hashes", {})
    old = stages.get(name)
    same = old is not None and (old.get("outputs"), old.get("hashes", {})) == (
        record["outputs"],
        record.get("hashes", {}),
    )
    dropped = [] if same else dependents(stages, name)
    for d in dropped:
        for key in stages.pop(d).get("hashes", {}):
            hashes.pop(key, None)
        data.setdefault("invalidated", {})[d] = name
    stages[name] = record
    data.get("invalidated", {}).pop(name, None)
    if data.get("invalidated") == {}:
        del data["invalidated"]
    hashes.update(record.get("hashes", {}))
    data.setdefault("config", {}).update(config)
    if "seed" in config:
        data["seed"] = config["seed"]
    return dropped


def file_state(path: Path) -> list[int]:
    """What a change to `path` changes: size, inode, and modification and status-change times in ns. The status
    change time (ctime) is set by the kernel on every write, rename or chmod and cannot be set back by a user
    (as `touch -d` sets mtime), so an equal state means the file was not written since (git's index uses the
    same rule to skip re-reading files)."""
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


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
        """The run in `folder`, made with `config` when there is none yet. An existing run is left as it is: the
        stages that run record their own config sections when they finish."""
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
            run.save()
        return run

    @classmethod
    def open(cls, folder: Path | str) -> Run:
        run = cls(folder)
        if not run.data:
            raise RunError(
                f"{run.path} not found; start the run with `saelab collect --run-dir {folder}` (or demo), or train "
                f"on the fly with `saelab train --run-dir {folder} --collect.format stream`"
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

    def command(self, stage: str) -> str:
        """The command that runs `stage` again on this run (with `--force` when later stages were made from it)."""
        later = [d for d in dependents(self.stages, stage) if not self.stages[d].get("derived")]
        return f"saelab {stage} --run-dir {self.folder}" + (" --force" if later else "")

    def require(self, stage: str, hint: str | None = None) -> dict[str, Any]:
        if stage not in self.stages:
            by = self.data.get("invalidated", {}).get(stage)
            why = (
                f"was dropped from {self.folder} when {by!r} ran again (it was made from the artifacts {by} "
                "replaced)"
                if by
                else f"has not run in {self.folder}"
            )
            raise RunError(f"stage {stage!r} {why}; run `saelab {hint or stage} --run-dir {self.folder}`")
        record: dict[str, Any] = self.stages[stage]
        return record

    def verify(self, stage: str, hint: str | None = None) -> None:
        """Check that the artifacts `stage` wrote are still the ones it recorded; the error names the command that
        writes them again."""
        fix = self.command(hint or stage)
        record = self.require(stage, hint)
        states = record.get("states", {})
        for rel, digest in record["outputs"].items():
            path = self.folder / rel
            if not path.exists():
                raise RunError(f"artifact {rel} of stage {stage!r} is missing; rerun `{fix}`")
            if states.get(rel) == file_state(path):  # not written since it was hashed: not read again
                continue
            if sha256_file(path) != digest:
                raise RunError(
                    f"artifact {rel} was altered after stage {stage!r} wrote it (sha256 differs from the manifest); "
                    f"rerun `{fix}`"
                )

    def verify_upstream(self, reads: Iterable[str]) -> None:
        """Verify every recorded stage among `reads` and those they read in turn, upstream first: a damaged
        artifact is named with the stage that wrote it, whichever later stage finds it."""
        for stage in upstream(self.stages, reads):
            self.verify(stage)

    def check_rerun(self, stage: str, force: bool) -> None:
        """Refuse, before any work, to run `stage` again over artifacts that later stages were made from, unless
        `force` (they are dropped from the manifest when it is recorded). A derived stage (the report) is no
        reason to refuse."""
        later = [d for d in dependents(self.stages, stage) if not self.stages[d].get("derived")]
        if later and not force:
            them = "that stage" if len(later) == 1 else "those stages"
            raise RunError(
                f"{stage} would replace the artifacts that {', '.join(later)} in {self.folder} were made from; "
                f"pass --force to run it again and drop {them} from the manifest (then run {them} again), or pass "
                "another --run-dir for a new run"
            )

    @contextmanager
    def stage(
        self, name: str, config: dict[str, Any], reads: Iterable[str] = (), derived: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills `record['outputs']` (relative paths) and may add other keys (`hashes`:
        provenance hashes that go to the manifest's `hashes`).

        `config` maps config sections to the values this stage ran with; they also replace those sections in
        the manifest's `config`, which so always holds the configuration the artifacts were made with. `reads`
        are the stages whose artifacts it read; `derived` marks a stage whose artifacts are remade from the
        others' in seconds (the report). The stages made from this one's earlier artifacts are dropped."""
        record: dict[str, Any] = {"config": config, "reads": list(reads), "outputs": []}
        if derived:
            record["derived"] = True
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
        # later stages verify these files by their state and hash only what was written since (a stored run's
        # activations are read whole once, not by every stage after collect)
        record["states"] = {rel: file_state(self.folder / rel) for rel in record["outputs"]}
        dropped = self._commit(lambda data: _record(data, name, record, config))
        if dropped:
            log.warning(
                "%s: dropped %s from the manifest (made from the artifacts it replaced); run %s again",
                name, ", ".join(dropped), "it" if len(dropped) == 1 else "them",
            )  # fmt: skip

    def set_hash(self, key: str, value: str) -> None:
        def change(data: dict[str, Any]) -> None:
            data.setdefault("hashes", {})[key] = value

        self._commit(change)
