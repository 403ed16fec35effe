"""Scorers: each explanation used as a binary classifier of its latent's held-out examples, one module each.

- `detection`: the judge LLM answers whether an example matches the explanation.
- `fuzzing` (Delphi): whether an example's marked tokens are what the explanation describes.
- `embedding`: MiniLM similarity of explanation and example, with a threshold that never sees the test labels.
- `simulation` (Bills et al. 2023): the LLM predicts every token's activation; correlation with the true ones.

`SCORERS` maps each name that `--score.scorers` takes to its factory and whether it needs the judge LLM. A new
scorer is a module here (a class with a `name` and `async score(le, explanation) -> ScorerOutput`, and a factory
taking the ScoreConfig, the LLM client or None, the SampleSet and the seed) plus its `register_scorer` line below;
code outside the package registers its own the same way, before the CLI runs or `run_score` is called. The CLI
and `make_scorers` check configured names against the registry. See README.md, "A new scorer".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from saelab.autointerp.llm.base import LLMClient
from saelab.autointerp.scorers.base import Scorer, ScorerFactory, require_llm
from saelab.autointerp.scorers.detection import DetectionScorer
from saelab.autointerp.scorers.embedding import EmbeddingScorer
from saelab.autointerp.scorers.fuzzing import FuzzingScorer
from saelab.autointerp.scorers.simulation import SimulationScorer
from saelab.config import ConfigError, ScoreConfig
from saelab.latents.sampling import SampleSet


@dataclass(frozen=True)
class ScorerEntry:
    """One registered scorer."""

    make: ScorerFactory
    """Builds the scorer: (ScoreConfig, LLM client or None, SampleSet, seed) -> Scorer."""
    needs_llm: bool
    """The score stage connects to the judge LLM only when a configured scorer needs it; building this scorer
    without one is an error."""


SCORERS: dict[str, ScorerEntry] = {}
"""Scorers by the name `--score.scorers` takes, in registration order."""


def register_scorer(name: str, make: ScorerFactory, *, needs_llm: bool) -> None:
    """Make `name` a scorer the config accepts. Registering the same factory again is a no-op; another factory
    under a registered name is an error."""
    entry = ScorerEntry(make, needs_llm)
    if SCORERS.get(name, entry) != entry:
        raise ValueError(f"a scorer named {name!r} is already registered ({SCORERS[name].make!r})")
    SCORERS[name] = entry


register_scorer("detection", DetectionScorer.from_config, needs_llm=True)
register_scorer("fuzzing", FuzzingScorer.from_config, needs_llm=True)
register_scorer("embedding", EmbeddingScorer.from_config, needs_llm=False)
register_scorer("simulation", SimulationScorer.from_config, needs_llm=True)


def check_scorer_names(names: Iterable[str]) -> None:
    """A `ConfigError` naming the first unregistered name and the registered ones."""
    for name in names:
        if name not in SCORERS:
            raise ConfigError(f"score.scorers: no scorer named {name!r}; registered: {', '.join(SCORERS)}")


def llm_scorers() -> tuple[str, ...]:
    """Names of the registered scorers that need the judge LLM."""
    return tuple(name for name, entry in SCORERS.items() if entry.needs_llm)


def make_scorers(cfg: ScoreConfig, client: LLMClient | None, samples: SampleSet, seed: int) -> list[Scorer]:
    """The configured scorers, in the config's order."""
    check_scorer_names(cfg.scorers)
    scorers: list[Scorer] = []
    for name in cfg.scorers:
        entry = SCORERS[name]
        if entry.needs_llm:
            require_llm(client, name)
        scorer = entry.make(cfg, client, samples, seed)
        if scorer.name != name:  # its rows would be filed under another scorer than the config names
            raise ValueError(f"the scorer registered as {name!r} calls itself {scorer.name!r}")
        scorers.append(scorer)
    return scorers
