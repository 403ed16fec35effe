"""A run folder under a hostile but realistic user: a manifest that is garbage or no JSON object is one line naming
it at every stage, and is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline import error_line

from saelab.cli import COMMANDS, main


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", list(COMMANDS))
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"stages": {"collect": ', "is not valid JSON"),
        ("[1, 2, 3]", "is not a saelab manifest (a JSON array"),
    ],
)
def test_a_broken_manifest_is_one_line_at_every_stage(
    stage: str, content: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(content)
    assert main([stage, "--run-dir", str(run)]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{run / 'manifest.json'} {problem}" in line and "restore it" in line
    assert (run / "manifest.json").read_text() == content  # left as it was
