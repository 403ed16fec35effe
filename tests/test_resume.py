"""Checkpoints and resume: a run stopped after a checkpoint and resumed ends bit-for-bit where the uninterrupted run
ends, without redoing the steps it had done; checkpoints are atomic, only the last is kept, and one from another
run is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support_run import SMALL as CLI_SMALL
from support_run import error_line
from support_train import StepCounter, Stopped, planted, same_state, train_stopped_then_resumed

from saelab.activations.sources import StoreSource
from saelab.activations.store import Activations
from saelab.cli import main
from saelab.config import MatryoshkaConfig, ResampleConfig, TrainConfig
from saelab.sae import base as sae_lib
from saelab.sae.base import TrainLoss
from saelab.train.checkpoint import checkpoint_sae, latest_checkpoint, load_checkpoint
from saelab.train.stage import SAE_DIR, STAGING, SAEFolder
from saelab.train.trainer import TrainError, TrainResult, train

SMALL = {"expansion": 4, "k": 3, "lr": 3e-3, "batch_size": 128, "epochs": 3, "dead_tokens": 1000}
# 2000 rows, batch 128: 15 steps per epoch, 45 in all.


def assert_same_run(a: TrainResult, b: TrainResult) -> None:
    assert same_state(a.sae, b.sae)
    assert (a.steps, a.final_loss, a.dead_fraction, a.resample_events) == (
        b.steps,
        b.final_loss,
        b.dead_fraction,
        b.resample_events,
    )


@pytest.mark.resume
@pytest.mark.parametrize(
    ("arch", "resample"),
    [("topk", "anthropic"), ("batchtopk", "consistency"), ("jumprelu", "none"), ("matryoshka", "none")],
)
def test_resume_after_a_crash_is_bit_for_bit(tmp_path: Path, arch: str, resample: str) -> None:
    x = planted(n=2000, d=16)
    resampling = ResampleConfig(method=resample, every=10, tokens=512, consistency_min_freq=1e-3)  # type: ignore[arg-type]
    cfg = TrainConfig(
        architecture=arch, checkpoint_every=7, resample=resampling, log_every=3,
        matryoshka=MatryoshkaConfig((0.25, 1.0)), **SMALL,  # type: ignore[arg-type]
    )  # fmt: skip

    def kill_block(step: int, sae: sae_lib.SAE, loss: TrainLoss) -> None:  # dead latents for AuxK, resampling
        if step == 1:
            with torch.no_grad():
                sae.b_enc_F[:16] = -50.0

    full = train(x, cfg, seed=0, log_path=tmp_path / "full.jsonl", step_hook=kill_block)
    with pytest.raises(Stopped):
        train(x, cfg, seed=0, checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "r.jsonl",
              step_hook=StepCounter(20, also=kill_block))  # fmt: skip
    counter = StepCounter(also=kill_block)
    resumed = train(
        x, dataclasses.replace(cfg, resume=True), seed=0, checkpoint_dir=tmp_path / "ckpt",
        log_path=tmp_path / "r.jsonl", step_hook=counter,
    )  # fmt: skip
    assert_same_run(full, resumed)
    assert resumed.resumed_from == 14  # the last checkpoint before the stop after step 20
    assert counter.steps == list(range(15, 46))  # only the steps after the checkpoint ran again
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    if resample != "none":
        assert sum(e.resampled for e in full.resample_events) >= 16  # the forced-dead block, at least


@pytest.mark.resume
@pytest.mark.parametrize("stop_at", [15, 30])
def test_resume_at_an_epoch_boundary(tmp_path: Path, stop_at: int) -> None:
    """A checkpoint on the last step of an epoch resumes into the next epoch's order."""
    x = planted(n=2000, d=16)
    cfg = TrainConfig(checkpoint_every=15, **SMALL)  # type: ignore[arg-type]
    resumed, counter = train_stopped_then_resumed(x, cfg, stop_at, tmp_path / "ckpt")
    assert_same_run(train(x, cfg, seed=0), resumed)
    assert resumed.resumed_from == stop_at and counter.steps == list(range(stop_at + 1, 46))


