"""What each saelab command takes: its config sections (`saelab.config`) and its own few flags, one frozen
dataclass per command; `saelab.cli` generates the command line from `COMMANDS` (the run's stages) and `TOOLS`
(the commands outside the pipeline) with tyro, so every flag's help is the docstring under its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import tyro

from saelab.config import (
    CacheConfig,
    CollectConfig,
    CompareConfig,
    DataConfig,
    EvalConfig,
    ExplainConfig,
    LLMConfig,
    ModelConfig,
    ReportConfig,
    RunConfig,
    SampleConfig,
    ScoreConfig,
    ServeConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class _RunArgs:
    """What every stage takes: the run folder."""

    run_dir: str = "runs/demo"
    """Folder holding the run's manifest and artifacts."""
    force: bool = False
    """Run the stage even though later stages of the run were made from the artifacts it replaces: they are
    dropped from the manifest when it finishes (unless it wrote the very same files), to be run again. Without it
    such a rerun is refused before any work."""


@dataclass(frozen=True)
class DemoArgs(RunConfig):
    """Run the whole loop (collect, train, eval, cache, sample, explain, score) and write the report."""

    force: bool = False
    """Run the loop again in a run folder that holds a finished run (its stages are replaced one by one). Without
    it, `demo` over a run whose stages were made from its activations is refused before any work."""


@dataclass(frozen=True)
class CollectArgs(_RunArgs):
    """Load the model, cut the corpus into windows, collect activations at the hookpoint (starts a run)."""

    seed: int = 0
    """Seed for data splits, initialisation and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)


@dataclass(frozen=True)
class TrainArgs(_RunArgs):
    """Train the SAE on the run's collected activations; with `--collect.format stream` in a folder that holds no
    run, start a streamed run: the model runs over the corpus and the SAE trains on its activations as they come
    (nothing stored)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    """A new streamed run only: seed for data splits, initialisation and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """A new streamed run only (a collected run trains on the model it was collected with)."""
    data: DataConfig = field(default_factory=DataConfig)
    """A new streamed run only (a collected run trains on its own data)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """A new streamed run only (`--collect.format stream`): hookpoint(s), tokens per epoch, windows per forward."""


@dataclass(frozen=True)
class EvalArgs(_RunArgs):
    """Evaluate the run's SAE on held-out windows (MSE, EV, cosine, L0, dead/dense, CE and KL scores)."""

    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class CacheArgs(_RunArgs):
    """Cache the SAE's sparse latent activations and per-latent statistics."""

    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass(frozen=True)
class SampleArgs(_RunArgs):
    """Build per-latent example sets for explaining and scoring."""

    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class ExplainArgs(_RunArgs):
    """Explain the sampled latents with an LLM and the token-statistics baseline."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)


@dataclass(frozen=True)
class ScoreArgs(_RunArgs):
    """Score the explanations as classifiers (detection, fuzzing, embedding)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)


@dataclass(frozen=True)
class ReportArgs(_RunArgs):
    """Write report.md and report.html for the run, or with --predictions a classification report for any
    classifier's predictions (CSV: id, y_true, y_pred, optional probability, score, task, model)."""

    predictions: Optional[str] = None
    """A predictions CSV to report on instead of a run folder."""
    out: Optional[str] = None
    """Folder for the --predictions report; by default FILE-report beside the CSV."""
    report: ReportConfig = field(default_factory=ReportConfig)


CheckpointFormat = Literal["saelab", "saelens", "sparsify", "dictionary_learning", "circuit_tracer"]
"""saelab.sae.formats.FORMATS, named here so that `--help` does not import torch."""


@dataclass(frozen=True)
class ConvertArgs:
    """Convert an SAE checkpoint between saelab, SAELens, sparsify and dictionary_learning folders."""

    src: str
    """Folder holding the SAE."""
    dst: str
    """Folder to write (created; it must not hold another format's checkpoint)."""
    to: CheckpointFormat
    """Format to write."""
    from_: Annotated[Optional[CheckpointFormat], tyro.conf.arg(name="from")] = None
    """Format of --src; by default found from its files."""


COMMANDS: dict[str, Any] = {
    "demo": DemoArgs,
    "collect": CollectArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
    "cache": CacheArgs,
    "sample": SampleArgs,
    "explain": ExplainArgs,
    "score": ScoreArgs,
    "report": ReportArgs,
}


@dataclass(frozen=True)
class CompareArgs:
    """Compare runs before/after: score deltas with paired bootstrap CIs, success rates, changed parameters."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders; the first is the baseline."""
    out: Optional[str] = None
    """Folder for the comparison report; by default compare-A-vs-B beside the last run."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass(frozen=True)
class RunsArgs:
    """List and filter the runs under a folder, or query them with SQL (DuckDB over the runs' records).

    Tables: runs (one row per run; config.train.lr etc. as STRUCT fields), stages, overall, scores."""

    root: str = "runs"
    """Folder searched (recursively) for run folders."""
    where: Optional[str] = None
    """SQL condition on the runs table, e.g. "architecture = 'topk' AND ev > 0.5"."""
    sql: Optional[str] = None
    """A whole SQL query over the tables runs, stages, overall and scores (replaces the listing)."""
    format: Literal["table", "csv", "json"] = "table"
    """Output format."""


@dataclass(frozen=True)
class ServeArgs:
    """Browse the runs' latents in a local web app: a sortable, searchable latent list, latent pages (examples,
    scores and each scorer's judgements, histogram, nearest latents), the run reports, two runs side by side."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders to serve."""
    serve: tyro.conf.OmitArgPrefixes[ServeConfig] = field(default_factory=ServeConfig)
    """Where the server listens (flags without a `serve.` prefix: --host, --port)."""


TOOLS: dict[str, Any] = {"convert": ConvertArgs, "compare": CompareArgs, "runs": RunsArgs, "serve": ServeArgs}
"""Commands outside the run pipeline (no run folder)."""
