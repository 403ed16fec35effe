"""SAE training on collected activations, for every architecture in the registry (`saelab.sae.registry`).

`train(data, TrainConfig(...), seed)` returns the trained SAE (taking raw activations) and a summary; `data` is an
activation tensor in memory or an on-disk `ActivationStore` streamed through a bounded shuffle buffer. The CLI's
`saelab train` calls it through the pipeline. The architecture supplies its objective (`SAE.training_loss`:
reconstruction, AuxK, L1 / L0 penalty); this module holds what every architecture shares (Gao et al. 2024,
"Scaling and evaluating sparse autoencoders", unless noted):
- inputs scaled by one factor so that E||x||^2 = d_in; the factor is folded back on return (`fold_input_scale`),
  so the returned SAE takes raw activations;
- b_dec starts at the geometric median of a sample (the activations have a large mean; a zero start learns slowly);
- unit-norm decoder rows where the architecture has them: gradient projected onto the tangent space, rows
  renormalised after each step;
- dead-latent tracking for AuxK (Appendix A.2): a latent that has not fired for `dead_tokens` tokens is dead;
- Adam, 5% linear learning-rate warm-up, linear decay to 0 over the last 20% of steps; the L1 / L0 coefficient
  warms up linearly over `sparsity_warmup_fraction` of the steps (Anthropic, April 2024; Gemma Scope).
Around that loop: optional dead-latent resampling (`resample.py`; what a reset touches is the architecture's,
`SAE.reset_latents_`), log records every `log_every` steps
(`train_log.py`), checkpoints every `checkpoint_every` steps that `resume=True` continues from bit-for-bit
(`checkpoint.py`), and data-parallel training when a torch.distributed process group is initialised
(`distributed.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.activations.sources import BatchSource, StoreSource, TensorSource, sample_ids
from saelab.activations.store import ActivationStore, check_finite
from saelab.config import TrainConfig, to_dict
from saelab.sae.base import SAE, LossInputs, SAEConfig, TrainLoss, architecture_class, auxk_loss, build
from saelab.train import distributed as ddp
from saelab.train.checkpoint import (
    CheckpointError,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from saelab.train.distributed import DistInfo
from saelab.train.log import TrainLog, check_sinks
from saelab.train.memory import shortfall
from saelab.train.resample import ResampleEvent, Resampler, make_resampler

__all__ = [
    "ResampleEvent",
    "StepHook",
    "TrainError",
    "TrainResult",
    "auxk_loss",
    "geometric_median",
    "lr_factor",
    "sae_config",
    "train",
    "train_many",
]

log = logging.getLogger(__name__)

StepHook = Callable[[int, SAE, TrainLoss], None]
"""Called after every step with (steps completed, the SAE as trained, the step's loss); for tests and monitoring."""


class TrainError(ValueError):
    """Training cannot go on (too little data, diverged, a checkpoint of another run); the message says what to
    change."""


@dataclass(frozen=True)
class TrainResult:
    """A trained SAE (taking raw activations) and its training summary."""

    sae: SAE
    steps: int
    tokens: int
    final_loss: float
    dead_fraction: float
    """Share of latents that did not fire in the last `dead_tokens` training tokens."""
    resample_events: tuple[ResampleEvent, ...] = ()
    """Each resampling: step, method, latents re-initialised, how many of them fired since."""
    resumed_from: int = 0
    """Steps restored from a checkpoint (0: started afresh); `steps - resumed_from` steps ran in this call."""


def geometric_median(x_ND: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    med = x_ND.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x_ND - med).norm(dim=1).clamp_min(1e-6)
        med = (w[:, None] * x_ND).sum(dim=0) / w.sum()
    return med


def lr_factor(step: int, total: int) -> float:
    warmup = max(1, int(0.05 * total))
    decay_start = int(0.8 * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def sparsity_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up of the L1 / L0 coefficient from 0 to 1 over the first `warmup_fraction` of the steps."""
    warmup = warmup_fraction * total
    return 1.0 if warmup < 1 else min(1.0, (step + 1) / warmup)


def sae_config(cfg: TrainConfig, d_in: int, hookpoint: str = "", model: str = "") -> SAEConfig:
    """The SAE's config: width from `expansion`, and the parameters its architecture takes from `cfg`."""
    params = architecture_class(cfg.architecture).params_from(cfg)
    return SAEConfig(cfg.architecture, d_in, d_in * cfg.expansion, hookpoint=hookpoint, model=model, **params)


def input_scale(acts_ND: torch.Tensor) -> float:
    """One global factor with E||x * scale||^2 = d_in (from up to 65,536 rows)."""
    return math.sqrt(acts_ND.shape[1] / acts_ND[:65536].pow(2).sum(dim=1).mean().item())


def as_source(data: torch.Tensor | ActivationStore | BatchSource, cfg: TrainConfig) -> BatchSource:
    """The batch source for `data`: tensors are held in memory, stores streamed through `stream_buffer_rows`."""
    if isinstance(data, torch.Tensor):
        check_finite(data, "training activations")
        return TensorSource(data)
    if isinstance(data, ActivationStore):
        return StoreSource(data, cfg.stream_buffer_rows)
    return data


def train(
    data: torch.Tensor | ActivationStore | BatchSource,
    cfg: TrainConfig,
    seed: int,
    hookpoint: str = "",
    model: str = "",
    log_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Train an SAE of `cfg.architecture` on `data` (rows = tokens); returned folded for raw inputs.

    With `checkpoint_dir`, a checkpoint is written there every `cfg.checkpoint_every` steps, and `cfg.resume`
    continues from the last one (a fresh run clears the folder). In a torch.distributed process group every rank
    calls `train` with the same data and seed; rank 0 writes the log and the checkpoints."""
    return train_many(data, [cfg], seed, hookpoint, model, [log_path], [checkpoint_dir], step_hook)[0]


def train_many(
    data: torch.Tensor | ActivationStore | BatchSource,
    cfgs: Sequence[TrainConfig],
    seed: int,
    hookpoint: str = "",
    model: str = "",
    log_paths: Sequence[Path | None] | None = None,
    checkpoint_dirs: Sequence[Path | None] | None = None,
    step_hook: StepHook | None = None,
    previous_checkpoint_dirs: Sequence[Path | None] | None = None,
) -> list[TrainResult]:
    """Train one SAE per config on the SAME stream of batches: each batch is read (or, streaming from a store,
    loaded and shuffled) once and every SAE takes a step on it. So a sweep over architectures, widths, k or lr
    costs one pass over the activations; SAEs trained together equal the same SAEs trained alone.

    The configs must agree on what shapes the stream (batch_size, epochs, stream_buffer_rows). `log_paths` and
    `checkpoint_dirs` give each SAE its own log and checkpoints (as `train`); `previous_checkpoint_dirs` are where
    `resume` looks when a checkpoint folder holds none (the train stage keeps the last finished training's
    checkpoints there until a new one succeeds). SAEs that cannot fit in the device's memory are refused before
    any is built (`memory.shortfall`)."""
    if not cfgs:
        raise TrainError("no SAE to train: give at least one TrainConfig")
    stream = {(c.batch_size, c.epochs, c.stream_buffer_rows) for c in cfgs}
    if len(stream) > 1:
        raise TrainError(
            "SAEs trained together share their batches, so they need the same train.batch_size, train.epochs "
            f"and train.stream_buffer_rows; got (batch_size, epochs, stream_buffer_rows) in {sorted(stream)}"
        )
    log_paths = list(log_paths) if log_paths is not None else [None] * len(cfgs)
    checkpoint_dirs = list(checkpoint_dirs) if checkpoint_dirs is not None else [None] * len(cfgs)
    if not len(log_paths) == len(checkpoint_dirs) == len(cfgs):
        raise TrainError(f"{len(cfgs)} configs need as many log paths and checkpoint folders")
    for cfg, log_path in zip(cfgs, log_paths, strict=True):
        check_sinks(cfg.log_to, log_path)
    source = as_source(data, cfgs[0])
    dist = DistInfo.current()
    _check_batches(source, cfgs[0], dist)
    sae_cfgs = [sae_config(c, source.d_in, hookpoint, model) for c in cfgs]
    device = source.head(1).device
    if why := shortfall(sae_cfgs, cfgs[0].batch_size // dist.world, device, [c.expansion for c in cfgs]):
        raise TrainError(why)
    trainers = [_Trainer(source, c, seed, sae_cfg, dist) for c, sae_cfg in zip(cfgs, sae_cfgs, strict=True)]
    previous = list(previous_checkpoint_dirs) if previous_checkpoint_dirs is not None else [None] * len(cfgs)
    for trainer, folder, before in zip(trainers, checkpoint_dirs, previous, strict=True):
        if folder is not None:
            trainer.start_from(folder, before)
    if len({t.step for t in trainers}) > 1:
        steps = ", ".join(f"{t.sae.architecture}: {t.step}" for t in trainers)
        raise TrainError(
            f"the SAEs' checkpoints stopped at different steps ({steps}); resume them one by one or afresh"
        )
    with ExitStack() as stack:
        sinks = []
        for cfg, trainer, log_path in zip(cfgs, trainers, log_paths, strict=True):
            run_cfg = {
                **to_dict(cfg),
                "seed": seed,
                "hookpoint": hookpoint,
                "model": model,
                "world": dist.world,
            }
            sinks.append(
                stack.enter_context(
                    TrainLog(cfg.log_to, log_path, trainer.step, run_cfg, enabled=dist.is_main)
                )
            )
        _fit(trainers, sinks, checkpoint_dirs, step_hook)
    return [t.result() for t in trainers]


def _fit(
    trainers: list[_Trainer],
    sinks: list[TrainLog],
    checkpoint_dirs: list[Path | None],
    step_hook: StepHook | None,
) -> None:
    """The shared loop: the first trainer's generator orders the batches (every trainer's generator is in the
    same state, drawn alike since the same seed), each batch steps every trainer."""
    lead = trainers[0]
    first_epoch = max(0, lead.step - 1) // lead.steps_per_epoch
    skip = lead.step - first_epoch * lead.steps_per_epoch  # may be a whole epoch: its order is still drawn
    name = lead.sae.architecture if len(trainers) == 1 else f"{len(trainers)} SAEs"
    bar = tqdm(
        total=lead.total,
        initial=lead.step,
        desc=f"train {name}",
        unit="step",
        leave=False,
        **({} if lead.dist.is_main else {"disable": True}),  # TQDM_DISABLE=1 still applies on rank 0
    )
    try:
        for epoch in range(first_epoch, lead.cfg.epochs):
            state = lead.gen.get_state()
            for t in trainers:
                t.epoch_gen_state = state
            start = skip if epoch == first_epoch else 0
            for x_BD in lead.source.epoch(lead.gen, lead.cfg.batch_size, start, lead.dist.part):
                for t, sink, folder in zip(trainers, sinks, checkpoint_dirs, strict=True):
                    loss, dead_F = t._step(x_BD * t.scale)
                    rec = t._after_step(x_BD, loss, dead_F, sink, folder)
                    if rec is not None and t is lead:
                        bar.set_postfix(
                            loss=f"{rec['loss']:.3g}",
                            ev=f"{rec['ev']:.3f}",
                            l0=f"{rec['l0']:.1f}",
                            dead=f"{rec['dead_fraction']:.2f}",
                        )
                    if step_hook is not None:
                        step_hook(t.step, t.sae, loss)
                bar.update()
    finally:
        bar.close()
    for t, sink in zip(trainers, sinks, strict=True):
        if t.resampler is not None:
            # after the last step (a resumed run writes it anew)
            events = [e._asdict() for e in t.resampler.summary()]
            sink.write(
                {"step": t.step, "event": "resample_summary", **t._resample_totals(), "events": events}
            )


def _check_batches(source: BatchSource, cfg: TrainConfig, dist: DistInfo) -> None:
    if source.n_rows < cfg.batch_size:
        raise TrainError(
            f"{source.n_rows} activations is fewer than one batch of {cfg.batch_size}; collect more tokens"
        )
    if cfg.batch_size % dist.world:
        raise TrainError(
            f"train.batch_size {cfg.batch_size} must divide evenly over {dist.world} data-parallel ranks"
        )


# Fields that do not change what a run computes: a run may resume with other values of these.
_RESUMABLE_CHANGES = frozenset({"resume", "checkpoint_every", "log_every", "log_to"})


class _Trainer:
    """The state of one training run and the pieces of its loop (one step, resampling, logging, checkpoints)."""

    def __init__(
        self, source: BatchSource, cfg: TrainConfig, seed: int, sae_cfg: SAEConfig, dist: DistInfo
    ) -> None:
        self.source, self.cfg, self.seed, self.dist = source, cfg, seed, dist
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = source.head(65536)
        self.device = head.device
        self.sae = build(sae_cfg).to(self.device).train()
        with torch.no_grad():
            self.sae.W_enc_DF.mul_(cfg.encoder_init_scale)
        self.sae.use_sparse_kernels(
            cfg.kernels == "sparse" or (cfg.kernels == "auto" and self.device.type == "cpu")
        )
        self.scale = input_scale(head)
        with torch.no_grad():
            sample = source.rows(sample_ids(source.n_rows, 8192, self.gen)) * self.scale
            self.sae.b_dec_D.copy_(geometric_median(sample))
        # The fused implementation does the whole update in one pass per tensor (~40% less optimizer time on CPU).
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.sae.param_groups(cfg), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.steps_per_epoch = source.n_rows // cfg.batch_size
        self.total = self.steps_per_epoch * cfg.epochs
        self.k_aux = cfg.auxk_k or source.d_in // 2
        self.since_fired_F = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=self.device)
        self.resampler: Resampler | None = make_resampler(cfg, sae_cfg.d_sae, self.device, seed)
        self.step = 0
        """Steps completed."""
        self.resumed_from = 0
        self.loss_val = float("nan")
        self.epoch_gen_state = self.gen.get_state()
        """The shuffling generator's state at the start of the current epoch (its order is drawn from it)."""

    # --- one step ------------------------------------------------------------------------------------------
    def _step(self, x_BD: torch.Tensor) -> tuple[TrainLoss, torch.Tensor]:
        """One optimisation step on (this rank's share of) a batch of scaled inputs."""
        cfg, step = self.cfg, self.step
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, self.total)
        warm = sparsity_factor(step, self.total, cfg.sparsity_warmup_fraction)
        dead_F = self.since_fired_F >= cfg.dead_tokens
        inputs = LossInputs(
            dead_F,
            self.k_aux,
            cfg.auxk_coef,
            cfg.l1_coef * warm,
            cfg.l0_coef * warm,
            ddp.sum_ranks_ if self.dist.world > 1 else None,
        )
        loss = self.sae.training_loss(x_BD, inputs)
        self.opt.zero_grad(set_to_none=True)
        loss.total.backward()
        if self.dist.world > 1:
            ddp.average_grads_(self.sae, self.dist.world)
        self.sae.project_decoder_grad()
        self.opt.step()
        self.sae.normalize_decoder()
        fired_F = loss.fired_F
        if self.dist.world > 1:
            ddp.average_buffers_(self.sae, self.dist.world)
            fired_F = ddp.any_rank(fired_F)
        self.since_fired_F = torch.where(fired_F, 0, self.since_fired_F + cfg.batch_size)
        if self.resampler is not None:
            self.resampler.observe(loss, fired_F, self._reduce)
        return loss, dead_F

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return ddp.sum_ranks_(t) if self.dist.world > 1 else t

    def _after_step(
        self,
        x_BD: torch.Tensor,
        loss: TrainLoss,
        dead_F: torch.Tensor,
        sink: TrainLog,
        checkpoint_dir: Path | None,
    ) -> dict[str, Any] | None:
        """Count the step, resample, log and checkpoint when due; returns the log record if one was written."""
        self.loss_val = _finite(loss.total.item(), self.step)
        self.step += 1
        if self.resampler is not None and self.resampler.due(self.step, self.total):
            self._resample(sink)
        rec = None
        if (self.step - 1) % self.cfg.log_every == 0:
            rec = self._log_record(x_BD * self.scale, loss, dead_F)
            sink.write(rec)
        every = self.cfg.checkpoint_every
        if checkpoint_dir is not None and every and self.step % every == 0 and self.dist.is_main:
            save_checkpoint(checkpoint_dir, self.step, self.state_dict(), {"fingerprint": self.fingerprint()})
        return rec

    def _resample(self, sink: TrainLog) -> None:
        assert self.resampler is not None
        step = self.step - 1  # records carry the index of the step they follow
        n = self.resampler.resample(step, self.sae, self.opt, self.source, self.scale, self.since_fired_F)
        if n:
            sink.write(
                {"step": step, "event": "resample", "method": self.cfg.resample.method, "resampled": n}
            )

    def _log_record(self, x_BD: torch.Tensor, loss: TrainLoss, dead_F: torch.Tensor) -> dict[str, Any]:
        """Loss parts, L0, explained variance (this batch), dead fraction, lr; averaged over ranks."""
        var = (x_BD - x_BD.mean(dim=0)).pow(2).sum(dim=-1).mean()
        parts = torch.stack([loss.total.detach(), loss.mse, loss.aux, loss.sparsity, loss.l0, var])
        if self.dist.world > 1:
            parts = ddp.sum_ranks_(parts) / self.dist.world
        total, mse, aux, sparsity, l0_, var_ = parts.tolist()
        rec: dict[str, Any] = {
            "step": self.step - 1,
            "tokens": self.step * self.cfg.batch_size,
            "loss": total,
            "mse": mse,
            "auxk": aux,
            "sparsity": sparsity,
            "l0": l0_,
            "ev": 1 - mse / var_,
            "dead_fraction": float(dead_F.float().mean()),
            "lr": self.opt.param_groups[0]["lr"],
        }
        if self.resampler is not None:
            rec.update(self._resample_totals())
        return rec

    def _resample_totals(self) -> dict[str, Any]:
        assert self.resampler is not None
        events = self.resampler.summary()
        return {
            "resampled": sum(e.resampled for e in events),
            "resampled_fired": sum(e.fired_after for e in events),
            "resample_events": len(events),
        }

    # --- checkpoints ----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with the run resuming it."""
        config = {k: v for k, v in to_dict(self.cfg).items() if k not in _RESUMABLE_CHANGES}
        if isinstance(self.source, TensorSource):
            config.pop("stream_buffer_rows")
        return {
            "config": config,
            "seed": self.seed,
            "n_rows": self.source.n_rows,
            "d_in": self.source.d_in,
            "world": self.dist.world,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sae": self.sae.state_dict(),
            "sae_config": self.sae.cfg.to_json(),
            "optimizer": self.opt.state_dict(),
            "since_fired_F": self.since_fired_F,
            "epoch_gen_state": self.epoch_gen_state,
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_states": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scale": self.scale,
            "loss": self.loss_val,
            "resampler": self.resampler.state_dict() if self.resampler is not None else {},
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any], where: Path) -> None:
        self._check_fingerprint(state["fingerprint"], where)
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.since_fired_F.copy_(state["since_fired_F"])
        self.gen.set_state(state["epoch_gen_state"].cpu())
        torch.set_rng_state(state["torch_rng_state"].cpu())
        if state["cuda_rng_states"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng_states"]])
        self.scale, self.loss_val = state["scale"], state["loss"]
        if self.resampler is not None:
            self.resampler.load_state_dict(state["resampler"])
        self.step = self.resumed_from = state["step"]

    def _check_fingerprint(self, saved: dict[str, Any], where: Path) -> None:
        now = self.fingerprint()
        diff = [
            f"{k}={saved['config'].get(k)!r} (now {v!r})"
            for k, v in now["config"].items()
            if saved["config"].get(k) != v
        ]
        diff += [
            f"{k}={saved.get(k)!r} (now {v!r})" for k, v in now.items() if k != "config" and saved.get(k) != v
        ]
        if diff:
            raise TrainError(
                f"checkpoint {where} belongs to another run: {', '.join(diff)}; resume with the same settings and "
                "data, or start afresh without --train.resume"
            )

    def start_from(self, checkpoint_dir: Path, previous: Path | None = None) -> None:
        """Restore the last checkpoint of `checkpoint_dir`, else of `previous` (resume), or clear old ones in
        `checkpoint_dir` (a fresh run)."""
        last = latest_checkpoint(checkpoint_dir) if self.cfg.resume else None
        if last is None and self.cfg.resume and previous is not None:
            last = latest_checkpoint(previous)
        if last is not None:
            try:
                self.load_state_dict(load_checkpoint(last, self.device), last)
            except KeyError as err:
                raise CheckpointError(
                    f"checkpoint {last} lacks {err}; it was written by another version"
                ) from err
            log.info("resuming from %s (step %d of %d)", last, self.step, self.total)
        elif self.cfg.resume:
            log.warning("no checkpoint in %s: training from step 0", checkpoint_dir)
        if last is None and self.dist.is_main:
            clear_checkpoints(checkpoint_dir)

    def result(self) -> TrainResult:
        dead_fraction = float((self.since_fired_F >= self.cfg.dead_tokens).float().mean())
        events = tuple(self.resampler.summary()) if self.resampler is not None else ()
        self.sae.fold_input_scale(self.scale)
        return TrainResult(
            self.sae.eval(),
            self.step,
            self.step * self.cfg.batch_size,
            self.loss_val,
            dead_fraction,
            events,
            self.resumed_from,
        )


def _finite(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise TrainError(f"training diverged at step {step} (loss {loss}); lower train.lr")
    return loss
