"""Settings of `saelab train`: the SAE architecture and its optimisation, the per-architecture sections
(`train.jumprelu`, `train.matryoshka`), dead-latent resampling, and the variants trained beside it."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from saelab.config.base import ConfigError, _check, _finite

_DEFAULT_ARCHITECTURE = "topk"


def _registered_architectures() -> Any:
    """The choices of `--train.architecture`: the registry's names when the CLI is built, so an architecture
    registered before `saelab.cli.main` runs is one of them and `saelab train --help` lists them all."""
    from saelab.sae.registry import architecture_names  # imports torch: when the CLI is built, not at import

    return Literal.__getitem__(architecture_names())


@dataclass(frozen=True)
class JumpReLUConfig:
    """jumprelu: the thresholds' start, pseudo-derivative and learning rate."""

    bandwidth: float = 0.05
    """Width epsilon of the rectangle kernel in the straight-through threshold gradient (units of scaled
    pre-activations, whose scale is about 1)."""
    init_threshold: float = 1.0
    """Initial threshold of every latent (scaled units). Adam moves log(threshold) by about `lr` per step, so a
    short run ends near its start: 1.0 gives L0 ~40 on the demo's activations (0.1 gave ~530)."""
    threshold_lr: float = 0.0
    """Learning rate of the thresholds (0 = train.lr). Thresholds move by at most ~lr per Adam step, so short runs
    with thresholds far from their init may want a larger one."""

    def __post_init__(self) -> None:
        _finite(self, "train.jumprelu")
        _check(self.bandwidth > 0, f"train.jumprelu.bandwidth must be > 0, got {self.bandwidth}")
        _check(
            self.init_threshold > 0, f"train.jumprelu.init_threshold must be > 0, got {self.init_threshold}"
        )
        _check(self.threshold_lr >= 0, f"train.jumprelu.threshold_lr must be >= 0, got {self.threshold_lr}")


@dataclass(frozen=True)
class MatryoshkaConfig:
    """matryoshka: the nested dictionary prefixes."""

    prefix_fractions: tuple[float, ...] = (0.0625, 0.25, 1.0)
    """Nested dictionary prefixes as fractions of d_sae, increasing and ending at 1.0; each prefix is trained to
    reconstruct the input on its own."""

    def __post_init__(self) -> None:
        fr = self.prefix_fractions
        increasing = list(fr) == sorted(set(fr))
        _check(
            len(fr) > 0 and fr[0] > 0 and fr[-1] == 1.0 and increasing,
            f"train.matryoshka.prefix_fractions must be increasing fractions in (0, 1] ending at 1.0, got {fr}",
        )


@dataclass(frozen=True)
class ResampleConfig:
    """Dead-latent resampling (`saelab/train/resample.py`), independent of AuxK (turn that off with auxk_coef 0)."""

    method: Literal["none", "anthropic", "consistency"] = "none"
    """Resampling every `every` steps (none in the learning-rate decay): `anthropic` re-initialises latents dead
    for `train.dead_tokens` tokens from inputs drawn with probability proportional to their squared loss (Towards
    Monosemanticity, 2023); `consistency` resamples latents whose EMA firing statistics say dead, too weak, or
    unstable."""
    every: int = 250
    """Steps between resampling checks."""
    tokens: int = 16_384
    """Inputs scored to choose the new directions at each resampling (Anthropic used 819,200)."""
    encoder_scale: float = 0.0
    """Norm of a re-initialised encoder column relative to the mean of the other latents'. 0 = auto: Anthropic's
    0.2 for relu; 1.0 for the others, where a latent must win a top-k slot or clear a threshold to fire (at 0.2,
    0 of 32 forced-dead TopK latents revived on planted data; at 1.0, all 32)."""
    consistency_min_freq: float = 1e-5
    """consistency: a latent whose long-window firing frequency (EMA over `train.dead_tokens` tokens) is below
    this counts as dead."""
    consistency_z: float = 5.0
    """consistency: a latent is unstable when its short-window firing count (a tenth of the long window) is this
    many Poisson standard deviations, and tenfold, away from what its long-window frequency predicts."""

    def __post_init__(self) -> None:
        _finite(self, "train.resample")
        _check(self.every > 0, f"train.resample.every must be > 0, got {self.every}")
        _check(self.tokens > 0, f"train.resample.tokens must be > 0, got {self.tokens}")
        _check(
            self.encoder_scale >= 0, f"train.resample.encoder_scale must be >= 0, got {self.encoder_scale}"
        )
        _check(
            0 < self.consistency_min_freq < 1,
            f"train.resample.consistency_min_freq must be in (0, 1), got {self.consistency_min_freq}",
        )
        _check(self.consistency_z > 0, f"train.resample.consistency_z must be > 0, got {self.consistency_z}")


