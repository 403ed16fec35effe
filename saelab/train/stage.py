"""The train stage: the run's SAE and those of `train.variants`, trained together in one pass over the
collected activations.

Artifacts (relative to the run folder): `sae/` (`cfg.json`, `sae.safetensors`, `train_log.jsonl`,
`checkpoints/`), and `sae-variants/<i>-<overrides>/` with the same files for each of `train.variants`. The SAE
folder's own layout is `saelab.sae.base.save`'s.

A training in progress writes its log (and TensorBoard / W&B files) and checkpoints into `.train.tmp/` inside the
SAE folder (`SAEFolder`); they replace the previous training's only when it has succeeded and its SAE is saved, so
a training that diverges, fails or is killed leaves the previous SAE, log and checkpoints as they were.
`--train.resume` continues from the checkpoints in `.train.tmp/` (a stopped training), else from the finished
training's (its log copied in to be continued). Under torchrun rank 0 alone writes.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.activations.onthefly import StreamSource
from saelab.activations.stage import CollectRecord
from saelab.activations.store import ActivationError
from saelab.config import TrainConfig, to_dict
from saelab.models.loading import resolve_hookpoint
from saelab.run.manifest import Run
from saelab.run.session import Session
from saelab.sae import base as sae_lib
from saelab.train.checkpoint import latest_checkpoint
from saelab.train.distributed import DistInfo
from saelab.train.log import TENSORBOARD_DIR
from saelab.train.trainer import TrainResult, train_many

SAE_DIR = "sae"
VARIANTS_DIR = "sae-variants"
HOOKPOINTS_DIR = "sae-hookpoints"
"""A streamed run's further hookpoints: `sae-hookpoints/<hookpoint>/sae/` and `.../sae-variants/...`."""
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
READS = ("collect",)
"""The stages whose artifacts train reads."""

STAGING = ".train.tmp"
"""Inside an SAE folder: what the training in progress writes, until it succeeds."""


@dataclass(frozen=True)
class SAEFolder:
    """One SAE's folder, and where the training in progress writes its log and checkpoints."""

    path: Path

    @property
    def staging(self) -> Path:
        return self.path / STAGING

    @property
    def log(self) -> Path:
        """The log the training in progress writes."""
        return self.staging / TRAIN_LOG

    @property
    def checkpoints(self) -> Path:
        """The checkpoints the training in progress writes."""
        return self.staging / CHECKPOINTS

    @property
    def finished_checkpoints(self) -> Path:
        """The last finished training's checkpoints (where `--train.resume` looks when `checkpoints` has none)."""
        return self.path / CHECKPOINTS

    def prepare(self, resume: bool) -> None:
        """Before training (rank 0): keep a stopped training's staging folder when resuming it from one of its
        checkpoints; otherwise start an empty one, holding a copy of the finished training's log when resuming
        from that training's checkpoints."""
        if resume and latest_checkpoint(self.checkpoints) is not None:
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        if resume and latest_checkpoint(self.finished_checkpoints) is not None:
            for name in (TRAIN_LOG, TENSORBOARD_DIR):
                if (self.path / name).is_dir():
                    shutil.copytree(self.path / name, self.staging / name)
                elif (self.path / name).exists():
                    shutil.copy2(self.path / name, self.staging / name)
        else:  # a fresh training's checkpoints (none with checkpoint_every 0) replace the old ones
            self.checkpoints.mkdir()

    def commit(self) -> None:
        """After the training succeeded: move what it wrote into the SAE folder, replacing the previous
        training's log, events and checkpoints."""
        for entry in sorted(self.staging.iterdir()):
            target = self.path / entry.name
            if target.is_dir():
                old = self.path / f".{entry.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                entry.rename(target)
                shutil.rmtree(old)
            else:
                entry.replace(target)
        self.staging.rmdir()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def variant_dir(i: int, text: str) -> str:
    """Folder (relative to the run) of `train.variants[i]`."""
    return f"{VARIANTS_DIR}/{i + 1}-{_slug(text)}"


def hookpoint_dir(hookpoint: str) -> str:
    """Folder (relative to the run) of the SAEs of a streamed run's further hookpoint."""
    return f"{HOOKPOINTS_DIR}/{_slug(hookpoint)}"


@dataclass(frozen=True)
class TrainRecord:
    """What later stages need from the train stage's manifest record: where its SAEs are."""

    variants: tuple[str, ...]
    """Folders (relative to the run) of the `train.variants` SAEs."""
    hookpoint_saes: tuple[str, ...] = ()
    """Folders (relative to the run) of the SAEs of a streamed run's further hookpoints."""

    @classmethod
    def of(cls, run: Run) -> TrainRecord:
        """The run's train record; refuses a run that has not been trained."""
        rec = run.require("train", "train")
        return cls(
            tuple(str(v["folder"]) for v in rec.get("variants", [])),
            tuple(str(v["folder"]) for v in rec.get("hookpoint_saes", [])),
        )


def load_run_sae(run: Run) -> sae_lib.SAE:
    """The run's SAE, after checking that the train stage's artifacts are the ones it recorded."""
    run.verify("train", "train")
    return sae_lib.load(run.folder / SAE_DIR)


