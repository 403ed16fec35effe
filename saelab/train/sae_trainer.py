"""One SAE's training: its state (SAE, optimizer, dead-latent counters, RNG, resampler), one optimisation step,
logging and checkpoints. `saelab.train.trainer.train_many` builds one `SAETrainer` per SAE and steps them all on
the same batches; the schedule and initialisation this module applies are described in that module's docstring.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.activations.onthefly import StreamSource
from saelab.activations.sources import BatchSource, TensorSource
from saelab.config import TrainConfig, to_dict
from saelab.models.precision import resolve_float
from saelab.sae.base import SAE, LossInputs, SAEConfig, TrainLoss, build
from saelab.sae.sparse_ops import torch_threads
from saelab.train import distributed as ddp
from saelab.train.checkpoint import (
    CheckpointError,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from saelab.train.distributed import DistInfo
from saelab.train.log import TrainLog
from saelab.train.resample import ResampleEvent, Resampler, make_resampler

log = logging.getLogger(__name__)


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
    selection: str = "float32"
    """The matmul the training entries were chosen from (`TrainConfig.selection_matmul` as resolved here)."""
    rows_rechecked: int = 0
    """Rows whose bfloat16 choice the bound could not confirm, recomputed in float32 (this call's steps)."""


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


def input_scale(acts_ND: torch.Tensor) -> float:
    """One global factor with E||x * scale||^2 = d_in (from up to 65,536 rows)."""
    return math.sqrt(acts_ND.shape[1] / acts_ND[:65536].pow(2).sum(dim=1).mean().item())


# Fields that do not change what a run computes: a run may resume with other values of these.
# selection_matmul chooses the same entries either way (saelab/sae/selection.py).
_RESUMABLE_CHANGES = frozenset(
    {"resume", "checkpoint_every", "log_every", "log_to", "cpu_step_threads", "selection_matmul"}
)


class SAETrainer:
    """The state of one training run and the pieces of its loop (one step, resampling, logging, checkpoints)."""

    def __init__(
        self,
        source: BatchSource,
        cfg: TrainConfig,
        seed: int,
        sae_cfg: SAEConfig,
        dist: DistInfo,
        stream: StreamSource | None = None,
        slot: int = 0,
        target: BatchSource | None = None,
        target_slot: int | None = None,
    ) -> None:
        """`source` gives the statistics the SAE starts from (`init_from_data`) and the resampler's rows; with
        `stream`, the shared on-the-fly source whose position goes into checkpoints, and `slot` the hookpoint of
        its batches this SAE takes. A transcoder also has `target` (the target hookpoint's view, for its
        statistics) and `target_slot` (its tensor in each batch)."""
        self.source, self.cfg, self.seed, self.dist, self.stream = source, cfg, seed, dist, stream
        self.slot = slot
        """Which tensor of a multi-hookpoint batch this SAE trains on."""
        self.target, self.target_slot = target, target_slot
        """A transcoder's target: its statistics' source and which tensor of a batch it is (None: an SAE)."""
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.device = torch.device(source.device)
        self.sae = build(sae_cfg).to(self.device).train()
        with torch.no_grad():
            self.sae.W_enc_DF.mul_(cfg.encoder_init_scale)
        self.sae.use_sparse_kernels(
            cfg.kernels == "sparse" or (cfg.kernels == "auto" and self.device.type == "cpu")
        )
        self.sae.use_selection(resolve_float(cfg.selection_matmul, self.device))
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
        self.scale = 1.0
        self.target_scale = 1.0
        """A transcoder's target is scaled on its own (E||y * target_scale||^2 = d_out); an SAE's equals `scale`."""
        self.epoch_gen_state = self.gen.get_state()
        """The shuffling generator's state at the start of the current epoch (its order is drawn from it)."""

    def init_from_data(self) -> None:
        """A fresh training's start from the data: the input scale (E||x * scale||^2 = d_in) from the first rows,
        b_dec at the geometric median of 8,192 random rows. Under torch.distributed rank 0's start is every
        rank's (ranks streaming their own documents see different rows)."""
        self.scale = input_scale(self.source.head(65536))
        with torch.no_grad():
            sample = self.source.sample(8192, self.gen) * self.scale
            if self.target is None:
                self.sae.b_dec_D.copy_(geometric_median(sample))
                self.target_scale = self.scale
            else:
                self._init_transcoder(sample)
            if self.dist.world > 1:
                scales = torch.tensor(
                    [self.scale, self.target_scale], dtype=torch.float64, device=self.device
                )
                ddp.broadcast_tensor_(scales)
                self.scale, self.target_scale = (float(v) for v in scales.tolist())
                ddp.broadcast_module_(self.sae)
        self.epoch_gen_state = self.gen.get_state()

    def _init_transcoder(self, sample_ND: torch.Tensor) -> None:
        """A transcoder's start: the input's centre at the geometric median of the (scaled) input sample; the
        target scaled on its own, b_dec at the geometric median of a target sample (drawn with a generator of
        its own, so the batches' order is an SAE's)."""
        assert self.target is not None and self.sae.b_in_D is not None
        self.sae.b_in_D.copy_(geometric_median(sample_ND))
        self.target_scale = input_scale(self.target.head(65536))
        gen = torch.Generator().manual_seed(self.seed + 1)
        self.sae.b_dec_D.copy_(geometric_median(self.target.sample(8192, gen) * self.target_scale))

    # --- one step ------------------------------------------------------------------------------------------
    def _step(
        self, x_BD: torch.Tensor, target_BD: torch.Tensor | None = None
    ) -> tuple[TrainLoss, torch.Tensor]:
        """One optimisation step on (this rank's share of) a batch of scaled inputs (and a transcoder's scaled
        targets)."""
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
            target_BD,
        )
        with torch_threads(self.sae.step_threads(torch.get_num_threads(), cfg.cpu_step_threads)):
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
        target_BD: torch.Tensor | None = None,
    ) -> dict[str, Any] | None:
        """Count the step, resample, log and checkpoint when due; returns the log record if one was written.
        `target_BD`: a transcoder's raw targets (its log's explained variance is the target's)."""
        self.loss_val = _finite(loss.total.item(), self.step)
        self.step += 1
        if self.resampler is not None and self.resampler.due(self.step, self.total):
            self._resample(sink)
        rec = None
        if (self.step - 1) % self.cfg.log_every == 0:
            ref_BD = x_BD * self.scale if target_BD is None else target_BD * self.target_scale
            rec = self._log_record(ref_BD, loss, dead_F)
            sink.write(rec)
        every = self.cfg.checkpoint_every
        if checkpoint_dir is not None and every and self.step % every == 0:
            sources = self._source_states()  # under torch.distributed every rank takes part
            if self.dist.is_main:
                state = self.state_dict(sources)
                save_checkpoint(checkpoint_dir, self.step, state, {"fingerprint": self.fingerprint()})
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
        # rows of this step the bfloat16 choice could not confirm, recomputed in float32
        selector = getattr(self.sae, "selector", None)
        if selector is not None:
            rec["selection_rows_rechecked"] = selector.last_rechecked
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
            **({"stream": self.stream.fingerprint()} if self.stream is not None else {}),
        }

    def _source_states(self) -> dict[str, Any]:
        """Where each rank's on-the-fly stream stands (nothing for stored activations)."""
        if self.stream is None:
            return {}
        return {"ranks": ddp.gather_objects(self.stream.state(), self.dist.world)}

    def state_dict(self, sources: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint's contents; `sources` from `_source_states` (called on every rank)."""
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
            "target_scale": self.target_scale,
            "loss": self.loss_val,
            "resampler": self.resampler.state_dict() if self.resampler is not None else {},
            "fingerprint": self.fingerprint(),
            "source": sources if sources is not None else self._source_states(),
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
        self.target_scale = state.get("target_scale", self.scale)
        if self.resampler is not None:
            self.resampler.load_state_dict(state["resampler"])
        self.step = self.resumed_from = state["step"]
        if self.stream is not None:
            self.stream.load_state(state["source"]["ranks"][self.dist.rank])

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
        self.sae.fold_scales(self.scale, self.target_scale)
        selector = getattr(self.sae, "selector", None)
        return TrainResult(
            self.sae.eval(),
            self.step,
            self.step * self.cfg.batch_size,
            self.loss_val,
            dead_fraction,
            events,
            self.resumed_from,
            "bfloat16" if selector is not None else "float32",
            selector.rechecked if selector is not None else 0,
        )


def _finite(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise TrainError(f"training diverged at step {step} (loss {loss}); lower train.lr")
    return loss
