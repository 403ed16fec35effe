"""The report stage: `report.md`, `report.html` and `plots/` of one run (`saelab.report.run_report`)."""

from __future__ import annotations

from pathlib import Path

from saelab.config import to_dict
from saelab.run.session import Session


def stage_report(s: Session) -> Path:
    """Write the run's report; returns the Markdown file's path."""
    from saelab.report.run_report import write_report

    with s.run.stage("report", {"report": to_dict(s.cfg.report)}) as rec:
        paths = write_report(s.run, s.cfg.report)
        rec["outputs"] += [str(p.relative_to(s.folder)) for p in paths]
    return paths[0]
