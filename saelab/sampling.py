"""Example sets per latent: top examples for the explainer, quantile and non-activating examples for scoring.

Windows are cut into non-overlapping examples of `example_ctx_len` tokens. An example activates a latent when the
latent fires on any of its tokens; its activation is the max over tokens. For each studied latent:
- `train`: the `n_examples_train` highest-activating examples (shown to the explainer);
- `test_pos`: `n_examples_test` activating examples from the *remaining* ones, spread evenly over `n_quantiles`
  activation quantiles (so explanation and scoring examples are disjoint, unlike Delphi's shared pool);
- `test_neg`: `n_non_activating` random examples where the latent never fires.
Latents with fewer than `min_examples` activating examples are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saelab.config import SampleConfig
from saelab.latents import LatentCache


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


@dataclass
class SampleSet:
    """Example sets for the studied latents, the skipped latents with reasons, and the sampling config."""

    latents: list[LatentExamples]
    skipped: dict[int, str] = field(default_factory=dict)
    """Chosen latents that could not be sampled, with the reason."""
    n_ineligible: int = 0
    """Latents never chosen because they fire on fewer than `min_examples` cached tokens (dead ones included)."""
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        data = {
            "config": self.config,
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "n_ineligible": self.n_ineligible,
            "latents": [asdict(le) for le in self.latents],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `saelab sample` first")
        data = json.loads(path.read_text())

        def ex(d: dict[str, Any]) -> Example:
            return Example(
                tuple(d["tokens"]),
                tuple(d["token_strs"]),
                tuple(d["acts"]),
                d["window"],
                d["start"],
                d["quantile"],
            )

        latents = [
            LatentExamples(
                d["latent"],
                d["frequency"],
                d["max_act"],
                tuple(ex(e) for e in d["train"]),
                tuple(ex(e) for e in d["test_pos"]),
                tuple(ex(e) for e in d["test_neg"]),
            )
            for d in data["latents"]
        ]
        skipped = {int(k): v for k, v in data["skipped"].items()}
        return cls(latents, skipped, data["n_ineligible"], data["config"])


def choose_latents(freq_F: np.ndarray, n: int, min_freq: float) -> list[int]:
    """`n` latents spread evenly (in log-frequency rank) over the latents firing at least `min_freq`."""
    alive = np.flatnonzero(freq_F >= min_freq)
    if len(alive) == 0:
        return []
    order = alive[np.argsort(freq_F[alive], kind="stable")]
    picks = np.unique(np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int))
    return [int(order[i]) for i in picks]


def _examples_of(cache: LatentCache, latent: int, ctx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window, start, max activation) of every example on which `latent` fires."""
    tok_idx, values = cache.latent(latent)
    window = cache.window_N[tok_idx]
    start = (cache.pos_N[tok_idx] // ctx) * ctx
    key = window.astype(np.int64) * 1_000_000 + start
    uniq, inv = np.unique(key, return_inverse=True)
    maxes = np.zeros(len(uniq), dtype=np.float32)
    np.maximum.at(maxes, inv, values)
    return (uniq // 1_000_000).astype(np.int64), (uniq % 1_000_000).astype(np.int64), maxes


def sample(
    cache: LatentCache, tokens: np.ndarray, token_str: Callable[[int], str], cfg: SampleConfig, seed: int
) -> SampleSet:
    """Build the example sets (see module docstring). `token_str(id)` is token `id` decoded alone."""
    ctx = cfg.example_ctx_len
    rng = np.random.default_rng(seed)
    n_tokens = len(cache.window_N)
    freq = cache.stats.frequency
    min_freq = cfg.min_examples / max(1, n_tokens)
    chosen = choose_latents(freq, cfg.n_latents, min_freq)
    n_ineligible = int((freq < min_freq).sum())
    skipped: dict[int, str] = {}
    out: list[LatentExamples] = []
    windows_in_cache = np.unique(cache.window_N)
    ctx_len = tokens.shape[1]
    all_starts = np.arange(0, ctx_len - ctx + 1, ctx)
    for latent in chosen:
        win, start, maxes = _examples_of(cache, latent, ctx)
        if len(maxes) < cfg.min_examples:
            skipped[latent] = f"{len(maxes)} activating examples < min_examples {cfg.min_examples}"
            continue
        order = np.argsort(-maxes, kind="stable")
        train_ids = order[: cfg.n_examples_train]
        rest = order[cfg.n_examples_train :]
        test_ids = _quantile_draw(rest, maxes, cfg.n_examples_test, cfg.n_quantiles, rng)
        active = set(zip(win.tolist(), start.tolist()))
        neg = _non_activating(windows_in_cache, all_starts, active, cfg.n_non_activating, rng)
        if len(neg) < cfg.n_non_activating:
            skipped[latent] = f"only {len(neg)} non-activating examples (need {cfg.n_non_activating})"
            continue
        vals = _dense_acts(cache, latent)

        def make(w: int, s: int, q: int, vals: dict[tuple[int, int], float] = vals) -> Example:
            ids = tokens[w, s : s + ctx]
            acts = tuple(float(vals.get((w, s + i), 0.0)) for i in range(ctx))
            return Example(tuple(int(t) for t in ids), tuple(token_str(int(t)) for t in ids), acts, w, s, q)

        out.append(
            LatentExamples(
                latent,
                float(freq[latent]),
                float(cache.stats.max_act[latent]),
                tuple(make(int(win[i]), int(start[i]), -1) for i in train_ids),
                tuple(make(int(win[i]), int(start[i]), q) for i, q in test_ids),
                tuple(make(w, s, -1) for w, s in neg),
            )
        )
    return SampleSet(out, skipped, n_ineligible, asdict(cfg))


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


def _non_activating(
    windows: np.ndarray, starts: np.ndarray, active: set[tuple[int, int]], n: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    picks: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(n * 20):
        if len(picks) == n:
            break
        key = (int(rng.choice(windows)), int(rng.choice(starts)))
        if key not in active and key not in seen:
            seen.add(key)
            picks.append(key)
    return picks


def _dense_acts(cache: LatentCache, latent: int) -> dict[tuple[int, int], float]:
    tok_idx, values = cache.latent(latent)
    return {
        (int(w), int(p)): float(v) for w, p, v in zip(cache.window_N[tok_idx], cache.pos_N[tok_idx], values)
    }
