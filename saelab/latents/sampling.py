"""Example sets per latent: top examples for the explainer, quantile and non-activating examples for scoring.

Windows are cut into non-overlapping examples of `example_ctx_len` tokens. An example activates a latent when the
latent fires on any of its tokens; its activation is the max over tokens. For each studied latent:
- `train`: the `n_examples_train` highest-activating examples (shown to the explainer);
- `test_pos`: `n_examples_test` activating examples from the *remaining* ones, spread evenly over `n_quantiles`
  activation quantiles (so explanation and scoring examples are disjoint, unlike Delphi's shared pool);
- `test_neg`: `n_non_activating` examples where the latent fires on no token: drawn at random
  (`non_activating_source random`), or the hard negatives among a shared random pool of `n_candidates` examples
  whose MiniLM embeddings lie nearest the mean embedding of the latent's activating examples (`similar`);
- `train_neg`: `n_non_activating_train` more of them, for the contrastive explainer (disjoint from `test_neg`).
Latents firing on fewer than `min_examples` cached tokens are never chosen and counted (`n_ineligible`, dead ones
also in `n_dead`); chosen latents with fewer than `min_examples` activating examples, or too few non-activating
ones, are skipped with the reason. Nothing is dropped silently. Every latent records the class balance of its
scoring set (`class_balance`: activating vs non-activating counts), and `SampleSet.class_balance` totals them.

Run through `saelab sample --run-dir RUN` (after `saelab cache`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saelab.config import SampleConfig
from saelab.latents.cache import LatentCache
from saelab.run import atomic


@dataclass(frozen=True)
class Example:
    """A short token sequence and one latent's activation on each token."""

    tokens: tuple[int, ...]
    """Token ids."""
    token_strs: tuple[str, ...]
    """Each token decoded on its own (so explainers and scorers need no tokenizer)."""
    acts: tuple[float, ...]
    """The latent's activation per token (0.0 where it does not fire or the position is excluded)."""
    window: int
    """Index of the source window."""
    start: int
    """Offset of the first token inside the window."""
    quantile: int = -1
    """Activation quantile of a scoring example (0 = lowest); -1 for explainer and non-activating examples."""

    @property
    def max_act(self) -> float:
        return max(self.acts)

    @property
    def activating(self) -> bool:
        return self.max_act > 0

    @property
    def example_id(self) -> str:
        return f"{self.window}:{self.start}"

    @property
    def text(self) -> str:
        return "".join(self.token_strs)


@dataclass(frozen=True)
class LatentExamples:
    """The example sets of one latent."""

    latent: int
    frequency: float
    """Fraction of cached tokens on which the latent fires."""
    max_act: float
    train: tuple[Example, ...]
    """Top activating examples for the explainer."""
    test_pos: tuple[Example, ...]
    """Activating scoring examples across quantiles (disjoint from `train`)."""
    test_neg: tuple[Example, ...]
    """Non-activating scoring examples."""
    train_neg: tuple[Example, ...] = ()
    """Non-activating examples for the contrastive explainer (disjoint from `test_neg`)."""

    @property
    def class_balance(self) -> ClassBalance:
        """Activating vs non-activating counts of the scoring set."""
        return ClassBalance(len(self.test_pos), len(self.test_neg))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentExamples:
        """One latent's record of `samples.json` (files written before `train_neg` existed read with none)."""

        def ex(e: dict[str, Any]) -> Example:
            return Example(
                tuple(e["tokens"]),
                tuple(e["token_strs"]),
                tuple(e["acts"]),
                e["window"],
                e["start"],
                e["quantile"],
            )

        return cls(
            d["latent"],
            d["frequency"],
            d["max_act"],
            tuple(ex(e) for e in d["train"]),
            tuple(ex(e) for e in d["test_pos"]),
            tuple(ex(e) for e in d["test_neg"]),
            tuple(ex(e) for e in d.get("train_neg", ())),
        )


class ClassBalance(NamedTuple):
    """Class counts of a scoring set."""

    n_activating: int
    n_non_activating: int

    @property
    def activating_fraction(self) -> float:
        return self.n_activating / max(1, self.n_activating + self.n_non_activating)


