"""Where the trainer's log records go: a JSONL file, TensorBoard, Weights & Biases (`TrainConfig.log_to`).

Records are flat dicts with a `step`; metric records hold numbers (loss parts, L0, dead fraction, explained
variance, learning rate), event records an `event` name (e.g. `resample`). TensorBoard and W&B are optional: asking
for one that is not installed is an error before training starts, never a silent no-op. A resumed run first drops
the records at or after the step it resumes from, so the log reads as if the run had never stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event folder, beside the JSONL log."""


class LogSinkError(ValueError):
    """A requested log sink cannot be used; the message says what to install or change."""


class Sink(Protocol):
    def write(self, rec: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line."""

    def __init__(self, path: Path, resume_step: int) -> None:
        if resume_step and path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(path)
        self.f = path.open("a" if resume_step else "w")

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    """Scalars under `train/` (metrics) and `events/` (event counts)."""

    def __init__(self, log_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events a stopped run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step or None)

    def write(self, rec: dict[str, Any]) -> None:
        group = f"events/{rec['event']}" if "event" in rec else "train"
        for key, value in rec.items():
            if key not in ("step", "event", "method") and isinstance(value, int | float):
                self.writer.add_scalar(f"{group}/{key}", value, rec["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run (project from $WANDB_PROJECT, else `saelab`; offline with WANDB_MODE=offline)."""

    def __init__(self, config: dict[str, Any], folder: Path | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "saelab"),
            config=config,
            dir=str(folder) if folder else None,
        )

    def write(self, rec: dict[str, Any]) -> None:
        prefix = f"{rec['event']}/" if "event" in rec else ""
        values = {
            prefix + k: v for k, v in rec.items() if k not in ("step", "event") and isinstance(v, int | float)
        }
        self.run.log(values, step=rec["step"])

    def close(self) -> None:
        self.run.finish()


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise LogSinkError(
            f"train.log_to asks for {package}, but the {package} package is not installed; "
            f"`pip install {package}` or leave it out of --train.log-to"
        )


def check_sinks(kinds: tuple[str, ...], log_path: Path | None) -> None:
    """Refuse sinks that cannot be used, before any work is done."""
    for kind in ("tensorboard", "wandb"):
        if kind in kinds:
            _require(kind)
    if log_path is None and "tensorboard" in kinds:
        raise LogSinkError("train.log_to asks for tensorboard, but no log folder was given")


class TrainLog:
    """The sinks named in `kinds`; `enabled=False` (data-parallel ranks other than 0) writes nothing."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        log_path: Path | None,
        resume_step: int,
        config: dict[str, Any],
        enabled: bool = True,
    ) -> None:
        check_sinks(kinds, log_path)
        self.sinks: list[Sink] = []
        if not enabled:
            return
        if "jsonl" in kinds and log_path is not None:
            self.sinks.append(JsonlSink(log_path, resume_step))
        if "tensorboard" in kinds and log_path is not None:
            self.sinks.append(TensorBoardSink(log_path.parent / TENSORBOARD_DIR, resume_step))
        if "wandb" in kinds:
            self.sinks.append(WandbSink(config, log_path.parent if log_path else None))

    def write(self, rec: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(rec)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
