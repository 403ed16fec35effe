"""The run context shared by stages run in one process: the run folder's manifest, the config, the subject model.

`saelab demo` runs every stage in one session (the subject model is loaded once); `saelab <stage> --run-dir R`
opens a session on the artifacts already in R. Each stage lives in its own package (`saelab.<package>.stage`)
and takes a `Session`; `saelab.pipeline` holds their order. `stage_session` holds the run's lock
(`saelab.run.lock`) while the stage runs; every stage begins with `Session.start`, which refuses, before any work,
inputs that are missing or altered and a rerun over results that later stages were made from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.config import RunConfig, from_dict, to_dict
from saelab.run import atomic
from saelab.run.lock import RunLock
from saelab.run.manifest import Run, RunError

if TYPE_CHECKING:
    from saelab.models.loading import LoadedModel

log = logging.getLogger("saelab")


@dataclass
class Session:
    """State shared by stages run in one process (the loaded subject model)."""

    cfg: RunConfig
    run: Run
    new: bool = False
    """The session collects (a new run, or collect run again): the subject model is the one configured, not
    necessarily the one the run recorded."""
    force: bool = False
    """Run a stage again even when later stages were made from its artifacts (they are dropped)."""
    lock: RunLock | None = field(default=None, repr=False)
    _lm: LoadedModel | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.run.folder

    def start(self, stage: str, reads: Iterable[str]) -> None:
        """Before any work: every stage in `reads` has run, the artifacts of those and of every stage they read
        are the ones recorded (upstream first, so a damaged file is named with the stage that remakes it), and
        `stage` does not replace artifacts that later stages were made from (unless `force`)."""
        reads = tuple(reads)
        for name in reads:
            self.run.require(name)
        self.run.verify_upstream(reads)
        self.run.check_rerun(stage, self.force)

    def announce(self, stage: str) -> None:
        """Name `stage` as the one holding the run's lock (`saelab demo` runs them in turn)."""
        if self.lock is not None:
            self.lock.announce(stage)

    def lm(self) -> LoadedModel:
        """The subject model, loaded on first use. A later stage refuses a model whose weights are not those the
        run's activations came from (collect records their hash)."""
        if self._lm is None:
            import torch

            from saelab.models.loading import load_model

            m = self.cfg.model
            if m.threads:
                torch.set_num_threads(m.threads)
            lm = load_model(m.name, m.dtype, m.device)
            recorded = self.run.data.get("hashes", {}).get("model")
            if not self.new and recorded and recorded != lm.weights_sha256:
                raise RunError(
                    f"the subject model {m.name} is not the one the activations of {self.folder} came from (its "
                    f"weights' sha256 is {lm.weights_sha256[:12]}…, the run recorded {recorded[:12]}…); restore "
                    f"the model, or collect again: `saelab collect --run-dir {self.folder} --force`"
                )
            if not self.new and not recorded:  # a run recorded before collect kept the hash
                self.run.set_hash("model", lm.weights_sha256)
            self._lm = lm
        return self._lm

    def tokenizer(self) -> Any:
        """The subject model's tokenizer, without loading the model when it is not loaded yet."""
        if self._lm is not None:
            return self._lm.tokenizer
        from saelab.models.loading import load_tokenizer

        return load_tokenizer(self.cfg.model.name)


def open_session(cfg: RunConfig, *, new: bool, force: bool = False) -> Session:
    """A session on `cfg.run_dir`. A new run records `cfg`; otherwise the model and data config come from the
    manifest (so a later stage always uses the model the activations came from), and `cfg`'s own sections for
    the later stages are kept."""
    if new:
        return Session(cfg, Run.create(cfg.run_dir, to_dict(cfg), cfg.seed), new=True, force=force)
    run = Run.open(cfg.run_dir)
    run.check_writable()
    # only the sections that decide the artifacts already there are read back: a later stage's section of an
    # older saelab (renamed settings) does not stop this run's other stages
    recorded = run.data.get("config", {})
    merged = dataclasses.replace(
        cfg,
        seed=recorded.get("seed", run.data.get("seed", cfg.seed)),
        **{
            name: from_dict(type(getattr(cfg, name)), recorded[name])
            for name in ("model", "data", "collect")
            if name in recorded
        },
    )
    return Session(merged, run, force=force)


@contextlib.contextmanager
def stage_session(cfg: RunConfig, stage: str, *, new: bool, force: bool = False) -> Iterator[Session]:
    """A session on `cfg.run_dir` that holds the run's lock until the block ends: a second saelab process that
    starts a stage on the same run meanwhile fails at once, naming this one (`saelab.run.lock`)."""
    folder = Path(cfg.run_dir)
    if new:
        folder.mkdir(parents=True, exist_ok=True)
    else:
        Run.open(folder)  # a folder without a run is refused before a lock file is made in it
    # torchrun's other ranks of one `train` only read the run: rank 0 holds the lock for them all
    lock = RunLock(folder, stage) if int(os.environ.get("RANK", "0")) == 0 else None
    with lock if lock is not None else contextlib.nullcontext():
        if lock is not None and (n := atomic.sweep_temporaries(folder)):
            log.info("%s: removed %d temporary file(s) a killed stage left", folder, n)
        session = open_session(cfg, new=new, force=force)
        session.lock = lock
        yield session