@dataclass
class SampleSet:
    """Example sets for the studied latents, the skipped latents with reasons, and the sampling config."""

    latents: list[LatentExamples]
    skipped: dict[int, str] = field(default_factory=dict)
    """Chosen latents that could not be sampled, with the reason."""
    n_ineligible: int = 0
    """Latents never chosen because they fire on fewer than `min_examples` cached tokens (dead ones included)."""
    config: dict[str, Any] = field(default_factory=dict)
    n_dead: int = 0
    """Latents that never fire on the cached tokens (counted in `n_ineligible` too)."""
    cache: dict[str, Any] = field(default_factory=dict)
    """The latent cache sampled from: split, tokens, SAE sha256."""

    @property
    def class_balance(self) -> ClassBalance:
        """Activating vs non-activating scoring examples over all latents."""
        return ClassBalance(
            sum(le.class_balance.n_activating for le in self.latents),
            sum(le.class_balance.n_non_activating for le in self.latents),
        )

    def summary(self) -> dict[str, Any]:
        """Counts for the run manifest and the report."""
        balance = self.class_balance
        return {
            "n_latents": len(self.latents),
            "n_skipped": len(self.skipped),
            "n_ineligible": self.n_ineligible,
            "n_dead": self.n_dead,
            "class_balance": {**balance._asdict(), "activating_fraction": balance.activating_fraction},
        }

    def save(self, path: Path) -> None:
        """One JSON object, laid out one latent per line so the feature browser can read a single latent
        (`SampleIndex`): the first line holds everything but the latents (and their ids, in order), each later
        line one latent's object, the last line closes the list."""
        meta = {
            "config": self.config,
            "cache": self.cache,
            **self.summary(),
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "latent_ids": [le.latent for le in self.latents],
        }
        rows = [
            json.dumps({**asdict(le), "class_balance": le.class_balance._asdict()}) for le in self.latents
        ]
        head = json.dumps(meta)[:-1] + ', "latents": [\n'
        atomic.write_text(path, head + ",\n".join(rows) + ("\n" if rows else "") + "]}\n")

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `saelab sample` first")
        data = json.loads(path.read_text())

        latents = [LatentExamples.from_dict(d) for d in data["latents"]]
        skipped = {int(k): v for k, v in data["skipped"].items()}
        return cls(
            latents,
            skipped,
            data["n_ineligible"],
            data["config"],
            data.get("n_dead", 0),
            data.get("cache", {}),
        )

    def save_run(self, run_folder: Path) -> str:
        """Save as the run's samples; returns the path relative to the run folder."""
        (run_folder / SAMPLES).parent.mkdir(parents=True, exist_ok=True)
        self.save(run_folder / SAMPLES)
        return SAMPLES

    @classmethod
    def load_run(cls, run_folder: Path) -> SampleSet:
        return cls.load(run_folder / SAMPLES)


SAMPLES = "samples/samples.json"
"""The run's example sets, relative to the run folder."""


class SampleIndex:
    """One latent's examples read from a samples file without parsing the rest (the layout `SampleSet.save`
    writes: a first line of everything but the latents, then one latent per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spans: dict[int, tuple[int, int]] = {}
        """By latent: (offset, length) of its line."""
        with path.open("rb") as fh:
            head = fh.readline()
            try:
                meta = json.loads(head.decode("utf-8").rstrip().removesuffix("[") + "[]}")
                ids = [int(i) for i in meta["latent_ids"]]
            except (ValueError, KeyError, TypeError):
                raise SampleError(
                    f"{path} is not a samples file of this saelab version (no per-latent lines); "
                    "rerun `saelab sample`"
                ) from None
            offset = len(head)
            for latent in ids:
                line = fh.readline()
                self.spans[latent] = (offset, len(line))
                offset += len(line)

    def examples(self, latent: int) -> LatentExamples | None:
        """The latent's examples, or None when it was not sampled."""
        span = self.spans.get(latent)
        if span is None:
            return None
        with self.path.open("rb") as fh:
            fh.seek(span[0])
            text = fh.read(span[1]).decode("utf-8").rstrip().removesuffix(",")
        return LatentExamples.from_dict(json.loads(text))


Embed = Callable[[list[str]], np.ndarray]
"""Texts -> [n, dim] unit vectors (`saelab.autointerp.embed.Embedder.embed`)."""


class SampleError(ValueError):
    """The sample cannot be drawn as configured; the message says the fix."""


def choose_latents(freq_F: np.ndarray, n: int, min_freq: float) -> list[int]:
    """`n` latents spread evenly (in log-frequency rank) over the latents firing at least `min_freq`."""
    alive = np.flatnonzero(freq_F >= min_freq)
    if len(alive) == 0:
        return []
    order = alive[np.argsort(freq_F[alive], kind="stable")]
    picks = np.unique(np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int))
    return [int(order[i]) for i in picks]


