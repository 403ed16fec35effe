"""A judge model that says "Yes" to everything, served over HTTP on loopback: the score stage finishes, the
scores show it (recall 1, specificity 0, balanced accuracy 0.5, no better than the shuffled-explanation control)
and the report flags the scorer as answering one class, instead of reporting a high recall as a success."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from llm_server import LocalOpenAIServer
from support_llm import RuleClient
from support_run import error_line, run_stages

from saelab.autointerp.llm.base import ChatResponse
from saelab.cli import main

pytestmark = pytest.mark.fault


def test_a_judge_that_says_yes_to_everything_is_reported_and_flagged(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    run = tmp_path / "run"
    run_stages(run, tiny_model_dir, corpus_file, until="explain")
    with LocalOpenAIServer(RuleClient(judge_text="Yes")) as server:  # type: ignore[arg-type]
        score = [
            "score",
            "--run-dir",
            str(run),
            "--llm.url",
            server.url,
            "--score.scorers",
            "detection",
            "fuzzing",
        ]
        assert main(score) == 0
    summary = json.loads((run / "score" / "scores_summary.json").read_text())
    overall = {(o["explainer"], o["scorer"]): o for o in summary["overall"]}
    for scorer in ("detection", "fuzzing"):
        o = overall[("token_stats", scorer)]
        assert o["n_failed"] == 0 and o["n_pos"] > 0 and o["n_neg"] > 0
        assert (o["recall"], o["specificity"], o["balanced_accuracy"]) == (1.0, 0.0, 0.5)
        control = overall[("shuffled", scorer)]
        assert control["balanced_accuracy"] == 0.5  # the explanations do no better than the wrong ones
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "answers positive for (almost) everything: recall 1.000, specificity 0.000" in report
    assert (
        "Failed judgements (excluded from the metrics, counted): 0 requests the LLM did not answer" in report
    )


class CoinJudge(RuleClient):
    """A judge that answers both classes: Yes for about half the texts (by a hash of the prompt), No otherwise."""

    async def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> ChatResponse:
        prompt = messages[-1]["content"]
        if "Description: " not in prompt:
            return await super().chat(messages, **kwargs)
        answer = "Yes" if hashlib.sha256(prompt.encode()).digest()[0] % 2 else "No"
        return ChatResponse(answer, 10, 1, 0.0, None, self.model_name)


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, corpus_file: Path) -> Path:
    run = tmp_path_factory.mktemp("judges") / "base"
    run_stages(run, tiny_model_dir, corpus_file, until="explain")
    return run


def _score_with(run: Path, folder: Path, judge: RuleClient) -> Path:
    """A copy of `run` scored by `judge` over HTTP on loopback (detection and fuzzing)."""
    shutil.copytree(run, folder)
    with LocalOpenAIServer(judge) as server:  # type: ignore[arg-type]
        args = ["score", "--run-dir", str(folder), "--llm.url", server.url, "--llm.no-cache"]
        assert main([*args, "--score.scorers", "detection", "fuzzing"]) == 0
    return folder


@pytest.mark.parametrize("answer", ["Yes", "No"])
def test_a_one_class_judge_is_neither_an_improvement_nor_a_decline(
    explained_run: Path, tmp_path: Path, answer: str
) -> None:
    """`saelab compare` of a run judged by a working judge against the same run judged by one that answers
    `answer` to everything: every delta of that judge's scorers reads "not comparable (...)", the reason stands in
    the same table row, and no success rate or per-latent count is offered as an improvement."""
    base = _score_with(explained_run, tmp_path / "good", CoinJudge())
    other = _score_with(explained_run, tmp_path / answer.lower(), RuleClient(judge_text=answer))
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(other), "--out", str(out), "--compare.n-boot", "200"]) == 0
    md = (out / "report.md").read_text()
    side = "positive" if answer == "Yes" else "negative"
    reason = f"{other.name} answers {side} for everything"
    for scorer in ("detection", "fuzzing"):
        part = section(md, f"## token_stats / {scorer}: {other.name} against {base.name}")
        rows = [line for line in part.splitlines() if line.startswith(("| f1 |", "| balanced_accuracy |"))]
        assert len(rows) == 2
        for row in rows:
            assert f"| not comparable ({reason}) | {reason} |" in row
        assert "improved" not in part and "declined" not in part
        assert "Verdict: not comparable" in part and "decided by balanced accuracy" in part
        assert "| success rate |" not in part
    record = json.loads((out / "compare.json").read_text())
    verdicts = {d["verdict"] for d in record["comparisons"][0]["deltas"] if d["explainer"] == "token_stats"}
    assert verdicts == {f"not comparable ({reason})"}


def section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0]


@pytest.mark.bad_input
def test_a_local_model_without_a_chat_template_is_one_line(
    explained_run: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base model (its tokenizer has no chat template) given as the local explainer: one line naming the model,
    saying it has no chat template and how to give one, and no explanation written."""
    run = tmp_path / "run"
    shutil.copytree(explained_run, run)
    before = (run / "explain" / "explanations.jsonl").read_bytes()
    args = ["explain", "--run-dir", str(run), "--explain.explainers", "default", "--llm.local-model"]
    capsys.readouterr()
    assert main([*args, str(tiny_model_dir)]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"local model {tiny_model_dir} has no chat template" in line
    assert "chat_template" in line and "--llm.url" in line
    assert (run / "explain" / "explanations.jsonl").read_bytes() == before
