"""Shared helpers for the tests that drive saelab's stages through the CLI on the tiny model (imported by those
tests; not a pytest conftest; conftest's `finished` and `run` fixtures build on `run_stages`).

- `SMALL`: each stage's flags for a run of seconds (short windows, few tokens, a small SAE, 4 latents studied,
  the token-statistics explainer and the embedding scorer, so no LLM is needed).
- `run_stages`: the stages of SMALL in order through the CLI, up to a given one.
- `error_line`: the one error line saelab writes, checked to be the last thing it wrote.
"""

from __future__ import annotations

from pathlib import Path

from saelab.cli import main

SMALL = {
    "collect": ["--data.ctx-len", "32", "--collect.n-train-tokens", "1500", "--collect.batch-size", "8"],
    "train": ["--train.expansion", "4", "--train.k", "4", "--train.batch-size", "128", "--train.epochs", "4"],
    "eval": ["--eval.n-windows", "8", "--eval.n-ce-windows", "4", "--eval.batch-size", "4"],
    "cache": [],
    "sample": [
        "--sample.n-latents", "4", "--sample.example-ctx-len", "8", "--sample.min-examples", "8",
        "--sample.n-examples-train", "4", "--sample.n-examples-test", "4", "--sample.n-quantiles", "2",
        "--sample.n-non-activating", "4",
    ],
    "explain": ["--explain.explainers", "token_stats"],
    "score": ["--score.scorers", "embedding"],
}  # fmt: skip


def error_line(stderr: str) -> str:
    """The one error line saelab writes (progress bars of model loading may precede it)."""
    lines = [line for line in stderr.splitlines() if "saelab:" in line]
    assert len(lines) == 1, stderr
    assert stderr.rstrip().endswith(lines[0].split("saelab:", 1)[1]), "the error is the last thing written"
    return lines[0]


def run_stages(run_dir: Path, model: Path, corpus: Path, until: str = "score") -> None:
    """The stages of SMALL in order on the tiny model, through `until`."""
    for stage, extra in SMALL.items():
        args = [stage, "--run-dir", str(run_dir), *extra]
        if stage == "collect":
            args += ["--model.name", str(model), "--data.dataset", str(corpus)]
        assert main(args) == 0, stage
        if stage == until:
            return