@pytest.mark.resume
@pytest.mark.parametrize("stop_at", [9, 13, 26])
def test_resume_streaming_from_a_store(tmp_path: Path, stop_at: int) -> None:
    """From an on-disk store through a small shuffle buffer: resuming inside a buffer group (whose carried-over
    rows must be read again), at a group's start, and in a later epoch."""
    x = planted(n=2000, d=16)
    store = Activations(
        x, torch.zeros(2000, dtype=torch.int32), torch.zeros(2000, dtype=torch.int32)
    ).to_store(tmp_path / "store", shard_rows=150)
    cfg = TrainConfig(checkpoint_every=1, stream_buffer_rows=500, **SMALL)  # type: ignore[arg-type]
    full = train(store, cfg, seed=0)
    resumed, counter = train_stopped_then_resumed(store, cfg, stop_at, tmp_path / "ckpt")
    assert_same_run(full, resumed)
    assert counter.steps[0] == stop_at + 1


@pytest.mark.fault
def test_only_the_last_checkpoint_is_kept_and_unfinished_ones_are_ignored(tmp_path: Path) -> None:
    x = planted(n=2000, d=16)
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(checkpoint_every=10, **SMALL)  # type: ignore[arg-type]
    train(x, cfg, seed=0, checkpoint_dir=ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000040"]
    meta = json.loads((ckpt / "step-00000040" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["fingerprint"]["config"]["k"] == 3
    # what a kill during a write leaves: a temporary folder, or a folder without its meta.json
    (ckpt / ".step-00000050.tmp").mkdir()
    (ckpt / "step-00000060").mkdir()
    (ckpt / "step-00000060" / "trainer.pt").write_bytes(b"half a file")
    assert latest_checkpoint(ckpt) == ckpt / "step-00000040"
    state = load_checkpoint(ckpt / "step-00000040")
    assert state["step"] == 40 and set(state) >= {
        "optimizer",
        "since_fired_F",
        "epoch_gen_state",
        "torch_rng_state",
    }


@pytest.mark.bad_input
def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    x = planted(n=2000, d=16)
    cfg = TrainConfig(checkpoint_every=10, **SMALL)  # type: ignore[arg-type]
    train(x, cfg, seed=0, checkpoint_dir=tmp_path)
    other = dataclasses.replace(cfg, lr=1e-3, resume=True)
    with pytest.raises(TrainError, match=r"lr=0.003 \(now 0.001\)"):
        train(x, other, seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(TrainError, match="n_rows=2000 \\(now 1900\\)"):
        train(x[:1900], dataclasses.replace(cfg, resume=True), seed=0, checkpoint_dir=tmp_path)
    # settings that do not change the computation may differ
    quiet = dataclasses.replace(cfg, resume=True, log_every=7, checkpoint_every=3)
    assert train(x, quiet, seed=0, checkpoint_dir=tmp_path).resumed_from == 40


def test_resume_without_a_checkpoint_starts_afresh_and_a_fresh_run_clears_old_ones(tmp_path: Path) -> None:
    x = planted(n=2000, d=16)
    cfg = TrainConfig(checkpoint_every=10, **SMALL)  # type: ignore[arg-type]
    counter = StepCounter()
    fresh = train(
        x, dataclasses.replace(cfg, resume=True), seed=0, checkpoint_dir=tmp_path / "none", step_hook=counter
    )
    assert fresh.resumed_from == 0 and len(counter.steps) == 45
    assert_same_run(fresh, train(x, cfg, seed=0))
    ckpt = tmp_path / "ckpt"
    train(x, dataclasses.replace(cfg, epochs=9), seed=0, checkpoint_dir=ckpt)  # a longer, other run: step-130
    with pytest.raises(Stopped):
        train(x, cfg, seed=0, checkpoint_dir=ckpt, step_hook=StepCounter(12))
    assert latest_checkpoint(ckpt) == ckpt / "step-00000010"  # the other run's step-130 is gone


@pytest.mark.resume
def test_resuming_a_finished_run_recomputes_nothing(tmp_path: Path) -> None:
    x = planted(n=2000, d=16)
    cfg = TrainConfig(checkpoint_every=15, **SMALL)  # type: ignore[arg-type]
    done = train(x, cfg, seed=0, checkpoint_dir=tmp_path)
    counter = StepCounter()
    again = train(
        x, dataclasses.replace(cfg, resume=True), seed=0, checkpoint_dir=tmp_path, step_hook=counter
    )
    assert counter.steps == [] and again.resumed_from == 45
    assert_same_run(done, again)


def test_checkpoint_sae_is_folded_for_raw_inputs(tmp_path: Path) -> None:
    """A checkpoint's SAE, folded, on raw activations equals the SAE as trained on scaled ones (at a checkpoint
    that is not the last step)."""
    x = planted(n=2000, d=16)
    cfg = TrainConfig(architecture="batchtopk", checkpoint_every=20, **SMALL)  # type: ignore[arg-type]
    train(x, cfg, seed=0, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "step-00000040")
    trained = sae_lib.build(sae_lib.SAEConfig.from_json(state["sae_config"]))
    trained.load_state_dict(state["sae"])
    folded, scale = checkpoint_sae(tmp_path / "step-00000040"), state["scale"]
    raw = x[:256]
    torch.testing.assert_close(
        folded(raw).x_hat_BD * scale, trained(raw * scale).x_hat_BD, rtol=1e-4, atol=1e-3
    )
    assert not folded.training


@pytest.mark.bad_input
def test_store_source_checkpoint_refuses_another_buffer(tmp_path: Path) -> None:
    x = planted(n=2000, d=16)
    store = Activations(
        x, torch.zeros(2000, dtype=torch.int32), torch.zeros(2000, dtype=torch.int32)
    ).to_store(tmp_path / "store", shard_rows=200)
    cfg = TrainConfig(checkpoint_every=10, stream_buffer_rows=600, **SMALL)  # type: ignore[arg-type]
    train(store, cfg, seed=0, checkpoint_dir=tmp_path / "ckpt")
    other = dataclasses.replace(cfg, resume=True, stream_buffer_rows=800)
    with pytest.raises(TrainError, match="stream_buffer_rows=600"):
        train(StoreSource(store, 800), other, seed=0, checkpoint_dir=tmp_path / "ckpt")


# --- a real kill -------------------------------------------------------------------------------------------------

TRAIN_ARGS = [
    "--train.expansion", "4", "--train.k", "4", "--train.batch-size", "32", "--train.epochs", "60",
    "--train.checkpoint-every", "25", "--train.log-every", "5", "--train.resample.method", "anthropic",
    "--train.resample.every", "100", "--train.dead-tokens", "2000",
]  # fmt: skip


def cli_train(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`saelab train` in a subprocess; its output goes to `run_dir`/stderr.txt (a pipe nobody reads would fill)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "saelab.cli", "train", "--run-dir", str(run_dir), *TRAIN_ARGS, *extra]
    with (run_dir / "stderr.txt").open("w") as err:
        return subprocess.Popen(cmd, env=env, stdout=err, stderr=err)


def wait_for_checkpoint(
    folder: Path, at_least: int, proc: subprocess.Popen[bytes], timeout: float = 120
) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        last = latest_checkpoint(folder)
        if last is not None and int(last.name.split("-")[1]) >= at_least:
            return int(last.name.split("-")[1])
        assert proc.poll() is None, "training finished before it could be killed; make it longer"
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.fault
@pytest.mark.slow
def test_sigkill_during_cli_training_then_resume(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """`saelab train` killed with SIGKILL, then `saelab train --train.resume`: the same SAE file and the same
    training log as a run never interrupted."""
    base = tmp_path / "base"
    collect = ["collect", "--run-dir", str(base), "--model.name", str(tiny_model_dir)]
    collect += [
        "--data.dataset",
        str(corpus_file),
        "--data.ctx-len",
        "32",
        "--collect.n-train-tokens",
        "1500",
    ]
    assert main(collect) == 0
    full, killed = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(base, full)
    shutil.copytree(base, killed)
    assert cli_train(full).wait(timeout=300) == 0, (full / "stderr.txt").read_text()
    proc = cli_train(killed)
    reached = wait_for_checkpoint(
        SAEFolder(killed / "sae").checkpoints, 300, proc
    )  # of the training under way
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "sae" / "sae.safetensors").exists()
    assert cli_train(killed, "--train.resume").wait(timeout=300) == 0, (killed / "stderr.txt").read_text()
    err = (killed / "stderr.txt").read_text()
    resumed_from = int(err.split("resuming from ")[1].split("(step ")[1].split(" ")[0])
    assert resumed_from >= reached and resumed_from % 25 == 0
    total = json.loads((full / "manifest.json").read_text())["stages"]["train"]["steps"]
    assert resumed_from < total
    print(f"killed after checkpoint {reached}, resumed from {resumed_from} of {total} steps")
    for rel in ("sae/sae.safetensors", "sae/train_log.jsonl"):
        assert (killed / rel).read_bytes() == (full / rel).read_bytes(), rel


# --- a failed training leaves the previous one ------------------------------------------------------------------

CLI_TRAIN = [*CLI_SMALL["train"], "--train.checkpoint-every", "10"]  # 44 steps: checkpoints at 10, 20, 30, 40


def saelab_train(run: Path, *args: str) -> tuple[int, str]:
    """`saelab train --run-dir RUN ...` in a subprocess: (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "saelab.cli", "train", "--run-dir", str(run), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def sae_files(run: Path) -> dict[str, bytes]:
    """Every file of the run's SAE folder but the training in progress's: the SAE, its log and checkpoints."""
    folder = run / SAE_DIR
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and STAGING not in p.relative_to(folder).parts
    }


@pytest.fixture
def collected(tmp_path: Path, tiny_model_dir: Path, corpus_file: Path) -> Path:
    run = tmp_path / "run"
    args = ["collect", "--run-dir", str(run), "--model.name", str(tiny_model_dir)]
    assert main([*args, "--data.dataset", str(corpus_file), *CLI_SMALL["collect"]]) == 0
    return run


@pytest.mark.fault
def test_a_diverged_train_leaves_the_previous_sae_log_and_checkpoints(collected: Path) -> None:
    """`saelab train --train.lr 1e30` stops with the one-line divergence error, and the SAE, its 5-line log and
    its last checkpoint are byte for byte those of the training before; `--train.resume` afterwards continues
    that training's last checkpoint and ends with the same SAE and log."""
    run = collected
    code, err = saelab_train(run, *CLI_TRAIN)
    assert code == 0, err
    before = sae_files(run)
    record = json.loads((run / "manifest.json").read_text())["stages"]["train"]
    assert not (run / SAE_DIR / STAGING).exists()  # moved into place
    assert (
        len(before["train_log.jsonl"].splitlines()) == 5 and "checkpoints/step-00000040/trainer.pt" in before
    )

    code, err = saelab_train(run, *CLI_TRAIN, "--train.lr", "1e30")
    assert code == 1
    assert re.fullmatch(
        r"saelab: TrainError: training diverged at step \d+ \(loss \S+\); lower train.lr", error_line(err)
    )
    assert sae_files(run) == before
    assert json.loads((run / "manifest.json").read_text())["stages"]["train"] == record

    code, err = saelab_train(run, *CLI_TRAIN, "--train.resume")
    assert code == 0, err
    assert "step 40 of 44" in err  # the finished training's last checkpoint, not the diverged one's none
    assert sae_files(run) == before


@pytest.mark.bad_input
def test_an_sae_too_large_for_memory_is_refused_before_it_is_built(
    collected: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--train.expansion 1000000000` on 32 dimensions: 2.1e12 parameters, 45 TiB with gradients, Adam's moments
    and a batch of latents. One line with the estimate, the memory available and the flag; the trained SAE stays
    as it was."""
    assert main(["train", "--run-dir", str(collected), *CLI_TRAIN]) == 0
    before = sae_files(collected)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(collected), *CLI_TRAIN, "--train.expansion", "1000000000"]) == 1
    line = error_line(capsys.readouterr().err)
    assert re.fullmatch(
        r"saelab: TrainError: train.expansion 1000000000 needs at least [\d.]+ TiB on cpu to train: weights, "
        r"gradients and two Adam moments of 2.08e\+12 parameters and a batch's \[128, 32000000000\] latents, "
        r"but [\d.]+ [KMGT]iB is available \(MemAvailable in /proc/meminfo\); lower --train.expansion "
        r"\(or --train.batch-size\)",
        line,
    ), line
    assert sae_files(collected) == before
