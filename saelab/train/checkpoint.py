"""Training checkpoints: what it takes to continue a run bit-for-bit, written so that a kill never corrupts one.

A checkpoint is a folder `step-00000100/` inside the checkpoint folder, holding
- `trainer.pt`: the SAE as trained (on scaled inputs), the optimizer, the step, the dead-latent counters, the RNG
  states (shuffling generator at the epoch's start, resampling generator, torch's global RNG), the resampler's
  statistics and the run's fingerprint; read with `torch.load(weights_only=True)`;
- `meta.json`: step and fingerprint, for people.
It is written as `.step-00000100.tmp/`, synced, renamed into place, and only then are older checkpoints removed, so
the newest complete checkpoint always exists. `checkpoint_sae` rebuilds a checkpoint's SAE folded for raw inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from saelab.sae.base import SAE, SAEConfig, build

_PREFIX = "step-"
STATE_FILE = "trainer.pt"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or from another run; the message says what to do."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically and keep only it; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:08d}"
    tmp, final = folder / f".{name}.tmp", folder / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))
    for f in (STATE_FILE, META_FILE):
        _fsync(tmp / f)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(folder)
    for old in folder.glob(f"{_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (unfinished `.tmp` folders are ignored), or None."""
    done = (
        sorted(p for p in folder.glob(f"{_PREFIX}*") if (p / META_FILE).exists()) if folder.exists() else []
    )
    return done[-1] if done else None


def clear_checkpoints(folder: Path) -> None:
    """Remove every checkpoint, finished or not (a fresh run must not be resumed from an older one)."""
    if folder.exists():
        for p in [*folder.glob(f"{_PREFIX}*"), *folder.glob(f".{_PREFIX}*.tmp")]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({err}); delete it to resume from an earlier one"
        ) from err
    return state


def checkpoint_sae(path: Path) -> SAE:
    """The SAE of a checkpoint, folded to take raw activations (like the one `train` returns), in eval mode."""
    state = load_checkpoint(path)
    sae = build(SAEConfig.from_json(state["sae_config"]))
    sae.load_state_dict(state["sae"])
    sae.fold_scales(state["scale"], state.get("target_scale", state["scale"]))
    return sae.eval()
