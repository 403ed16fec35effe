"""The collect stage: the run's token windows and the training activations at the hookpoint.

Artifacts (relative to the run folder): `data/windows.npz` (owned by `saelab.data.windows`), and either
`activations/acts.safetensors` (`--collect.format file`) or the sharded store `activations/store/`
(`--collect.format store`); with `--collect.format stream` only the held-out windows, no activations (train
generates them on the fly, `saelab.activations.onthefly`). Rows are written shard by shard (for `format=file` into `activations/rows`, joined into
one file at the end), so `--collect.resume` after a kill collects only the rows after the last finished shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.activations.store import (
    ActivationError,
    Activations,
    ActivationStore,
    CollectProgress,
    collect_to_store,
)
from saelab.config import CollectConfig, to_dict
from saelab.data.windows import TokenWindows, read_held_out, read_windows
from saelab.models.loading import LoadedModel, resolve_hookpoint
from saelab.run.manifest import Run
from saelab.run.session import Session

log = logging.getLogger(__name__)

ACTS = "activations/acts.safetensors"
STORE = "activations/store"
ROWS = "activations/rows"


@dataclass(frozen=True)
class CollectRecord:
    """What later stages need from the collect stage's manifest record."""

    hookpoint: str
    format: str
    n_tokens: int
    """Rows collected; for `stream`, the training tokens an epoch takes."""
    extra_hookpoints: tuple[str, ...] = ()
    """`stream`: the further hookpoints trained from the same forwards."""

    @classmethod
    def of(cls, run: Run) -> CollectRecord:
        """The run's collect record; refuses a run that has not been collected."""
        rec = run.require("collect", "collect")
        return cls(
            str(rec["hookpoint"]),
            str(rec.get("format", "file")),
            int(rec.get("n_tokens", 0)),
            tuple(str(h) for h in rec.get("extra_hookpoints", ())),
        )

    @property
    def streamed(self) -> bool:
        """No training activations are stored: train generates them from the corpus."""
        return self.format == "stream"

    @property
    def hookpoints(self) -> tuple[str, ...]:
        return (self.hookpoint, *self.extra_hookpoints)

    def training_data(self, run_folder: Path) -> torch.Tensor | ActivationStore:
        """The collected activations: the sharded store, or the single file loaded as float32 rows."""
        if self.streamed:
            raise ActivationError(
                f"run {run_folder} streams its training activations (collect.format stream): none are stored; "
                "train generates them from the corpus"
            )
        if self.format == "store":
            return ActivationStore(run_folder / STORE)
        return Activations.load(run_folder / ACTS).acts_ND.float()


def stage_collect(s: Session) -> None:
    """Windows and activations (see the module docstring)."""
    s.start("collect", reads=())
    cfg = s.cfg
    lm = s.lm()
    hookpoint = resolve_hookpoint(lm.model, cfg.collect.hookpoint)
    c = cfg.collect
    if c.format == "stream":
        _collect_streamed(s, hookpoint)
        return
    if c.extra_hookpoints:
        raise ActivationError(
            "--collect.extra-hookpoints trains several hookpoints from one forward, on the fly: it needs "
            "--collect.format stream"
        )
    row_bytes = int(lm.model.config.hidden_size) * getattr(torch, c.store_dtype).itemsize + 8
    s.run.check_free_space(
        c.n_train_tokens * row_bytes * (2 if c.format == "file" else 1),  # a file collect is written twice
        f"collecting {c.n_train_tokens} tokens",
        "lower --collect.n-train-tokens or pass --collect.store-dtype float16",
    )
    config = {"seed": cfg.seed, "model": to_dict(cfg.model), "data": to_dict(cfg.data), "collect": to_dict(c)}
    with s.run.stage("collect", config) as rec:
        # the corpus is read only as far as these tokens and their held-out share need (saelab.data.windows)
        read = read_windows(cfg.data, lm.tokenizer, cfg.seed, c.n_train_tokens)
        windows = read.windows
        rec["outputs"].append(windows.save_run(s.folder))
        (s.folder / "activations").mkdir(exist_ok=True)
        folder = s.folder / (STORE if c.format == "store" else ROWS)
        shutil.rmtree(folder, ignore_errors=True)
        progress = CollectProgress()
        store = collect_to_store(
            lm, windows, hookpoint, c.n_train_tokens, c.batch_size, folder, c.shard_rows,
            getattr(torch, c.store_dtype), key=_collect_key(lm, windows, hookpoint, c), resume=c.resume,
            progress=progress,
        )  # fmt: skip
        if c.format == "store":
            rec["outputs"] += sorted(str(p.relative_to(s.folder)) for p in folder.iterdir())
        else:
            store.load().save(s.folder / ACTS)
            shutil.rmtree(folder)
            rec["outputs"].append(ACTS)
        if progress.resumed_rows:
            log.info("collect: resumed with %d rows already stored", progress.resumed_rows)
        record: dict[str, Any] = {
            "hookpoint": hookpoint, "format": c.format, "n_tokens": store.n_rows,
            "n_windows": int(windows.tokens.shape[0]), "resumed_rows": progress.resumed_rows,
            "forward_batches": progress.forward_batches, "n_eval_windows": len(windows.eval_idx),
            "corpus": {"documents_read": read.documents, "held_out_documents": read.held_out_documents,
                       "tokens_packed": read.tokens, "read_to_the_end": read.exhausted},
        }  # fmt: skip
        rec.update(record)
        rec["hashes"] = {"data": windows.sha256(), "model": lm.weights_sha256}


def _collect_streamed(s: Session, hookpoint: str) -> None:
    """`collect.format stream`: only the held-out windows are kept (eval, cache and sample read them); train
    generates the training activations from the corpus (`saelab.activations.onthefly`)."""
    cfg, c, lm = s.cfg, s.cfg.collect, s.lm()
    extra = [resolve_hookpoint(lm.model, h) for h in c.extra_hookpoints]
    if len({hookpoint, *extra}) < 1 + len(extra):
        raise ActivationError(
            f"collect.extra_hookpoints {list(c.extra_hookpoints)} repeats a hookpoint (the first is {hookpoint}); "
            "name each hookpoint once"
        )
    config = {"seed": cfg.seed, "model": to_dict(cfg.model), "data": to_dict(cfg.data), "collect": to_dict(c)}
    with s.run.stage("collect", config) as rec:
        read = read_held_out(cfg.data, lm.tokenizer, cfg.seed)
        windows = read.windows
        rec["outputs"].append(windows.save_run(s.folder))
        log.info(
            "collect: streamed run: %d held-out windows kept; train generates its %d tokens' activations on the fly",
            len(windows.eval_idx),
            c.n_train_tokens,
        )
        rec.update(
            {
                "hookpoint": hookpoint, "extra_hookpoints": extra, "format": "stream",
                "n_tokens": c.n_train_tokens, "n_windows": int(windows.tokens.shape[0]),
                "n_eval_windows": len(windows.eval_idx),
                "corpus": {"documents_read": read.documents, "held_out_documents": read.held_out_documents,
                           "tokens_packed": read.tokens, "read_to_the_end": read.exhausted},
            }
        )  # fmt: skip
        rec["hashes"] = {"data": windows.sha256(), "model": lm.weights_sha256}


def _collect_key(lm: LoadedModel, windows: TokenWindows, hookpoint: str, c: CollectConfig) -> str:
    """What decides the collected rows: an interrupted collect is continued only under the same key."""
    fields = {k: v for k, v in to_dict(c).items() if k not in ("resume", "format")}
    text = json.dumps([lm.weights_sha256, windows.sha256(), hookpoint, fields], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
