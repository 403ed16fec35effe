"""`saelab report --predictions FILE.csv`: the classification report for any classifier, its flags and targets,
and its errors on bad CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from saelab.cli import main
from saelab.config import ConfigError, ReportConfig
from saelab.metrics import class_report
from saelab.report.flags import classifier_flags, target_gaps
from saelab.report.predictions import PredictionsError, read_predictions


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def two_models(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    good = np.where(rng.random(120) < 0.85, y, 1 - y)
    prob = np.clip(np.where(good == 1, 0.8, 0.2) + rng.normal(0, 0.1, 120), 0, 1)
    rows = [f"{i},{y[i]},{good[i]},{prob[i]:.4f},sentiment,good" for i in range(120)]
    rows += [f"{i},{y[i]},1,0.9,sentiment,always-yes" for i in range(120)]
    return write_csv(tmp_path / "preds.csv", "id,y_true,y_pred,probability,task,model", rows)


def test_binary_report_with_models_probabilities_and_targets(tmp_path: Path) -> None:
    csv = two_models(tmp_path)
    out = tmp_path / "rep"
    args = ["report", "--predictions", str(csv), "--out", str(out), "--report.targets", "f1=0.8,ece=0.05"]
    assert main(args) == 0
    md = (out / "report.md").read_text()
    record = json.loads((out / "classification.json").read_text())["tasks"]["sentiment"]
    # the numbers in the record are scikit-learn's
    y = [int(r.split(",")[1]) for r in csv.read_text().splitlines()[1:121]]
    pred = [int(r.split(",")[2]) for r in csv.read_text().splitlines()[1:121]]
    good = record["good"]
    assert good["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert good["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert good["ece"] is not None and good["auc"] is not None
    # ranked: good first, baseline present and marked, the always-yes model flagged as one-class
    ranking = md.split("## Task: sentiment")[1].split("##")[0]
    lines = [line for line in ranking.splitlines() if line.startswith("| ") and "rank" not in line]
    assert lines[0].startswith("| 1 | good |")
    assert any("majority-class baseline | baseline" in line for line in lines)
    flags = md.split("## Flags")[1]
    assert "one_class | sentiment / always-yes | answers positive" in flags
    assert "below_target | sentiment / always-yes | f1" in flags
    targets = md.split("## Targets")[1]
    assert "| sentiment / good | f1 |" in targets and "| sentiment / always-yes | ece |" in targets
    assert (out / "plots").is_dir() and len(list((out / "plots").glob("*_confusion.png"))) == 2
    assert list((out / "plots").glob("*_reliability.png"))
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


def test_multiclass_strings_and_unseen_label(tmp_path: Path) -> None:
    rows = [f"{i},{t},{p}" for i, (t, p) in enumerate([("cat", "cat"), ("dog", "cat"), ("eel", "fox")] * 4)]
    csv = write_csv(tmp_path / "m.csv", "id,y_true,y_pred", rows)
    assert main(["report", "--predictions", str(csv), "--report.pdf"]) == 0
    out = tmp_path / "m-report"
    rec = json.loads((out / "classification.json").read_text())["tasks"]["task"]["model"]
    assert rec["labels"] == ["cat", "dog", "eel", "fox"] and rec["unseen_predicted"] == ["fox"]
    y, p = ["cat", "dog", "eel"] * 4, ["cat", "cat", "fox"] * 4
    assert rec["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted", zero_division=0))
    md = (out / "report.md").read_text()
    assert "unseen_label | task / model | predicts label(s) never seen in y_true: fox" in md
    assert "few_examples | task | only 12 examples" in md
    assert list((out / "plots").glob("*.pdf"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("id,y_true,y_pred\n", "has a header but no rows"),
        ("id,y_true\n1,0\n", "lacks column(s) y_pred; found: id, y_true"),
        ("id,y_true,y_pred\n1,,0\n", "line 2: empty y_true"),
        (
            "id,y_true,y_pred,probability\n1,1,0,0.3\n2,0,0,1.7\n",
            "line 3: probability '1.7' is not a number in [0, 1]",
        ),
        ("id,y_true,y_pred,probability\n1,1,0,0.3\n2,0,0,\n", "line 3: empty probability"),
        ("id,y_true,y_pred\n1,1,0\n1,0,0\n", "id '1' appears twice"),
    ],
)
def test_bad_csv_is_one_clear_line(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(PredictionsError) as err:
        read_predictions(csv)
    assert message in str(err.value)
    assert main(["report", "--predictions", str(csv)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00",
            "is not UTF-8 text (is it a binary file?)",
        ),
        ("id,y_true,y_pred\n1,0,0\n".encode("utf-16"), "is not UTF-8 text"),  # with its byte order mark
        (
            "id,y_true,y_pred\n1,0,0\n".encode("utf-16-le"),
            "line 1: a NUL byte (a binary file, or UTF-16 text?)",
        ),
        (b"id,y_true,y_pred\n1,0,0\n2,1,\x001\n", "line 3: a NUL byte"),
    ],
)
def test_a_binary_predictions_file_is_one_line(
    content: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gzip file, UTF-16 text, a NUL in a row: one line naming the file (and the line, when it is known)."""
    from support_run import error_line

    path = tmp_path / "preds.csv"
    path.write_bytes(content)
    assert main(["report", "--predictions", str(path)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(path) in line and message in line
    assert not (tmp_path / "preds-report").exists()


def test_missing_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--predictions", str(tmp_path / "nope.csv")]) == 1
    assert "nope.csv not found" in capsys.readouterr().err


def test_targets_are_validated() -> None:
    assert ReportConfig(targets=("f1=0.5,recall=0.6", "ece=0.1")).target_values() == {
        "f1": 0.5,
        "recall": 0.6,
        "ece": 0.1,
    }
    with pytest.raises(ConfigError, match="unknown metric 'f2'"):
        ReportConfig(targets=("f2=0.5",))
    with pytest.raises(ConfigError, match="not METRIC=VALUE"):
        ReportConfig(targets=("f1",))
    with pytest.raises(ConfigError, match="'x' is not a number"):
        ReportConfig(targets=("f1=x",))


def test_flags_and_target_gaps() -> None:
    cfg = ReportConfig(max_majority_share=0.8, min_examples=30, one_class_tolerance=0.05)
    kinds = [f.kind for f in classifier_flags("s", 1.0, 0.0, {"1": 90, "0": 10}, cfg)]
    assert kinds == ["one_class", "imbalance"]
    assert classifier_flags("s", 0.7, 0.7, {"1": 20, "0": 20}, cfg) == []
    assert [f.kind for f in classifier_flags("s", 0.7, 0.7, {"1": 5, "0": 5}, cfg)] == ["few_examples"]
    # a single-class set cannot call its classifier one-class (specificity is undefined there)
    assert "one_class" not in [f.kind for f in classifier_flags("s", 1.0, 0.0, {"1": 40}, cfg)]
    gaps = {
        g.metric: g
        for g in target_gaps("s", {"f1": 0.4, "ece": 0.2, "auc": None}, {"f1": 0.5, "ece": 0.1, "auc": 0.7})
    }
    assert gaps["f1"].gap == pytest.approx(0.1) and gaps["f1"].reached_pct == pytest.approx(80.0)
    assert gaps["ece"].gap == pytest.approx(0.1) and gaps["ece"].reached_pct == pytest.approx(50.0)
    assert gaps["auc"].value is None and gaps["auc"].gap is None


label_sets = st.sampled_from([["0", "1"], ["0", "1", "2", "3"], ["cat", "dog", "eel"], ["yes", "no"]])


@settings(max_examples=60, deadline=None)
@given(
    label_sets.flatmap(
        lambda labs: st.lists(
            st.tuples(st.sampled_from(labs), st.sampled_from(labs)), min_size=1, max_size=40
        )
    )
)
def test_csv_round_trip_metrics_equal_sklearn(
    tmp_path_factory: pytest.TempPathFactory, pairs: list[tuple[str, str]]
) -> None:
    """Whatever labels a CSV holds, the report's numbers are scikit-learn's on the same predictions."""
    path = tmp_path_factory.mktemp("csv") / "p.csv"
    write_csv(path, "id,y_true,y_pred", [f"{i},{t},{p}" for i, (t, p) in enumerate(pairs)])
    (group,) = read_predictions(path)
    y_true = [int(t) if t.isdigit() else t for t, _ in pairs]
    y_pred = [int(p) if p.isdigit() else p for _, p in pairs]
    assert list(group.y_true) == y_true and list(group.y_pred) == y_pred
    r = class_report(group.y_true, group.y_pred)
    assert r.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert r.weighted_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert r.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_multiclass_model_that_answers_one_class_is_flagged(tmp_path: Path) -> None:
    rows = [f"{i},{t},b" for i, t in enumerate(["a", "b", "c"] * 20)]
    csv = write_csv(tmp_path / "one.csv", "id,y_true,y_pred", rows)
    assert main(["report", "--predictions", str(csv)]) == 0
    assert (
        "one_class | task / model | predicts b for every example"
        in (tmp_path / "one-report" / "report.md").read_text()
    )


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid,y_true,y_pred\n1,1,1\n2,0,1\n".encode())
    (group,) = read_predictions(path)
    assert group.y_true == (1, 0)


def test_imbalance_is_flagged_once_per_task(tmp_path: Path) -> None:
    truth = [1] * 45 + [0] * 5
    rows = [f"{i},{t},{t},m{k}" for k in (1, 2) for i, t in enumerate(truth)]
    csv = write_csv(tmp_path / "imb.csv", "id,y_true,y_pred,model", rows)
    assert main(["report", "--predictions", str(csv)]) == 0
    flags = (tmp_path / "imb-report" / "report.md").read_text().split("## Flags")[1]
    assert flags.count("imbalance |") == 1 and "imbalance | task | class 1 holds 90% of 50 examples" in flags
