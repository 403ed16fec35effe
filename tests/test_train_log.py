"""Training logs: complete records every `log_every` steps in the JSONL file and on the progress bar, TensorBoard
and W&B when installed and asked for, and a clear error when asked for but not installed.

TensorBoard and W&B are not saelab dependencies; their tests run where they are installed (e.g.
`pip install --target /tmp/tb tensorboard` and `PYTHONPATH=/tmp/tb pytest tests/test_train_log.py`)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from support_train import planted

from saelab.config import ConfigError, ResampleConfig, TrainConfig
from saelab.train.log import LogSinkError
from saelab.train.trainer import train

FIELDS = {"step", "tokens", "loss", "mse", "auxk", "sparsity", "l0", "ev", "dead_fraction", "lr"}
CFG = TrainConfig(expansion=2, k=3, batch_size=100, epochs=2, log_every=4)  # 2000 rows: 40 steps


def test_records_are_complete_every_log_every_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train(planted(n=2000, d=16), CFG, seed=0, log_path=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 40, 4))
    # the bfloat16 choice of entries (where the CPU has it natively) says how many rows its step rechecked
    fields = FIELDS | ({"selection_rows_rechecked"} if result.selection == "bfloat16" else set())
    for r in rows:
        assert set(r) == fields
        assert r["tokens"] == (r["step"] + 1) * 100 and 0 <= r["dead_fraction"] <= 1 and r["l0"] == 3
        assert r["loss"] == pytest.approx(r["mse"] + CFG.auxk_coef * r["auxk"] + r["sparsity"], rel=1e-5)
    assert rows[-1]["ev"] > rows[0]["ev"]
    bar = capsys.readouterr().err
    assert all(f"{key}=" in bar for key in ("loss", "ev", "l0", "dead"))


def test_log_sinks_are_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a),
    )
    for sink in ("tensorboard", "wandb"):
        cfg = TrainConfig(**{**CFG.__dict__, "log_to": ("jsonl", sink)})
        with pytest.raises(LogSinkError, match=f"the {sink} package is not installed; `pip install {sink}`"):
            train(planted(n=600, d=8), cfg, seed=0, log_path=tmp_path / "log.jsonl")
    assert not (tmp_path / "log.jsonl").exists()  # refused before training started
    with pytest.raises(ConfigError, match="names a sink twice"):
        TrainConfig(log_to=("jsonl", "jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_gets_the_same_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        **{**CFG.__dict__, "log_to": ("jsonl", "tensorboard"), "resample": ResampleConfig(method="anthropic")}
    )
    train(planted(n=2000, d=16), cfg, seed=0, log_path=tmp_path / "log.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if "event" not in r]
    assert {f"train/{k}" for k in FIELDS - {"step"}} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/ev")] == [
        (r["step"], pytest.approx(r["ev"], rel=1e-6)) for r in metrics
    ]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrainConfig(**{**CFG.__dict__, "log_to": ("wandb",)})
    train(planted(n=2000, d=16), cfg, seed=0, log_path=tmp_path / "log.jsonl")
    assert not (tmp_path / "log.jsonl").exists()  # jsonl was not asked for
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # the offline run's record log
    end = time.monotonic() + 30  # wandb's service process may still be writing it
    while run_file.read_bytes().count(b"dead_fraction") < 10 and time.monotonic() < end:
        time.sleep(0.1)
    assert run_file.read_bytes().count(b"dead_fraction") >= 10  # a history row per log record (40 steps / 4)
