"""SAE training on collected activations, for every architecture in the registry (`saelab.sae.registry`).

`train(data, TrainConfig(...), seed)` returns the trained SAE (taking raw activations) and a summary; `data` is an
activation tensor in memory, an on-disk `ActivationStore` streamed through a bounded shuffle buffer, or a
`StreamSource` generating activations on the fly (`saelab.activations.onthefly`). The CLI's `saelab train` calls
it through the pipeline. One SAE's state and step are `sae_trainer.SAETrainer`; this module steps them together. The architecture supplies its objective (`SAE.training_loss`:
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
`SAE.reset_latents_`), log records every `log_every` steps (`log.py`), checkpoints every `checkpoint_every` steps that `resume=True` continues from bit-for-bit
(`checkpoint.py`), and data-parallel training when a torch.distributed process group is initialised
(`distributed.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.activations.onthefly import StreamSource
from saelab.activations.paired import PairedTensorSource
from saelab.activations.sources import BatchSource, StoreSource, TensorSource
from saelab.activations.store import ActivationStore, check_finite
from saelab.config import TrainConfig, to_dict
from saelab.sae.base import SAE, SAEConfig, TrainLoss, architecture_class, auxk_loss
from saelab.train.allocator import reuse_freed_memory
from saelab.train.distributed import DistInfo
from saelab.train.log import TrainLog, check_sinks
from saelab.train.memory import shortfall
from saelab.train.resample import ResampleEvent
from saelab.train.sae_trainer import (
    SAETrainer,
    TrainError,
    TrainResult,
    geometric_median,
    input_scale,
    lr_factor,
    sparsity_factor,
)

__all__ = [
    "ResampleEvent",
    "StepHook",
    "TrainError",
    "TrainResult",
    "auxk_loss",
    "geometric_median",
    "input_scale",
    "lr_factor",
    "sae_config",
    "sparsity_factor",
    "train",
    "train_many",
]

log = logging.getLogger(__name__)

StepHook = Callable[[int, SAE, TrainLoss], None]
"""Called after every step with (steps completed, the SAE as trained, the step's loss); for tests and monitoring."""


def sae_config(
    cfg: TrainConfig,
    d_in: int,
    hookpoint: str = "",
    model: str = "",
    target: tuple[str, int] | None = None,
) -> SAEConfig:
    """The SAE's config: width from `expansion`, and the parameters its architecture takes from `cfg`; with
    `target` (the target hookpoint and its width), a transcoder's."""
    params = architecture_class(cfg.architecture).params_from(cfg)
    if target is not None:
        params.update(target_hookpoint=target[0], d_out=target[1], skip=cfg.skip)
    return SAEConfig(cfg.architecture, d_in, d_in * cfg.expansion, hookpoint=hookpoint, model=model, **params)


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
    slots: Sequence[int] | None = None,
    target_slots: Sequence[int | None] | None = None,
) -> list[TrainResult]:
    """Train one SAE per config on the SAME stream of batches: each batch is read (or, streaming from a store,
    loaded and shuffled) once and every SAE takes a step on it. So a sweep over architectures, widths, k or lr
    costs one pass over the activations; SAEs trained together equal the same SAEs trained alone.

    The configs must agree on what shapes the stream (batch_size, epochs, stream_buffer_rows). `log_paths` and
    `checkpoint_dirs` give each SAE its own log and checkpoints (as `train`); `previous_checkpoint_dirs` are where
    `resume` looks when a checkpoint folder holds none (the train stage keeps the last finished training's
    checkpoints there until a new one succeeds). SAEs that cannot fit in the device's memory are refused before
    any is built (`memory.shortfall`).

    `data` may be a `StreamSource` (activations generated on the fly, `saelab.activations.onthefly`), whose
    batches hold one tensor per hookpoint: `slots[i]` is the hookpoint the i-th SAE trains on (all 0 by
    default), and `hookpoint` is then taken from the source. A transcoder (`TrainConfig.target_hookpoint`) reads
    slot `slots[i]` and reconstructs slot `target_slots[i]` of a multi-hookpoint source (a `StreamSource`, or a
    `PairedTensorSource` of tensors in hand); its SAE config records both hookpoints, d_out and the skip."""
    if not cfgs:
        raise TrainError("no SAE to train: give at least one TrainConfig")
    shapes = {(c.batch_size, c.epochs, c.stream_buffer_rows) for c in cfgs}
    if len(shapes) > 1:
        raise TrainError(
            "SAEs trained together share their batches, so they need the same train.batch_size, train.epochs "
            f"and train.stream_buffer_rows; got (batch_size, epochs, stream_buffer_rows) in {sorted(shapes)}"
        )
    log_paths = list(log_paths) if log_paths is not None else [None] * len(cfgs)
    checkpoint_dirs = list(checkpoint_dirs) if checkpoint_dirs is not None else [None] * len(cfgs)
    if not len(log_paths) == len(checkpoint_dirs) == len(cfgs):
        raise TrainError(f"{len(cfgs)} configs need as many log paths and checkpoint folders")
    for cfg, log_path in zip(cfgs, log_paths, strict=True):
        check_sinks(cfg.log_to, log_path)
    source = as_source(data, cfgs[0])
    stream = source if isinstance(source, StreamSource) else None
    slotted = source if isinstance(source, (StreamSource, PairedTensorSource)) else None
    slots = list(slots) if slots is not None else [0] * len(cfgs)
    targets = _target_slots(cfgs, target_slots, slotted)
    views = [slotted.slot(h) if slotted is not None else source for h in slots]
    target_views = [slotted.slot(t) if slotted is not None and t is not None else None for t in targets]
    hookpoints = [slotted.hookpoints[h] or hookpoint if slotted is not None else hookpoint for h in slots]
    dist = DistInfo.current()
    _check_batches(source, cfgs[0], dist)
    sae_cfgs = [
        sae_config(c, v.d_in, hp, model, None if tv is None else (_target_name(slotted, t, c), tv.d_in))
        for c, v, hp, tv, t in zip(cfgs, views, hookpoints, target_views, targets, strict=True)
    ]
    device = torch.device(source.device)
    if why := shortfall(sae_cfgs, cfgs[0].batch_size // dist.world, device, [c.expansion for c in cfgs]):
        raise TrainError(why)
    trainers = [
        SAETrainer(v, c, seed, sae_cfg, dist, stream, h, tv, t)
        for v, c, sae_cfg, h, tv, t in zip(views, cfgs, sae_cfgs, slots, target_views, targets, strict=True)
    ]
    previous = list(previous_checkpoint_dirs) if previous_checkpoint_dirs is not None else [None] * len(cfgs)
    for trainer, folder, before in zip(trainers, checkpoint_dirs, previous, strict=True):
        if folder is not None:
            trainer.start_from(folder, before)
        if trainer.step == 0:
            trainer.init_from_data()
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
                "hookpoint": trainer.sae.cfg.hookpoint,
                "model": model,
                "world": dist.world,
            }
            sinks.append(
                stack.enter_context(
                    TrainLog(cfg.log_to, log_path, trainer.step, run_cfg, enabled=dist.is_main)
                )
            )
        stack.enter_context(reuse_freed_memory(device))
        _fit(source, trainers, sinks, checkpoint_dirs, step_hook)
    return [t.result() for t in trainers]