def run_sae_sha256(run_folder: Path) -> str:
    """sha256 of the run's SAE file as it is now (a retrained SAE has a new one)."""
    return sae_lib.file_sha256(run_folder / SAE_DIR)


def _training_data(s: Session, collected: CollectRecord, hookpoints: tuple[str, ...]) -> Any:
    """The collected activations, or for a streamed run the on-the-fly source over the run's corpus, capturing
    `hookpoints` (the collected ones, then the transcoders' targets) from each forward."""
    if not collected.streamed:
        return collected.training_data(s.folder)
    t = s.cfg.train
    return StreamSource(
        s.lm(), s.cfg.data, s.cfg.seed, hookpoints, collected.n_tokens, t.batch_size,
        t.stream_buffer_rows, s.cfg.collect.batch_size, DistInfo.current().part,
    )  # fmt: skip


def _transcoder_targets(s: Session, collected: CollectRecord, cfgs: list[TrainConfig]) -> list[str]:
    """Each config's target hookpoint as a module name ('' for an SAE); transcoders need a streamed run and
    train at collect.hookpoint alone."""
    if not any(c.target_hookpoint for c in cfgs):
        return ["" for _ in cfgs]
    if not collected.streamed:
        raise ActivationError(
            f"a transcoder (--train.target-hookpoint) trains on its input and target row for row, but run "
            f"{s.folder} stored {collected.hookpoint}'s activations alone; train it on the fly: a new run with "
            "--collect.format stream (`saelab train` in a folder that holds no run starts one)"
        )
    if collected.extra_hookpoints:
        raise ActivationError(
            "a transcoder reads collect.hookpoint and reconstructs --train.target-hookpoint; leave out "
            "--collect.extra-hookpoints (train transcoders at other layers in runs of their own)"
        )
    targets = [
        resolve_hookpoint(s.lm().model, c.target_hookpoint) if c.target_hookpoint else "" for c in cfgs
    ]
    if collected.hookpoint in targets:
        raise ActivationError(
            f"--train.target-hookpoint {collected.hookpoint} is the input hookpoint: that is an SAE; leave it out, "
            "or name another module (e.g. the MLP whose input, after its norm, is collect.hookpoint)"
        )
    return targets


def stage_train(s: Session) -> None:
    """Train the SAE of `train` and those of `train.variants` together, one pass over the activations."""
    s.start("train", READS)
    collected = CollectRecord.of(s.run)
    base = [s.cfg.train, *s.cfg.train.variant_configs()]
    names = [SAE_DIR] + [variant_dir(i, v) for i, v in enumerate(s.cfg.train.variants)]
    cfgs, folders, slots = list(base), [SAEFolder(s.folder / n) for n in names], [0] * len(base)
    for h, hookpoint in enumerate(collected.extra_hookpoints, start=1):
        cfgs += base
        folders += [SAEFolder(s.folder / hookpoint_dir(hookpoint) / n) for n in names]
        slots += [h] * len(base)
    targets = _transcoder_targets(s, collected, cfgs)
    hookpoints = (*collected.hookpoints, *sorted({t for t in targets if t}))
    target_slots = [hookpoints.index(t) if t else None for t in targets]
    data = _training_data(s, collected, hookpoints)

    def fit() -> list[TrainResult]:
        return train_many(
            data, cfgs, s.cfg.seed, collected.hookpoint, s.cfg.model.name,
            [f.log for f in folders], [f.checkpoints for f in folders],
            previous_checkpoint_dirs=[f.finished_checkpoints for f in folders], slots=slots,
            target_slots=target_slots,
        )  # fmt: skip

    if (
        not DistInfo.current().is_main
    ):  # under torchrun, rank 0 alone writes logs, checkpoints, SAEs, manifest
        fit()
        return
    with s.run.stage("train", {"train": to_dict(s.cfg.train)}, READS) as rec:
        for folder, cfg in zip(folders, cfgs, strict=True):
            folder.prepare(cfg.resume)
        summaries = []
        for folder, result in zip(folders, fit(), strict=True):
            sae_lib.save(result.sae, folder.path)
            folder.commit()
            rec["outputs"] += [str(p.relative_to(s.folder)) for p in sae_lib.saved_files(folder.path)]
            summaries.append(
                {
                    "folder": str(folder.path.relative_to(s.folder)),
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "final_loss": result.final_loss,
                    "dead_fraction": result.dead_fraction,
                    "resumed_from": result.resumed_from,
                    "resample_events": [e._asdict() for e in result.resample_events],
                    "selection": result.selection,
                    "selection_rows_rechecked": result.rows_rechecked,
                }
            )
        rec.update({k: v for k, v in summaries[0].items() if k != "folder"})
        if len(base) > 1:
            rec["variants"] = summaries[1 : len(base)]
        if len(summaries) > len(base):
            rec["hookpoint_saes"] = summaries[len(base) :]
        if isinstance(data, StreamSource):
            rec["source"] = "stream"
            rec["stream"] = {"block_rows": data.block_rows, "hookpoints": data.hookpoints}
        rec["hashes"] = {"sae": run_sae_sha256(s.folder)}
