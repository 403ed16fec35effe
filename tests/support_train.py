"""Helpers shared by the trainer's tests: planted sparse data and a way to stop a run mid-way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.config import TrainConfig
from saelab.sae.base import SAE, TrainLoss
from saelab.train.distributed import exit_rank
from saelab.train.trainer import StepHook, TrainResult, train


def planted_directions(d: int = 24, n_feat: int = 48, seed: int = 0) -> torch.Tensor:
    """The unit directions `planted` with the same arguments draws its tokens from [n_feat, d]."""
    dirs = torch.randn(n_feat, d, generator=torch.Generator().manual_seed(seed))
    return dirs / dirs.norm(dim=1, keepdim=True)


def planted(n: int = 6000, d: int = 24, n_feat: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of random unit directions, plus a large mean and scale (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 4 + 1
    x = torch.einsum("nk,nkd->nd", coef, dirs[idx])
    return 50 * x + 30 * torch.randn(d, generator=g)


class Stopped(Exception):
    """Raised by a step hook to stop a run as a crash would."""


class StepCounter:
    """A step hook recording the steps it sees (after calling `also`), raising `Stopped` after step `stop_at`."""

    def __init__(self, stop_at: int | None = None, also: StepHook | None = None) -> None:
        self.stop_at, self.also = stop_at, also
        self.steps: list[int] = []

    def __call__(self, step: int, sae: SAE, loss: TrainLoss) -> None:
        if self.also is not None:
            self.also(step, sae, loss)
        self.steps.append(step)
        if step == self.stop_at:
            raise Stopped(step)


def train_stopped_then_resumed(
    data: object, cfg: TrainConfig, stop_at: int, ckpt: Path, log: Path | None = None
) -> tuple[TrainResult, StepCounter]:
    """Train, stop after step `stop_at`, resume; returns the resumed result and the resumed run's step counter."""
    try:
        train(data, cfg, seed=0, checkpoint_dir=ckpt, log_path=log, step_hook=StepCounter(stop_at))  # type: ignore[arg-type]
    except Stopped:
        pass
    else:
        raise AssertionError("the run was not stopped")
    counter = StepCounter()
    resumed = train(
        data,  # type: ignore[arg-type]
        _resume(cfg),
        seed=0,
        checkpoint_dir=ckpt,
        log_path=log,
        step_hook=counter,
    )
    return resumed, counter


def _resume(cfg: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, resume=True)


def same_state(a: SAE, b: SAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ddp_worker(rank: int, world: int, port: int, folder: str, cfgs: list[TrainConfig]) -> None:
    """One data-parallel rank (run by torch.multiprocessing.spawn): trains on `folder`/x.pt with each config in
    turn (run i in `folder`/i/) and saves its SAE there as rank{rank}.pt."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = torch.load(Path(folder) / "x.pt")
        for i, cfg in enumerate(cfgs):
            out = Path(folder) / str(i)
            result = train(x, cfg, seed=0, log_path=out / "log.jsonl", checkpoint_dir=out / "ckpt")
            torch.save(result.sae.state_dict(), out / f"rank{rank}.pt")
        dist.barrier()  # the ranks leave together, as saelab.cli's do: rank 0 writes checkpoints after the last step
    finally:
        dist.destroy_process_group()
    exit_rank()  # as saelab.cli's ranks leave: past the interpreter's finalisation


def stream_ddp_worker(rank: int, world: int, port: int, folder: str, model_dir: str, corpus: str) -> None:
    """One data-parallel rank training a TopK SAE on activations streamed from its own share of `corpus`; saves
    the batches it trained on (with their rows' documents), its first block's rows and its SAE to
    `folder`/rank{rank}.pt."""
    import torch.distributed as dist

    from saelab.activations.onthefly import StreamSource
    from saelab.config import DataConfig
    from saelab.models.loading import load_model
    from saelab.train.trainer import train_many

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lm = load_model(model_dir)
        data = DataConfig(dataset=corpus, ctx_len=32, eval_fraction=0.1)
        source = StreamSource(lm, data, 0, ["model.layers.1"], 2048, 128, 512, 4, part=(rank, world))
        batches, docs = [], []
        epoch = source.epoch

        def recording(*args: Any, **kwargs: Any) -> Any:
            for batch in epoch(*args, **kwargs):
                batches.append(batch.clone())
                docs.append(torch.from_numpy(source.batch_docs.copy()))
                yield batch

        source.epoch = recording  # type: ignore[method-assign]
        result = train_many(source, [STREAM_DDP_CFG], 0)[0]
        out = {"batches": batches, "docs": docs, "first": source.head(65536), "sae": result.sae.state_dict()}
        torch.save(out, Path(folder) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()  # as saelab.cli's ranks leave: past the interpreter's finalisation


STREAM_DDP_CFG = TrainConfig(
    expansion=2, k=4, lr=3e-3, batch_size=128, epochs=2, stream_buffer_rows=512, checkpoint_every=0
)