class _Examples:
    """The example grid of the cached windows (every window cut into `ctx`-token examples) and its texts."""

    def __init__(self, cache: LatentCache, tokens: np.ndarray, token_str: Callable[[int], str], ctx: int):
        if tokens.shape[1] < ctx:
            raise SampleError(
                f"sample.example_ctx_len {ctx} is longer than the {tokens.shape[1]}-token windows"
            )
        self.cache, self.tokens, self.token_str, self.ctx = cache, tokens, token_str, ctx
        self.windows = np.unique(cache.window_N).astype(np.int64)
        self.starts = np.arange(0, tokens.shape[1] - ctx + 1, ctx, dtype=np.int64)

    def key(self, window: np.ndarray, start: np.ndarray) -> np.ndarray:
        """A unique int64 per (window, start)."""
        return window.astype(np.int64) * len(self.starts) + start // self.ctx

    def unkey(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return key // len(self.starts), (key % len(self.starts)) * self.ctx

    def random_keys(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` distinct random examples (all of them, shuffled, when there are fewer)."""
        total = len(self.windows) * len(self.starts)
        idx = rng.choice(total, size=min(n, total), replace=False)
        return self.key(self.windows[idx // len(self.starts)], self.starts[idx % len(self.starts)])

    def where(self, key: int) -> tuple[int, int]:
        """(window, start) of an example."""
        w, s = self.unkey(np.asarray([key]))
        return int(w[0]), int(s[0])

    def text(self, key: int) -> str:
        w, s = self.where(key)
        return "".join(self.token_str(int(t)) for t in self.tokens[w, s : s + self.ctx])

    def make(self, key: int, quantile: int, acts: dict[tuple[int, int], float]) -> Example:
        w, s = self.where(key)
        ids = self.tokens[w, s : s + self.ctx]
        values = tuple(float(acts.get((w, s + i), 0.0)) for i in range(self.ctx))
        strs = tuple(self.token_str(int(t)) for t in ids)
        return Example(tuple(int(t) for t in ids), strs, values, w, s, quantile)


class _Negatives:
    """Non-activating examples per latent: random ones, or the nearest to the activating ones in a shared pool."""

    def __init__(self, grid: _Examples, cfg: SampleConfig, rng: np.random.Generator, embed: Embed | None):
        self.grid, self.cfg, self.rng, self.embed = grid, cfg, rng, embed
        self.pool = np.zeros(0, dtype=np.int64)
        self.pool_vecs = np.zeros((0, 1), dtype=np.float32)
        if cfg.non_activating_source == "similar":
            if embed is None:
                raise SampleError(
                    "non_activating_source 'similar' needs an embedder (saelab.autointerp.embed.Embedder)"
                )
            self.pool = grid.random_keys(cfg.n_candidates, rng)  # one pool embedded once for every latent
            self.pool_vecs = embed([grid.text(int(k)) for k in self.pool])

    def pick(self, active: np.ndarray, activating_texts: list[str]) -> np.ndarray:
        """Keys of up to `n_non_activating + n_non_activating_train` examples outside `active` (sorted keys of
        activating examples), nearest first with `similar`."""
        n = self.cfg.n_non_activating + self.cfg.n_non_activating_train
        if self.cfg.non_activating_source == "random":
            # len(active) + n distinct examples hold n non-activating ones whenever that many exist
            keys = self.grid.random_keys(len(active) + n, self.rng)
            return keys[~np.isin(keys, active)][:n]
        assert self.embed is not None
        ok = ~np.isin(self.pool, active)
        centre = self.embed(activating_texts).mean(0)
        sims = self.pool_vecs[ok] @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
        return self.pool[ok][np.argsort(-sims, kind="stable")[:n]]


def _examples_of(cache: LatentCache, latent: int, grid: _Examples) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, max activation) of every example on which `latent` fires."""
    tok_idx, values = cache.latent(latent)
    keys = grid.key(cache.window_N[tok_idx], (cache.pos_N[tok_idx] // grid.ctx) * grid.ctx)
    uniq, inv = np.unique(keys, return_inverse=True)
    maxes = np.zeros(len(uniq), dtype=np.float32)
    np.maximum.at(maxes, inv, values)
    return uniq, maxes


def sample(
    cache: LatentCache,
    tokens: np.ndarray,
    token_str: Callable[[int], str],
    cfg: SampleConfig,
    seed: int,
    embed: Embed | None = None,
) -> SampleSet:
    """Build the example sets (see module docstring). `token_str(id)` is token `id` decoded alone; `embed` is
    needed with `non_activating_source='similar'`."""
    rng = np.random.default_rng(seed)
    count = cache.stats.count
    bad = [f for f in cfg.latents if not 0 <= f < cache.d_sae]
    if bad:
        raise SampleError(f"sample.latents {bad} out of range: the SAE has {cache.d_sae} latents")
    chosen = list(cfg.latents) or choose_latents(count.astype(np.float64), cfg.n_latents, cfg.min_examples)
    grid = _Examples(cache, tokens, token_str, cfg.example_ctx_len)
    negatives = _Negatives(grid, cfg, rng, embed)
    skipped: dict[int, str] = {}
    out: list[LatentExamples] = []
    for latent in chosen:
        got = _sample_latent(cache, latent, grid, negatives, cfg, rng)
        if isinstance(got, str):
            skipped[latent] = got
        else:
            out.append(got)
    provenance = {
        k: v for k, v in cache.summary().items() if k in ("dataset_split", "n_tokens", "sae_sha256")
    }
    n_inel, n_dead = int((count < cfg.min_examples).sum()), int((count == 0).sum())
    return SampleSet(out, skipped, n_inel, asdict(cfg), n_dead, provenance)


def _sample_latent(
    cache: LatentCache,
    latent: int,
    grid: _Examples,
    negatives: _Negatives,
    cfg: SampleConfig,
    rng: np.random.Generator,
) -> LatentExamples | str:
    """One latent's example sets, or the reason it is skipped."""
    if cache.stats.count[latent] == 0:
        return f"never fires on the {cache.n_tokens} cached tokens ({cache.info.dataset_split} split)"
    keys, maxes = _examples_of(cache, latent, grid)
    if len(maxes) < cfg.min_examples:
        return f"{len(maxes)} activating examples < min_examples {cfg.min_examples}"
    order = np.argsort(-maxes, kind="stable")
    train_ids = order[: cfg.n_examples_train]
    test_ids = _quantile_draw(order[cfg.n_examples_train :], maxes, cfg.n_examples_test, cfg.n_quantiles, rng)
    texts = [grid.text(int(keys[i])) for i in [*train_ids, *(i for i, _ in test_ids)]]
    neg = negatives.pick(keys, texts)
    need = cfg.n_non_activating + cfg.n_non_activating_train
    if len(neg) < need:
        where = "" if cfg.non_activating_source == "random" else f" among the {cfg.n_candidates} candidates"
        return f"only {len(neg)} non-activating examples{where} (need {need})"
    # the explainer's negatives are a random part of the drawn ones, so with `similar` both sides get hard ones
    neg = neg[rng.permutation(len(neg))]
    acts = _dense_acts(cache, latent)
    return LatentExamples(
        latent,
        float(cache.stats.frequency[latent]),
        float(cache.stats.max_act[latent]),
        tuple(grid.make(int(keys[i]), -1, acts) for i in train_ids),
        tuple(grid.make(int(keys[i]), q, acts) for i, q in test_ids),
        tuple(grid.make(int(k), -1, acts) for k in neg[: cfg.n_non_activating]),
        tuple(grid.make(int(k), -1, acts) for k in neg[cfg.n_non_activating :]),
    )


def _quantile_draw(
    ids: np.ndarray, maxes: np.ndarray, n: int, n_quantiles: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Draw `n` example ids spread over `n_quantiles` activation quantiles; returns (id, quantile) pairs."""
    ranked = ids[np.argsort(maxes[ids], kind="stable")]  # ascending activation
    bins = np.array_split(ranked, n_quantiles)
    per_bin = np.array_split(np.arange(n), n_quantiles)
    picks: list[tuple[int, int]] = []
    for q, (b, want) in enumerate(zip(bins, per_bin)):
        k = min(len(want), len(b))
        picks += [(int(i), q) for i in rng.choice(b, size=k, replace=False)]
    return picks


def _dense_acts(cache: LatentCache, latent: int) -> dict[tuple[int, int], float]:
    tok_idx, values = cache.latent(latent)
    return {
        (int(w), int(p)): float(v) for w, p, v in zip(cache.window_N[tok_idx], cache.pos_N[tok_idx], values)
    }
