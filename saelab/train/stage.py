"""The train stage: the run's SAE and those of `train.variants`, trained together in one pass over the
collected activations.

Artifacts (relative to the run folder): `sae/` (`cfg.json`, `sae.safetensors`, `train_log.jsonl`,
`checkpoints/`), and `sae-variants/<i>-<overrides>/` with the same files for each of `train.variants`. The SAE
folder's own layout is `saelab.sae.base.save`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from saelab.activations.stage import CollectRecord
from saelab.config import to_dict
from saelab.run.manifest import Run
from saelab.run.session import Session
from saelab.sae import base as sae_lib
from saelab.train.distributed import DistInfo
from saelab.train.trainer import TrainResult, train_many

SAE_DIR = "sae"
VARIANTS_DIR = "sae-variants"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
READS = ("collect",)
"""The stages whose artifacts train reads."""


def variant_dir(i: int, text: str) -> str:
    """Folder (relative to the run) of `train.variants[i]`."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]
    return f"{VARIANTS_DIR}/{i + 1}-{slug}"


@dataclass(frozen=True)
class TrainRecord:
    """What later stages need from the train stage's manifest record: where its SAEs are."""

    variants: tuple[str, ...]
    """Folders (relative to the run) of the `train.variants` SAEs."""

    @classmethod
    def of(cls, run: Run) -> TrainRecord:
        """The run's train record; refuses a run that has not been trained."""
        rec = run.require("train", "train")
        return cls(tuple(str(v["folder"]) for v in rec.get("variants", [])))


def load_run_sae(run: Run) -> sae_lib.SAE:
    """The run's SAE, after checking that the train stage's artifacts are the ones it recorded."""
    run.verify("train", "train")
    return sae_lib.load(run.folder / SAE_DIR)


def run_sae_sha256(run_folder: Path) -> str:
    """sha256 of the run's SAE file as it is now (a retrained SAE has a new one)."""
    return sae_lib.file_sha256(run_folder / SAE_DIR)


def stage_train(s: Session) -> None:
    """Train the SAE of `train` and those of `train.variants` together, one pass over the activations."""
    s.start("train", READS)
    collected = CollectRecord.of(s.run)
    data = collected.training_data(s.folder)
    cfgs = [s.cfg.train, *s.cfg.train.variant_configs()]
    folders = [s.folder / SAE_DIR] + [
        s.folder / variant_dir(i, v) for i, v in enumerate(s.cfg.train.variants)
    ]

    def fit() -> list[TrainResult]:
        return train_many(
            data, cfgs, s.cfg.seed, collected.hookpoint, s.cfg.model.name,
            [f / TRAIN_LOG for f in folders], [f / CHECKPOINTS for f in folders],
        )  # fmt: skip

    if (
        not DistInfo.current().is_main
    ):  # under torchrun, rank 0 alone writes logs, checkpoints, SAEs, manifest
        fit()
        return
    with s.run.stage("train", {"train": to_dict(s.cfg.train)}, READS) as rec:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        summaries = []
        for folder, result in zip(folders, fit(), strict=True):
            sae_lib.save(result.sae, folder)
            rec["outputs"] += [str(p.relative_to(s.folder)) for p in sae_lib.saved_files(folder)]
            summaries.append(
                {
                    "folder": str(folder.relative_to(s.folder)),
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "final_loss": result.final_loss,
                    "dead_fraction": result.dead_fraction,
                    "resumed_from": result.resumed_from,
                    "resample_events": [e._asdict() for e in result.resample_events],
                }
            )
        rec.update({k: v for k, v in summaries[0].items() if k != "folder"})
        if len(summaries) > 1:
            rec["variants"] = summaries[1:]
        rec["hashes"] = {"sae": run_sae_sha256(s.folder)}
