"""Data-parallel training (torch.distributed, gloo on CPU, 2 processes) matches one process on the same data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from support_train import ddp_worker, planted

from saelab.config import TrainConfig
from saelab.train.distributed import DistInfo, free_port
from saelab.train.trainer import TrainError, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def run_ddp(
    folder: Path, x: torch.Tensor, cfgs: list[TrainConfig], world: int = 2
) -> list[list[dict[str, Any]]]:
    """Train each config on `x` with `world` processes; per config, each rank's final SAE state."""
    torch.save(x, folder / "x.pt")
    for i in range(len(cfgs)):
        (folder / str(i)).mkdir()
    mp.spawn(ddp_worker, args=(world, free_port(), str(folder), cfgs), nprocs=world, join=True)
    return [[torch.load(folder / str(i) / f"rank{r}.pt") for r in range(world)] for i in range(len(cfgs))]


# architecture, and whether one process gives the same weights. BatchTopK selects within each rank's half of the
# batch (k x B/2 latents per rank), so it matches one process only in distribution; its ranks still agree.
ARCHS = [("topk", True), ("relu", True), ("batchtopk", False)]


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    """Same global batch (each rank half of it), gradients averaged: the same weights as one process, up to float
    summation order; the ranks agree exactly; rank 0 alone writes the log and the checkpoint."""
    x = planted(n=2048, d=16)
    base = TrainConfig(expansion=4, k=3, lr=3e-3, batch_size=128, epochs=2, dead_tokens=512, l1_coef=1.0)
    cfgs = [
        dataclasses.replace(base, architecture=arch, checkpoint_every=8, log_every=4) for arch, _ in ARCHS
    ]
    runs = run_ddp(tmp_path, x, cfgs)
    torch.set_num_threads(1)
    for i, ((arch, exact), cfg, ranks) in enumerate(zip(ARCHS, cfgs, runs)):
        single = train(x, cfg, seed=0).sae.state_dict()
        for name, value in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (arch, name)
            if exact:
                torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
        records = [json.loads(line) for line in (tmp_path / str(i) / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(0, 32, 4))  # one writer: no record twice
        assert [p.name for p in (tmp_path / str(i) / "ckpt").iterdir()] == ["step-00000032"]


def test_batch_must_split_evenly_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DistInfo, "current", classmethod(lambda cls: cls(0, 3)))
    with pytest.raises(TrainError, match="divide evenly over 3"):
        train(planted(n=600, d=8), TrainConfig(expansion=2, k=2, batch_size=128), seed=0)


def test_rank_parts_tile_each_batch() -> None:
    """The ranks' slices of every batch are disjoint and together the one-process batch."""
    from saelab.activations.sources import TensorSource

    src = TensorSource(torch.arange(1000.0)[:, None])
    whole = list(src.epoch(torch.Generator().manual_seed(3), 100))
    parts = [list(src.epoch(torch.Generator().manual_seed(3), 100, part=(r, 4))) for r in range(4)]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[b] for p in parts]), batch)
    assert dataclasses.astuple(DistInfo()) == (0, 1)


def test_auxk_with_dead_latents_matches_one_process(tmp_path: Path) -> None:
    """With latents dead from the first steps (dead_tokens = one batch), AuxK's residual variance is the whole
    batch's on every rank, so two ranks still end with one process's weights."""
    x = planted(n=1024, d=16)
    cfg = TrainConfig(
        expansion=8, k=2, lr=3e-3, batch_size=128, epochs=2, dead_tokens=128, auxk_coef=1.0, log_every=1
    )
    (ranks,) = run_ddp(tmp_path, x, [cfg])
    torch.set_num_threads(1)
    result = train(x, cfg, seed=0, log_path=tmp_path / "single.jsonl")
    records = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert max(r["auxk"] for r in records) > 0  # AuxK was active
    for name, value in result.sae.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
