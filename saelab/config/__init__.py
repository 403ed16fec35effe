"""Configuration: one frozen dataclass per stage, the single source of the CLI's flags and help.

Every field has a docstring under it; `saelab <stage> --help` is generated from these (see `cli.py`).
`__post_init__` only validates: no I/O, no derived paths, no device queries.

The sections live one module per stage: `collect` (model, data, collect), `train` (with its architecture
sections, resampling and variants), `eval`, `latents` (cache, sample), `autointerp` (llm, explain, score) and
`report` (report, compare, serve); `base` holds ConfigError and the dict form. RunConfig (here) holds them all.
Import every name from this package (`from saelab.config import TrainConfig`). `commands` composes the sections
into what each saelab command takes (`saelab.cli` imports it; this package does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saelab.config.autointerp import ExplainConfig, LLMConfig, ScoreConfig
from saelab.config.base import ConfigError, from_dict, to_dict
from saelab.config.collect import CollectConfig, DataConfig, ModelConfig
from saelab.config.eval import EvalAbsorptionConfig, EvalConfig, EvalProbingConfig, EvalScrTppConfig
from saelab.config.latents import CacheConfig, SampleConfig
from saelab.config.report import TARGET_METRICS, CompareConfig, ReportConfig, ServeConfig
from saelab.config.train import JumpReLUConfig, MatryoshkaConfig, ResampleConfig, TrainConfig

__all__ = [
    "TARGET_METRICS",
    "CacheConfig",
    "CollectConfig",
    "CompareConfig",
    "ConfigError",
    "DataConfig",
    "EvalAbsorptionConfig",
    "EvalConfig",
    "EvalProbingConfig",
    "EvalScrTppConfig",
    "ExplainConfig",
    "JumpReLUConfig",
    "LLMConfig",
    "MatryoshkaConfig",
    "ModelConfig",
    "ReportConfig",
    "ResampleConfig",
    "RunConfig",
    "SampleConfig",
    "ScoreConfig",
    "ServeConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
]


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