@dataclass(frozen=True)
class TrainConfig:
    """Sparse autoencoder training: TopK (Gao et al. 2024) with AuxK by default, or another architecture."""

    architecture: Annotated[
        str,
        tyro.conf.arg(
            constructor_factory=_registered_architectures,
            help_behavior_hint=f"(default: {_DEFAULT_ARCHITECTURE})",  # tyro shows a custom constructor's as a list
        ),
    ] = _DEFAULT_ARCHITECTURE
    """SAE architecture (the registry, saelab/sae/): `topk` (Gao et al. 2024), `relu` (L1 on f_i * ||W_dec_i||,
    Anthropic April 2024), `batchtopk` (Bussmann et al. 2024), `jumprelu` (Rajamanoharan et al. 2024),
    `matryoshka` (nested BatchTopK, Bussmann et al. 2025), or one registered by you (README, Extending saelab)."""
    expansion: int = 4
    """d_sae = expansion * d_in."""
    k: int = 48
    """Active latents per token: exact for topk, the mean over a batch for batchtopk and matryoshka; unused by
    relu and jumprelu (their sparsity comes from l1_coef / l0_coef)."""
    lr: float = 2e-3
    """Adam learning rate (decays linearly to 0 over the last 20% of steps)."""
    batch_size: int = 512
    """Tokens per step."""
    epochs: int = 3
    """Passes over the collected activations."""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient (OpenAI's 1/32; loss normalised by the residual's variance)."""
    auxk_k: int = 0
    """Latents in the AuxK reconstruction; 0 = d_in // 2."""
    dead_tokens: int = 20_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK, `anthropic` resampling);
    also the `consistency` resampler's long window."""
    l1_coef: float = 5.0
    """relu: weight of the L1 penalty sum_i f_i * ||W_dec_i|| (inputs scaled to E||x||^2 = d_in, as in
    Anthropic's April 2024 update, which used 5)."""
    l0_coef: float = 0.1
    """jumprelu: weight of the L0 penalty (active latents per token, against the per-token summed squared error
    of scaled inputs)."""
    sparsity_warmup_fraction: float = 0.05
    """relu and jumprelu: the L1 / L0 coefficient rises linearly from 0 over this fraction of the steps."""
    jumprelu: JumpReLUConfig = field(default_factory=JumpReLUConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    checkpoint_every: int = 100
    """Steps between checkpoints (SAE, optimizer, step, RNG and dead-latent state) in the train stage's
    `checkpoints/` folder (`.train.tmp/checkpoints/` until the training succeeds), only the last kept; 0 = none."""
    resume: bool = False
    """Continue from the last checkpoint (bit-for-bit the run that was stopped); without one, start afresh."""
    log_every: int = 10
    """Steps between log records (loss parts, L0, dead fraction, explained variance)."""
    log_to: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl",)
    """Where log records go: the stage's `train_log.jsonl`, TensorBoard (`tensorboard/` beside it; needs the
    tensorboard package) and/or Weights & Biases (needs wandb; project from $WANDB_PROJECT, else saelab)."""
    stream_buffer_rows: int = 262_144
    """Training from an on-disk activation store: rows shuffled together in memory (bounds memory use)."""
    cpu_step_threads: Literal["all", "one-after-matmul"] = "all"
    """Intra-op threads of a k-sparse SAE's training step on CPU. `all`: every op on all of torch's threads.
    `one-after-matmul`: the dense selection matmul on all of them, the many short ops after it (top-k, sparse
    products, Adam) on one. The second halved the wall time of a step at 18,432 latents on 2 cores that other
    work kept busy (BENCHMARKS.md, TopK training at width) and loses where cores are free (the post-matmul work
    runs on one of them): use it on a shared or oversubscribed machine."""
    selection_matmul: Literal["auto", "float32", "bfloat16"] = "auto"
    """topk with the sparse kernels: the precision of the matmul that chooses each token's k latents. `bfloat16`
    chooses from a bfloat16 matmul and confirms every row's choice against a rigorous bound in float32, recomputing
    a row in float32 where the bound cannot confirm it (saelab/sae/selection.py): the same entries and float32
    values as `float32`, 2.5-4x faster for that matmul where bfloat16 is native. `auto`: bfloat16 on AVX512-BF16 or
    AMX CPUs and on CUDA GPUs with native bfloat16, else float32. The other architectures choose in float32."""
    encoder_init_scale: float = 0.577
    """The encoder starts as the decoder's transpose times this (Gao et al. 2024 tie them at 1; 0.577 = 1/sqrt(3)
    is the row norm of PyTorch's default Linear init, which sparsify's tied start amounts to). A smaller start
    lets Adam's steps move the encoder further early on. Measured with lr 4e-4, 70 steps of 4,096 tokens, width
    4608, k 32 on the bundled model: held-out EV 0.593 from 0.577 against 0.543 from 1, no dead latents either
    way; on the planted test data every architecture reached equal or higher EV at the same L0 (with more of
    the surplus latents idle: that data has half as many directions as latents)."""
    variants: tuple[str, ...] = ()
    """Further SAEs trained on the same batches (one pass over the activations for all), each given as
    space-separated overrides of these settings named as their flags without `--train.` (or with underscores), e.g.
    `"architecture=batchtopk k=64"` `"k=16 lr=1e-3"` `"architecture=jumprelu jumprelu.bandwidth=0.1"`; tuples take
    commas (`matryoshka.prefix_fractions=0.25,0.5,1`). Saved under the run's `sae-variants/<i>-<overrides>/`."""
    target_hookpoint: str = ""
    """Train a transcoder: the module whose output it reconstructs from the hookpoint's (`collect.hookpoint`), e.g.
    `--collect.hookpoint layers.6.post_attention_layernorm --train.target-hookpoint layers.6.mlp` on Llama (the
    MLP's input after its norm, and the MLP's output). Encoder and sparsity are the architecture's own; the loss is
    against the target. Empty = an SAE. Trained on the fly (`collect.format stream`: one forward captures both)."""
    skip: bool = False
    """Transcoder: add a learned linear skip path from input to output, starting at zero (a skip transcoder,
    Paulo, Shabalin & Belrose 2025)."""
    kernels: Literal["auto", "sparse", "dense"] = "auto"
    """topk, batchtopk, matryoshka: backward passes over the active entries only (`sparse`, saelab/sae/sparse_ops.py)
    or dense matmuls over all latents (`dense`). Both compute the same gradients. `auto`: sparse on CPU, where it
    measured ~2.5x faster per step; dense on GPUs, where it has not been measured yet."""

    def __post_init__(self) -> None:
        from saelab.sae.registry import architecture_names  # the registry imports torch

        _finite(self, "train")
        names = architecture_names()
        _check(
            self.architecture in names,
            f"train.architecture must be a registered architecture ({', '.join(names)}), got {self.architecture!r}",
        )
        _check(self.expansion >= 1, f"train.expansion must be >= 1, got {self.expansion}")
        _check(self.k > 0, f"train.k must be > 0, got {self.k}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.batch_size > 0, "train.batch_size must be > 0")
        _check(self.epochs > 0, "train.epochs must be > 0")
        _check(self.auxk_coef >= 0, "train.auxk_coef must be >= 0")
        _check(self.auxk_k >= 0, "train.auxk_k must be >= 0")
        _check(self.dead_tokens > 0, "train.dead_tokens must be > 0")
        _check(self.l1_coef >= 0, f"train.l1_coef must be >= 0, got {self.l1_coef}")
        _check(self.l0_coef >= 0, f"train.l0_coef must be >= 0, got {self.l0_coef}")
        _check(
            0 <= self.sparsity_warmup_fraction < 1,
            f"train.sparsity_warmup_fraction must be in [0, 1), got {self.sparsity_warmup_fraction}",
        )
        _check(
            self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}"
        )
        _check(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")
        _check(len(set(self.log_to)) == len(self.log_to), f"train.log_to names a sink twice: {self.log_to}")
        _check(self.stream_buffer_rows > 0, "train.stream_buffer_rows must be > 0")
        _check(
            self.encoder_init_scale > 0,
            f"train.encoder_init_scale must be > 0, got {self.encoder_init_scale}",
        )
        _check(
            not self.skip or bool(self.target_hookpoint),
            "train.skip adds a skip path to a transcoder: give --train.target-hookpoint too",
        )
        _check(
            not self.target_hookpoint or self.resample.method == "none",
            f"train.resample.method {self.resample.method} re-initialises decoder rows from inputs, but a "
            "transcoder's decoder writes its target: train transcoders with --train.resample.method none (AuxK "
            "still revives dead latents)",
        )
        self.variant_configs()  # parses and validates every variant

    def variant_configs(self) -> list[TrainConfig]:
        """The configs of `variants`: these settings with each variant's overrides."""
        return [self.with_overrides(v) for v in self.variants]

    def with_overrides(self, text: str) -> TrainConfig:
        """These settings with the overrides in `text` as a variant gives them (`"k=64 jumprelu.bandwidth=0.1"`),
        without variants."""
        return _with_overrides(self, text)


# Settings every SAE of one stream shares (train_many), so a variant cannot override them.
_SHARED_STREAM = frozenset({"batch_size", "epochs", "stream_buffer_rows", "resume", "variants"})
_SECTIONS = frozenset({"jumprelu", "matryoshka", "resample"})
"""TrainConfig's nested settings; a variant names theirs as SECTION.NAME."""


def _with_overrides(cfg: TrainConfig, text: str) -> TrainConfig:
    """`cfg` with the overrides in `text` (`"k=64 architecture=relu jumprelu.bandwidth=0.1"`), each typed by the
    setting it names; nested settings not named keep `cfg`'s values."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        name = name.replace("-", "_")  # the flag's spelling (init-threshold) or the field's (init_threshold)
        section, _, leaf = name.rpartition(".")
        owner = getattr(cfg, section) if section in _SECTIONS else cfg if not section else None
        known = owner is not None and leaf in {f.name for f in dataclasses.fields(owner)}
        _check(
            bool(sep) and known and name not in _SHARED_STREAM | _SECTIONS,
            f"train.variants: {item!r} in {text!r} is not NAME=VALUE of a setting a variant may change (NAME as "
            "its flag without `--train.`, e.g. k, lr, jumprelu.bandwidth, resample.method; all SAEs share "
            f"{', '.join(sorted(_SHARED_STREAM - {'variants'}))})",
        )
        typed = _typed(name, value, type(owner), leaf, getattr(owner, leaf))
        (nested.setdefault(section, {}) if section else top)[leaf] = typed
    _check(bool(top or nested), f"train.variants: {text!r} changes nothing; give NAME=VALUE overrides")
    for section, changes in nested.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, variants=(), **top)


def _typed(name: str, value: str, owner: type, leaf: str, default: Any) -> Any:
    choices = typing.get_args(typing.get_type_hints(owner)[leaf])
    if choices and all(isinstance(c, str) for c in choices):
        _check(value in choices, f"train.variants: {name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    try:
        if isinstance(default, bool):
            _check(value in ("true", "false"), f"train.variants: {name} takes true or false, got {value!r}")
            return value == "true"
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in value.split(",") if v)
        return type(default)(value)
    except ValueError as err:
        raise ConfigError(f"train.variants: {name}={value!r} is not a {type(default).__name__}") from err
