"""Every stage from the CLI on the previous stage's artifacts, on a tiny real model and a synthetic corpus."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from support_run import SMALL, error_line

from saelab.cli import COMMANDS, main


@pytest.fixture(scope="module")
def run_dir(finished: Path) -> Path:
    """The finished run (conftest's `finished`) that most tests of this module read."""
    return finished


def test_every_stage_recorded_with_hashes(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {*SMALL, "report"}
    for name, st in manifest["stages"].items():
        assert st["seconds"] >= 0, name
        for rel, digest in st["outputs"].items():
            assert (run_dir / rel).exists() and len(digest) == 64, rel
    assert set(manifest["hashes"]) == {"model", "data", "sae"}
    assert manifest["config"]["train"]["k"] == 4
    assert manifest["stages"]["collect"]["hookpoint"] == "model.layers.2"


def test_metrics_in_valid_ranges(run_dir: Path) -> None:
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert 0 < m["l0"] <= 4
    assert m["explained_variance"] <= 1 and m["cosine_similarity"] <= 1
    assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["dense_fraction"] <= 1
    assert m["ce_zero_ablation"] > 0 and m["ce_clean"] > 0
    summary = json.loads((run_dir / "score" / "scores_summary.json").read_text())
    for row in summary["overall"]:
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy"):
            assert 0 <= row[key] <= 1, key


def test_report_has_tables_and_a_plot(run_dir: Path) -> None:
    md = (run_dir / "report.md").read_text()
    assert "explained_variance" in md and "token_stats" in md and "plots/feature_density.png" in md
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert (run_dir / "plots" / "feature_density.png").stat().st_size > 1000
    # the shuffled control beside the explainer, compared per latent, and the frequency-weighted F1
    compared = md.split("## Explainers compared on the same latents")[1].split("##")[0]
    assert "| embedding | f1 | token_stats | shuffled |" in compared and "frequency-weighted F1" in md


def test_report_flags_and_target_gaps(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    args = ["report", "--run-dir", str(copy), "--report.targets", "balanced_accuracy=0.99,auc=0.5"]
    assert main([*args, "--report.min-examples", "100000"]) == 0
    md = (copy / "report.md").read_text()
    flags = md.split("## Flags")[1].split("## Targets")[0]
    assert "few_examples | token_stats / embedding | only" in flags
    assert "below_target | token_stats / embedding | balanced_accuracy" in flags
    targets = md.split("## Targets")[1].split("##")[0]
    assert "| token_stats / embedding | balanced_accuracy |" in targets
    assert "| token_stats / embedding | auc |" in targets
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["stages"]["report"]["config"]["report"]["targets"] == ["balanced_accuracy=0.99,auc=0.5"]


def test_altered_artifact_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with (copy / "sae" / "sae.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert main(["cache", "--run-dir", str(copy)]) == 1
    assert "sae/sae.safetensors was altered" in error_line(capsys.readouterr().err)


def test_stage_without_its_input_names_the_missing_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--run-dir", str(tmp_path / "none")]) == 1
    assert "saelab collect" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["collect", "--run-dir", str(tmp_path / "x"), "--model.name", str(tiny_model_dir)]
    assert main([*base, "--data.dataset", str(corpus_file), "--collect.hookpoint", "layers.99"]) == 1
    assert "hookpoint 'layers.99' is not a module" in error_line(capsys.readouterr().err)
    (tmp_path / "empty.txt").write_text("")
    assert main([*base, "--data.dataset", str(tmp_path / "empty.txt")]) == 1
    assert "fewer than two windows" in capsys.readouterr().err
    assert main(["collect", "--run-dir", str(tmp_path / "y"), "--model.name", str(tmp_path / "nomodel")]) == 1
    assert "never downloads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # tyro reports the config error with the usage
        main(["train", "--run-dir", str(tmp_path / "x"), "--train.lr", "-1"])
    assert exc.value.code == 2
    assert "train.lr must be > 0" in capsys.readouterr().err


def test_unreachable_llm_url(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    args = ["explain", "--run-dir", str(copy), "--llm.url", url, "--llm.max-retries", "0", "--force"]
    assert main([*args, "--explain.explainers", "default"]) == 1
    err = error_line(capsys.readouterr().err)
    assert url in err and "--llm.url" in err
    assert (copy / "explain" / "explanations.jsonl").read_bytes() == (
        run_dir / "explain" / "explanations.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_is_generated_from_the_config(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--run-dir" in out
    if command == "train":
        assert "Active latents per token" in out  # the field's docstring in saelab/config/train.py


def test_sharded_store_and_variants_trained_in_one_pass(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """collect --collect.format store writes shards that train streams; train.variants trains further SAEs on
    the same batches (each equal to training it alone) into sae-variants/; cache reads the store; eval compares
    them on the same tokens, each result naming the hashes of its SAE, data and model."""
    from saelab.activations.store import ActivationStore
    from saelab.config import TrainConfig
    from saelab.data.windows import TokenWindows
    from saelab.sae import base as sae_lib
    from saelab.train.trainer import train

    run = tmp_path / "r"
    collect = ["collect", "--run-dir", str(run), *SMALL["collect"], "--model.name", str(tiny_model_dir)]
    collect += [
        "--data.dataset",
        str(corpus_file),
        "--collect.format",
        "store",
        "--collect.shard-rows",
        "500",
    ]
    assert main(collect) == 0
    store = ActivationStore(run / "activations" / "store")
    assert store.n_rows >= 1500 and len(list(store.folder.glob("*.safetensors"))) >= 3
    assert not (run / "activations" / "acts.safetensors").exists()
    variants = ["architecture=batchtopk k=6", "architecture=relu l1_coef=0.5"]
    assert main(["train", "--run-dir", str(run), *SMALL["train"], "--train.variants", *variants]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    folders = [v["folder"] for v in manifest["stages"]["train"]["variants"]]
    assert folders == [
        "sae-variants/1-architecture-batchtopk-k-6",
        "sae-variants/2-architecture-relu-l1-coef-0.5",
    ]
    assert [sae_lib.load(run / f).architecture for f in folders] == ["batchtopk", "relu"]
    assert all(f"{f}/sae.safetensors" in manifest["stages"]["train"]["outputs"] for f in folders)
    # the batchtopk variant is the SAE `train` makes from the same store alone
    cfg = TrainConfig(expansion=4, k=6, batch_size=128, epochs=4, architecture="batchtopk")
    alone = train(store, cfg, seed=0).sae.state_dict()
    got = sae_lib.load(run / folders[0]).state_dict()
    assert all(torch.equal(got[n], v) for n, v in alone.items())
    assert main(["cache", "--run-dir", str(run)]) == 0
    # eval compares the SAE, its variants and an outside folder (the same SAE in SAELens's format) on the same tokens
    from saelab.sae.formats import export_sae

    export_sae(sae_lib.load(run / "sae"), tmp_path / "as-saelens", "saelens")
    evals = ["eval", "--run-dir", str(run), *SMALL["eval"], "--eval.extra-saes", str(tmp_path / "as-saelens")]
    assert main(evals) == 0
    compared = json.loads((run / "eval" / "matched_l0.json").read_text())["saes"]
    assert [e["name"] for e in compared] == ["sae", *folders, str(tmp_path / "as-saelens")]
    main_sae, exported = compared[0], compared[-1]
    for key in ("explained_variance", "l0", "ce_loss_score", "kl_score"):
        assert exported[key] == pytest.approx(main_sae[key], rel=1e-5, abs=1e-6), key
    # every result file names the SAE, data and model it was computed from; the SAELens copy hashes as the original
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    record = json.loads((run / "eval" / "matched_l0.json").read_text())
    assert metrics["sae_sha256"] == sae_lib.params_sha256(sae_lib.load(run / "sae")) == main_sae["sae_sha256"]
    assert (
        metrics["data_sha256"]
        == TokenWindows.load(run / "data" / "windows.npz").sha256()
        == record["data_sha256"]
    )
    assert metrics["model_sha256"] == manifest["hashes"]["model"] == record["model_sha256"]
    hashes = [e["sae_sha256"] for e in compared]
    assert exported["sae_sha256"] == main_sae["sae_sha256"] and len(set(hashes)) == len(hashes) - 1
    assert main(["report", "--run-dir", str(run)]) == 0
    assert (run / "plots" / "pareto_explained_variance.png").stat().st_size > 10_000
    assert "SAEs compared on the same tokens" in (run / "report.md").read_text()


def test_eval_of_outside_saes_on_an_untrained_run(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SAEs trained elsewhere are evaluated on a run that was only collected: `--eval.extra-saes` alone, no `train`;
    the first is the run's record (metrics.json names it), the rest are compared with it on the same tokens."""
    from saelab.sae import base as sae_lib
    from saelab.sae.formats import export_sae

    run = tmp_path / "r"
    collect = ["collect", "--run-dir", str(run), *SMALL["collect"], "--model.name", str(tiny_model_dir)]
    assert main([*collect, "--data.dataset", str(corpus_file)]) == 0
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"]]) == 1  # nothing to evaluate: says to train
    assert "saelab train" in error_line(capsys.readouterr().err)
    torch.manual_seed(0)
    folders = [tmp_path / "wide-saelens", tmp_path / "narrow-saelab"]
    export_sae(sae_lib.build(sae_lib.SAEConfig("topk", 32, 128, 8)), folders[0], "saelens")
    sae_lib.save(sae_lib.build(sae_lib.SAEConfig("relu", 32, 64)), folders[1])
    assert main(["eval", "--run-dir", str(run), *SMALL["eval"], "--eval.extra-saes", *map(str, folders)]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["sae"] == str(folders[0]) and metrics["sae_config"]["d_sae"] == 128
    assert 0 < metrics["l0"] <= 8
    compared = json.loads((run / "eval" / "matched_l0.json").read_text())["saes"]
    assert [(e["name"], e["architecture"]) for e in compared] == [
        (str(folders[0]), "topk"),
        (str(folders[1]), "relu"),
    ]
    assert compared[0]["l0"] == metrics["l0"]
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert (
        f"topk SAE `{folders[0]}`, d_in 32, 128 latents" in report
        and "SAEs compared on the same tokens" in report
    )


def test_train_under_torchrun(tmp_path: Path, tiny_model_dir: Path, corpus_file: Path) -> None:
    """`torchrun --nproc-per-node 2 -m saelab.cli train`: two data-parallel ranks (gloo), one log, one manifest
    record, one SAE, and the SAE the one-process run makes from the same activations."""
    import subprocess
    import sys

    from saelab.activations.store import Activations
    from saelab.config import TrainConfig
    from saelab.sae import base as sae_lib
    from saelab.train.distributed import free_port
    from saelab.train.trainer import train

    run = tmp_path / "r"
    collect = ["collect", "--run-dir", str(run), *SMALL["collect"], "--model.name", str(tiny_model_dir)]
    assert main([*collect, "--data.dataset", str(corpus_file)]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    cmd += ["-m", "saelab.cli", "train", "--run-dir", str(run), *SMALL["train"], "--train.log-every", "5"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    # the ranks' own errors first: torchrun's report of a failed rank fills the end of stderr
    errors = [ln for ln in proc.stderr.splitlines() if any(w in ln for w in ("Error", "terminate", "Abort"))]
    assert proc.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + proc.stderr[-3000:]
    assert proc.stderr.count("train done in") == 1  # rank 0 alone reports
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["steps"] > 0
    log = [json.loads(line) for line in (run / "sae" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == sorted({r["step"] for r in log})  # one writer
    acts = Activations.load(run / "activations" / "acts.safetensors").acts_ND.float()
    torch.set_num_threads(1)
    single = train(acts, TrainConfig(expansion=4, k=4, batch_size=128, epochs=4), seed=0).sae.state_dict()
    got = sae_lib.load(run / "sae").state_dict()
    for name, value in single.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_eval_with_probing(run_dir: Path, tmp_path: Path) -> None:
    """--eval.probing.tasks writes probing.json beside the core metrics, recorded in the manifest and shown in the
    report. (Absorption needs a real vocabulary: tests/test_demo_slow.py runs it on the bundled model.)"""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    args = ["eval", "--run-dir", str(run), *SMALL["eval"], "--eval.probing.tasks", "wiki_vs_bible"]
    assert main([*args, "--eval.probing.n-per-class", "16"]) == 0
    probing = json.loads((run / "eval" / "probing.json").read_text())
    assert [t["name"] for t in probing["tasks"]] == ["wiki_vs_bible"]
    assert probing["config"]["n_per_class"] == 16
    assert all(0 <= sc["accuracy"] <= 1 for sc in probing["tasks"][0]["scores"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert "eval/probing.json" in manifest["stages"]["eval"]["outputs"]
    assert main(["report", "--run-dir", str(run)]) == 0
    assert "Sparse probing" in (run / "report.md").read_text()


def test_absorption_error_names_the_eval_flag(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vocabulary too small for the absorption prompts is refused naming the flag that fixes it, spelt as typed,
    and writes no absorption record."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    args = [
        "eval",
        "--run-dir",
        str(run),
        *SMALL["eval"],
        "--eval.absorption.enabled",
        "--eval.absorption.vocab-size",
        "3",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "raise --eval.absorption.vocab-size" in err and "absorption.vocab_size" not in err
    assert not (run / "eval" / "absorption.json").exists()


@pytest.mark.bad_input
def test_cache_eval_split_and_stale_cache_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cache reads the held-out windows through the model; more tokens than the split holds is one clear error;
    rebuilding a cache that later stages were made from, or retraining its SAE, is refused without --force; a
    cache built from an SAE that was since retrained is refused by sample, naming the fix."""
    import shutil

    from saelab.latents.cache import LatentCache

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["stages"]["cache"]["nnz"] > 0 and manifest["stages"]["cache"]["dataset_split"] == "train"
    samples = json.loads((copy / "samples" / "samples.json").read_text())
    assert samples["class_balance"]["n_activating"] == 4 * len(samples["latents"])
    assert main(["cache", "--run-dir", str(copy), "--cache.dataset-split", "eval"]) == 1
    err = error_line(capsys.readouterr().err)
    assert "cache would replace the artifacts that sample, explain, score" in err and "pass --force" in err
    assert main(["cache", "--run-dir", str(copy), "--cache.dataset-split", "eval", "--force"]) == 0
    cache = LatentCache.open(copy / "latents")
    assert cache.info.dataset_split == "eval" and cache.n_tokens > 0
    import numpy as np

    from saelab.data.windows import TokenWindows

    windows = TokenWindows.load(copy / "data" / "windows.npz")
    assert set(np.unique(cache.window_N).tolist()) <= set(windows.eval_idx.tolist())
    too_many = str(cache.n_tokens + 1)
    assert (
        main(["cache", "--run-dir", str(copy), "--cache.dataset-split", "eval", "--cache.n-tokens", too_many])
        == 1
    )
    assert f"more than the {cache.n_tokens} tokens the eval split holds" in error_line(
        capsys.readouterr().err
    )
    retrain = ["train", "--run-dir", str(copy), *SMALL["train"], "--train.k", "3"]
    assert main(retrain) == 1
    assert "train would replace the artifacts that eval, cache" in error_line(capsys.readouterr().err)
    assert main([*retrain, "--force"]) == 0  # a new SAE: the stages made from the old one are dropped
    assert main(["sample", "--run-dir", str(copy), *SMALL["sample"]]) == 1
    err = error_line(capsys.readouterr().err)
    assert "stage 'cache' was dropped" in err and "when 'train' ran again" in err
    assert "saelab cache --run-dir" in err


def test_run_report_renders_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    """The run's report.html in headless Chromium: every embedded plot decodes and is not blank."""
    from test_report_render import assert_plots_rendered

    html = run_dir / "report.html"
    n = html.read_text().count("data:image/png;base64,")
    assert n >= 2  # feature density and the scores
    assert_plots_rendered(html, tmp_path / "page.png", expected=n)


def test_report_refuses_an_altered_score_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    scores = copy / "score" / "scores.jsonl"
    scores.write_text(scores.read_text().replace('"f1": ', '"f1": 1', 1))
    assert main(["report", "--run-dir", str(copy)]) == 1
    assert "score/scores.jsonl was altered after stage 'score'" in error_line(capsys.readouterr().err)


def test_manifest_records_memory_code_and_packages(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"torch", "numpy", "scikit-learn"} <= set(manifest["packages"])
    assert "git_dirty" in manifest
    for name, st in manifest["stages"].items():
        assert st["peak_rss_mib"] > 10, name
        assert st["peak_rss_scope"] in ("stage", "process") and "git_commit" in st


def test_runs_store_lists_filters_and_answers_sql(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / "a")
    manifest = json.loads((root / "a" / "manifest.json").read_text())
    manifest["seed"] = 7
    manifest["config"]["train"]["k"] = 3
    (root / "b").mkdir()
    (root / "b" / "manifest.json").write_text(
        json.dumps(manifest)
    )  # a run with no artifacts: listed all the same
    assert main(["runs", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "(2 rows)" in out and "ev" in out.splitlines()[0]
    assert main(["runs", "--root", str(root), "--where", "config.train.k = 3", "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["b"] and rows[0]["seed"] == 7
    sql = "SELECT r.name, count(*) AS n FROM scores s JOIN runs r USING (run) GROUP BY r.name"
    assert main(["runs", "--root", str(root), "--sql", sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n_rows = len((run_dir / "score" / "scores.jsonl").read_text().splitlines())
    assert lines == ["name,n", f"a,{n_rows}"]
    assert main(["runs", "--root", str(root), "--sql", "SELECT nope FROM runs"]) == 1
    assert "query failed" in capsys.readouterr().err


def test_report_sections_of_the_issue(run_dir: Path, tmp_path: Path) -> None:
    """Class balance of the scoring sets, score distributions, explainer tokens, per-stage memory; PDF export."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["report", "--run-dir", str(copy), "--report.pdf"]) == 0
    md = (copy / "report.md").read_text()
    rows = [json.loads(line) for line in (copy / "score" / "scores.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["explainer"] == "token_stats"]  # the shuffled control has its own line
    pos, neg = sum(r["n_pos"] for r in rows), sum(r["n_neg"] for r in rows)
    balance = md.split("## Scoring sets: class balance")[1].split("\n## ")[0]
    assert f"| token_stats | embedding | {len(rows)} | {pos} | {neg} |" in balance
    assert "plots/score_distributions.png" in md
    assert "| token_stats | none |" in md.split("## Explainers: tokens and latency")[1]
    assert "peak RSS (MiB)" in md.split("## Time, memory and tokens per stage")[1]
    for name in ("feature_density", "scores", "score_distributions"):
        assert (copy / "plots" / f"{name}.pdf").read_bytes().startswith(b"%PDF")


def test_sample_latents_from_another_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--sample.latents-from RUN` studies the latents RUN studied (a like-for-like before/after); a folder
    without samples is one error line."""
    from saelab.latents.sampling import SampleSet

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    wanted = [le.latent for le in SampleSet.load_run(run_dir).latents]
    assert main(["sample", "--run-dir", str(copy), *SMALL["sample"], "--sample.n-latents", "1",
                 "--sample.latents-from", str(run_dir), "--force"]) == 0  # fmt: skip
    assert [le.latent for le in SampleSet.load_run(copy).latents] == wanted
    assert json.loads((copy / "manifest.json").read_text())["stages"]["sample"]["latents_from"] == str(
        run_dir
    )
    capsys.readouterr()
    args = [
        "sample",
        "--run-dir",
        str(copy),
        *SMALL["sample"],
        "--force",
        "--sample.latents-from",
        str(tmp_path),
    ]
    assert main(args) == 1
    assert "holds no samples/samples.json" in error_line(capsys.readouterr().err)
