"""Dead-latent resampling: which latents to re-initialise, and how.

Both methods re-initialise the same way (Anthropic, "Towards Monosemanticity", 2023, appendix "Neuron
Resampling"): score a sample of inputs by the SAE's loss, draw one input per latent with probability proportional to
the square of that loss, and set the latent's decoder row to the input's direction (relative to b_dec, which the
encoder subtracts first), its encoder column to the same direction with norm 0.2 x the mean encoder norm of the
latents kept, its encoder bias to 0, and its Adam moments to 0. The 0.2 suits Anthropic's ReLU SAE; where a latent
must win a top-k slot or clear a threshold, such a weak encoder never fires, so those architectures default to 1.0
(`train.resample.encoder_scale`, `SAE.resample_encoder_scale`). What else a reset touches is the
architecture's (`SAE.reset_latents_`: JumpReLU thresholds restart at their initial value). The methods differ in
which latents they choose:

- `anthropic`: latents that have not fired for `dead_tokens` training tokens;
- `consistency`: latents whose firing statistics, tracked by exponential moving averages, are inconsistent with a
  useful latent. Per latent: the firing frequency over a long window (`dead_tokens` tokens) and a short one (a
  tenth of it), and the mean activation when firing. A latent is resampled when its score
      max(log10(min_freq / f_long),                                    dead: (almost) never fires
          log10(0.01 * median mean activation / its mean activation),  weak: fires, contributes ~nothing
          min(|z| - z_max, |log10(f_short / f_long)| - 1))             unstable: rate changed tenfold, significantly
  is positive, where z = (n_short - lambda) / sqrt(lambda + 1) compares the short window's firing count with the
  count the long-window frequency predicts (a Poisson standard score, so rare latents need several events to count).

Resampling happens every `train.resample.every` steps until the learning-rate decay starts; latents re-initialised less
than `dead_tokens` tokens ago are left alone. Each event is recorded with how many of its latents fired since.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from saelab.activations.sources import BatchSource
from saelab.config import TrainConfig
from saelab.sae.base import SAE, TrainLoss, architecture_class

ANTHROPIC_ENCODER_SCALE = 0.2
"""Re-initialised encoder norm relative to the mean norm of the kept latents (Anthropic 2023, a ReLU SAE)."""
WEAK_RATIO = 0.01
"""consistency: a mean activation below this fraction of the median latent's counts as weak."""
SHORT_WINDOW = 0.1
"""consistency: the short window as a fraction of the long one."""


class ResampleEvent(NamedTuple):
    """One resampling."""

    step: int
    """Index of the step it followed."""
    method: str
    resampled: int
    """Latents re-initialised."""
    fired_after: int
    """Of those (not resampled again since), how many have fired since."""


@torch.no_grad()
def per_input_loss(sae: SAE, x_ND: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Squared reconstruction error of each input (inference path)."""
    return torch.cat(
        [
            (x - sae.reconstruct(x)[0]).pow(2).sum(dim=-1)
            for x in x_ND.split(batch_size)  # bounded memory for the [B, F] pre-activations
        ]
    )


def sample_by_loss(loss_N: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` input indices drawn with probability proportional to loss^2 (distinct while enough inputs have loss);
    uniform if every loss is 0."""
    w = loss_N.double().cpu().pow(2)
    if not bool(w.sum() > 0):
        w = torch.ones_like(w)
    return torch.multinomial(w, n, replacement=n > int((w > 0).sum()), generator=gen)


def latent_dim(name: str) -> int | None:
    """Which dimension of a parameter indexes latents, from its shape suffix (`W_enc_DF` -> 1, `b_enc_F` -> 0)."""
    suffix = name.rsplit("_", 1)[-1]
    return suffix.index("F") if "F" in suffix and suffix.isupper() else None


@torch.no_grad()
def reset_adam_(opt: torch.optim.Optimizer, sae: SAE, idx: torch.Tensor) -> None:
    """Zero the Adam moments of latents `idx` in every per-latent parameter."""
    for name, p in sae.named_parameters():
        dim = latent_dim(name)
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if dim is not None and key in state:
                state[key].index_fill_(dim, idx.to(p.device), 0.0)


@torch.no_grad()
def reinit_latents_(
    sae: SAE,
    opt: torch.optim.Optimizer,
    idx: torch.Tensor,
    x_ND: torch.Tensor,
    gen: torch.Generator,
    enc_scale: float = ANTHROPIC_ENCODER_SCALE,
) -> None:
    """Anthropic's re-initialisation of latents `idx` from inputs `x_ND` (scaled as in training)."""
    picks = sample_by_loss(per_input_loss(sae, x_ND, 4096), len(idx), gen).to(x_ND.device)
    v_KD = x_ND[picks] - sae.b_dec_D
    dirs_KD = v_KD / v_KD.norm(dim=1, keepdim=True).clamp_min(1e-8)
    kept = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=idx.device)
    kept[idx] = False
    enc_norm = sae.W_enc_DF[:, kept].norm(dim=0).mean() if kept.any() else torch.tensor(1.0)
    dec_norm = 1.0 if sae.unit_norm_decoder else sae.W_dec_FD[kept].norm(dim=1).mean()
    sae.reset_latents_(idx, dirs_KD * dec_norm, (dirs_KD * enc_scale * enc_norm).T)
    reset_adam_(opt, sae, idx)