def _fit(
    source: BatchSource | StreamSource,
    trainers: list[SAETrainer],
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
            for batch in source.epoch(lead.gen, lead.cfg.batch_size, start, lead.dist.part):
                if isinstance(source, StreamSource):
                    for event in source.drain_events():  # a new mixing block: where its rows came from
                        for sink in sinks:
                            sink.write({"step": lead.step, **event})
                for t, sink, folder in zip(trainers, sinks, checkpoint_dirs, strict=True):
                    x_BD = batch[t.slot] if isinstance(batch, tuple) else batch
                    y_BD = batch[t.target_slot] if t.target_slot is not None else None
                    loss, dead_F = t._step(x_BD * t.scale, None if y_BD is None else y_BD * t.target_scale)
                    rec = t._after_step(x_BD, loss, dead_F, sink, folder, y_BD)
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


def _target_slots(
    cfgs: Sequence[TrainConfig],
    target_slots: Sequence[int | None] | None,
    slotted: StreamSource | PairedTensorSource | None,
) -> list[int | None]:
    """Each config's target slot; a transcoder without one, or an SAE given one, is refused."""
    targets: list[int | None] = list(target_slots) if target_slots is not None else [None] * len(cfgs)
    if len(targets) != len(cfgs):
        raise TrainError(f"{len(cfgs)} configs need as many target slots, got {len(targets)}")
    for c, t in zip(cfgs, targets, strict=True):
        if c.target_hookpoint and (t is None or slotted is None):
            raise TrainError(
                f"a transcoder (target hookpoint {c.target_hookpoint}) trains on (input, target) pairs: give a "
                "source holding both (a StreamSource with both hookpoints, or a PairedTensorSource) and its "
                "target slot"
            )
        if t is not None and not c.target_hookpoint:
            raise TrainError(
                f"target slot {t} given for an SAE; set TrainConfig.target_hookpoint for a transcoder"
            )
    return targets


def _target_name(
    slotted: StreamSource | PairedTensorSource | None, slot: int | None, cfg: TrainConfig
) -> str:
    """The target hookpoint's module name (the source's, resolved), else the config's spelling."""
    assert slotted is not None and slot is not None
    return slotted.hookpoints[slot] or cfg.target_hookpoint


def _check_batches(source: BatchSource, cfg: TrainConfig, dist: DistInfo) -> None:
    if source.n_rows < cfg.batch_size:
        raise TrainError(
            f"{source.n_rows} activations is fewer than one batch of {cfg.batch_size}; collect more tokens"
        )
    if cfg.batch_size % dist.world:
        raise TrainError(
            f"train.batch_size {cfg.batch_size} must divide evenly over {dist.world} data-parallel ranks"
        )
