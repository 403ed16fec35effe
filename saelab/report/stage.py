"""The report stage: `report.md`, `report.html` and `plots/` of one run (`saelab.report.run_report`).

It reads every stage the run has recorded, so it verifies all their artifacts first (those of the stages that
state the provenance it prints, collect and train, included). The report is derived: remade from the manifest in
seconds, it never stops another stage from running again, and is dropped from the manifest when one does.
"""

from __future__ import annotations

from pathlib import Path

from saelab.config import to_dict
from saelab.run.session import Session


def stage_report(s: Session) -> Path:
    """Write the run's report; returns the Markdown file's path."""
    from saelab.report.run_report import write_report

    reads = tuple(name for name in s.run.stages if name != "report")
    s.start("report", reads)
    with s.run.stage("report", {"report": to_dict(s.cfg.report)}, reads, derived=True) as rec:
        paths = write_report(s.run, s.cfg.report)
        rec["outputs"] += [str(p.relative_to(s.folder)) for p in paths]
    return paths[0]
