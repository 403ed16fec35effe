"""SAEs compared at matched sparsity: which are dominated (another SAE has an L0 no higher and a score no lower).

`saelab eval --eval.extra-saes A B` evaluates the run's SAE, its `train.variants` and the named SAEs on the same
held-out tokens and writes `eval/matched_l0.json`; the run report and the run comparison draw the Pareto plots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saelab.run import atomic
from saelab.run.records import load_json

MATCHED_L0 = "eval/matched_l0.json"
"""The comparison of several SAEs on the same tokens, relative to the run folder."""

DOMINANCE = (
    ("explained_variance", "dominated_ev", 1),
    ("ce_loss_score", "dominated_ce", 1),
    ("mean_absorption_fraction_score", "dominated_absorption", -1),
)
"""(metric, flag, +1 if higher is better else -1) for the matched-sparsity comparison."""


def mark_dominated(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `dominated_ev` / `dominated_ce` (and `dominated_absorption` where absorption was measured) to SAE
    records with an `l0`: another SAE with that metric has an L0 no higher and a score no worse, one of them
    strictly. Absorption is better lower; a metric an SAE lacks (or has as None) gets no flag. Entries that
    name what they reconstruct (`reconstructs`: SAEs and transcoders, `saelab.eval.transcoder`) are compared
    only with entries reconstructing the same hookpoint."""
    out = []
    for e in entries:
        flags = {}
        for metric, key, sign in DOMINANCE:
            if e.get(metric) is None:
                continue
            flags[key] = any(
                o is not e
                and o.get("reconstructs") == e.get("reconstructs")
                and o.get(metric) is not None
                and o["l0"] <= e["l0"]
                and sign * o[metric] >= sign * e[metric]
                and (o["l0"] < e["l0"] or sign * o[metric] > sign * e[metric])
                for o in entries
            )
        out.append({**e, **flags})
    return out


@dataclass(frozen=True)
class MatchedL0:
    """Several SAEs evaluated on the same tokens, each marked dominated or not (`mark_dominated`)."""

    saes: list[dict[str, Any]]
    """Per SAE: name, architecture, d_sae, sae_sha256, the eval summary and the `dominated_*` flags."""
    model_sha256: str | None = None
    hookpoint: str | None = None
    data_sha256: str | None = None

    def save_run(self, run_folder: Path) -> str:
        atomic.write_json(run_folder / MATCHED_L0, asdict(self))
        return MATCHED_L0

    @classmethod
    def load_run(cls, run_folder: Path) -> MatchedL0 | None:
        """The run's comparison, or None when eval compared no SAEs."""
        path = run_folder / MATCHED_L0
        return load_json(path, cls) if path.exists() else None
