"""The reliability ledger: README's reliability table is written by the test suite, from the tests that ran.

Tests say what they prove with markers (each parametrized case counts once):

    @pytest.mark.fault        a fault injected: a run killed (SIGKILL or a crash), an LLM server refusing, timing
                              out, answering 429/5xx, truncated or non-JSON bodies
    @pytest.mark.bad_input    a bad input tried: it must be refused with a clear error (or counted as a skip)
    @pytest.mark.resume       a stopped run resumed; the test compares the result with an uninterrupted run's

A marked test that fails is counted against the suite: under `fault` or `resume` as a result lost, under
`bad_input` as a bad input not handled. After a session that ran every collected test of the whole suite (no
`-k`, `-m` or path selection) with `SAELAB_RELIABILITY_README=1` (`make test` sets it), the table between the
`reliability:start` / `reliability:end` comments of README.md is rewritten with the counts; any other session
only prints them in the terminal summary.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
KINDS = {
    "fault": "faults injected (runs killed, LLM server down, slow, erroring or answering garbage)",
    "bad_input": "bad inputs tried (each refused with a one-line error naming the fix, or counted as a skip)",
    "resume": "runs stopped and resumed (compared with an uninterrupted run)",
}
BLOCK = re.compile(r"(<!-- reliability:start -->\n).*?(<!-- reliability:end -->)", re.DOTALL)


@dataclass
class Ledger:
    passed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    whole_suite: bool = True

    @property
    def lost(self) -> int:
        return self.failed["fault"] + self.failed["resume"]

    def table(self) -> str:
        rows = [f"| {KINDS[k]} | {self.passed[k] + self.failed[k]} |" for k in KINDS]
        rows.append(f"| results lost (marked fault or resume tests that failed; must be 0) | {self.lost} |")
        rows.append(f"| bad inputs not handled cleanly (must be 0) | {self.failed['bad_input']} |")
        return "| | count |\n|---|---|\n" + "\n".join(rows) + "\n"


_LEDGER = Ledger()


def pytest_configure(config: pytest.Config) -> None:
    for kind, what in KINDS.items():
        config.addinivalue_line("markers", f"{kind}: reliability ledger, {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opts = config.option
    _LEDGER.whole_suite = (
        config.args_source is pytest.Config.ArgsSource.TESTPATHS
        and not getattr(opts, "keyword", "")
        and not getattr(opts, "markexpr", "")
        and not getattr(opts, "deselect", None)
        and not getattr(opts, "lf", False)
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    for kind in KINDS:
        if kind in report.keywords:
            if report.passed:
                _LEDGER.passed[kind] += 1
            elif report.failed:
                _LEDGER.failed[kind] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    if not any(_LEDGER.passed.values()) and not any(_LEDGER.failed.values()):
        return
    terminalreporter.write_sep("-", "reliability ledger")
    terminalreporter.write(_LEDGER.table())
    if os.environ.get("SAELAB_RELIABILITY_README") == "1":
        if not _LEDGER.whole_suite:
            terminalreporter.write("README not updated: only part of the suite ran\n")
        elif not BLOCK.search(README.read_text(encoding="utf-8")):
            terminalreporter.write("README not updated: it has no reliability:start/end block\n")
        else:
            text = BLOCK.sub(
                lambda m: m.group(1) + _LEDGER.table() + m.group(2), README.read_text(encoding="utf-8")
            )
            README.write_text(text, encoding="utf-8")
            terminalreporter.write(f"README reliability table updated ({README})\n")