def encoder_scale(cfg: TrainConfig) -> float:
    """The configured encoder scale, or the architecture's default (`SAE.resample_encoder_scale`: 0.2 for relu,
    else 1.0)."""
    if cfg.resample.encoder_scale:
        return cfg.resample.encoder_scale
    return architecture_class(cfg.architecture).resample_encoder_scale


class Resampler:
    """Chooses latents to resample (subclasses), re-initialises them, and keeps the record of events."""

    method = ""

    def __init__(self, cfg: TrainConfig, d_sae: int, device: torch.device, seed: int) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: shuffling stays unchanged
        self.event_F = torch.full((d_sae,), -1, dtype=torch.long, device=device)
        """Index of the event that last re-initialised each latent (-1: never)."""
        self.fired_since_F = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.events: list[tuple[int, int]] = []
        """(step, latents resampled) per event."""

    def observe(
        self, loss: TrainLoss, fired_F: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Per step (device ops only, no host sync). `reduce` sums a tensor over data-parallel ranks."""
        self.fired_since_F |= fired_F

    def choose(self, since_fired_F: torch.Tensor) -> torch.Tensor:
        """Boolean mask of latents to resample now."""
        raise NotImplementedError

    def due(self, step: int, total: int) -> bool:
        """Resample after `step` completed steps? Not during the learning-rate decay (last 20%)."""
        return step % self.cfg.resample.every == 0 and step < int(0.8 * total)

    def resample(
        self,
        step: int,
        sae: SAE,
        opt: torch.optim.Optimizer,
        source: BatchSource,
        scale: float,
        since_fired_F: torch.Tensor,
    ) -> int:
        """Re-initialise the chosen latents; returns how many (0: no event recorded)."""
        idx = self.choose(since_fired_F).nonzero().flatten()
        if len(idx) == 0:
            return 0
        x_ND = source.sample(self.cfg.resample.tokens, self.gen) * scale
        reinit_latents_(sae, opt, idx, x_ND, self.gen, encoder_scale(self.cfg))
        since_fired_F[idx] = 0
        self.event_F[idx] = len(self.events)
        self.fired_since_F[idx] = False
        self.reset(idx)
        self.events.append((step, len(idx)))
        return len(idx)

    def reset(self, idx: torch.Tensor) -> None:
        """Forget the statistics of re-initialised latents."""

    def summary(self) -> list[ResampleEvent]:
        """Every event with how many of its latents fired since (one host sync)."""
        hit = self.event_F[self.fired_since_F & (self.event_F >= 0)]
        fired = torch.bincount(hit, minlength=len(self.events)).tolist() if self.events else []
        return [ResampleEvent(s, self.method, n, f) for (s, n), f in zip(self.events, fired)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "gen": self.gen.get_state(),
            "event_F": self.event_F,
            "fired_since_F": self.fired_since_F,
            "events": [list(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"].cpu())
        self.event_F.copy_(state["event_F"])
        self.fired_since_F.copy_(state["fired_since_F"])
        self.events = [(int(s), int(n)) for s, n in state["events"]]


class AnthropicResampler(Resampler):
    """Latents dead for `dead_tokens` tokens (the counter restarts at re-initialisation)."""

    method = "anthropic"

    def choose(self, since_fired_F: torch.Tensor) -> torch.Tensor:
        return since_fired_F >= self.cfg.dead_tokens


class ConsistencyResampler(Resampler):
    """Latents whose EMA firing statistics say dead, weak or unstable (see the module docstring)."""

    method = "consistency"
    _STATS = ("f_long_F", "f_short_F", "act_long_F", "steps_F")

    def __init__(self, cfg: TrainConfig, d_sae: int, device: torch.device, seed: int) -> None:
        super().__init__(cfg, d_sae, device, seed)
        self.a_long = min(1.0, cfg.batch_size / cfg.dead_tokens)
        self.a_short = min(1.0, cfg.batch_size / (SHORT_WINDOW * cfg.dead_tokens))
        # EMAs start at 0 and are bias-corrected per latent (as Adam's moments), so young estimates are usable.
        self.f_long_F = torch.zeros(d_sae, device=device)
        self.f_short_F = torch.zeros(d_sae, device=device)
        self.act_long_F = torch.zeros(d_sae, device=device)
        self.steps_F = torch.zeros(d_sae, device=device)

    def observe(
        self, loss: TrainLoss, fired_F: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().observe(loss, fired_F, reduce)
        stats_2F = reduce(torch.stack([loss.count_F, loss.act_sum_F])) / self.cfg.batch_size
        self.f_long_F.lerp_(stats_2F[0], self.a_long)
        self.f_short_F.lerp_(stats_2F[0], self.a_short)
        self.act_long_F.lerp_(stats_2F[1], self.a_long)
        self.steps_F += 1

    def scores(self) -> torch.Tensor:
        """Per-latent score; > 0 means resample (NaN-free)."""
        corr_long = 1 - (1 - self.a_long) ** self.steps_F
        corr_short = 1 - (1 - self.a_short) ** self.steps_F
        f_long = self.f_long_F / corr_long.clamp_min(1e-12)
        f_short = self.f_short_F / corr_short.clamp_min(1e-12)
        mean_act = self.act_long_F / self.f_long_F.clamp_min(1e-12)
        alive = f_long >= self.cfg.resample.consistency_min_freq
        dead = torch.log10(self.cfg.resample.consistency_min_freq / f_long.clamp_min(1e-12))
        median = mean_act[alive].median() if alive.any() else mean_act.new_ones(())
        weak = torch.log10(WEAK_RATIO * median / mean_act.clamp_min(1e-12)).masked_fill(~alive, -math.inf)
        window = SHORT_WINDOW * self.cfg.dead_tokens
        lam, n = f_long * window, f_short * window
        z = (n - lam) / (lam + 1).sqrt()
        ratio = torch.log10((f_short + 1 / window) / (f_long + 1 / window))
        unstable = torch.minimum(z.abs() - self.cfg.resample.consistency_z, ratio.abs() - 1)
        return torch.maximum(torch.maximum(dead, weak), unstable)

    def choose(self, since_fired_F: torch.Tensor) -> torch.Tensor:
        settled = self.steps_F * self.cfg.batch_size >= self.cfg.dead_tokens
        return settled & (self.scores() > 0)

    def reset(self, idx: torch.Tensor) -> None:
        for name in self._STATS:
            getattr(self, name)[idx] = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **{name: getattr(self, name) for name in self._STATS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name in self._STATS:
            getattr(self, name).copy_(state[name])


RESAMPLERS: dict[str, type[Resampler]] = {c.method: c for c in (AnthropicResampler, ConsistencyResampler)}


def make_resampler(cfg: TrainConfig, d_sae: int, device: torch.device, seed: int) -> Resampler | None:
    method = cfg.resample.method
    return None if method == "none" else RESAMPLERS[method](cfg, d_sae, device, seed)
