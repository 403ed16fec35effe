"""SCR and TPP: the probe, attribution and ablation pieces on planted problems, the identity that lets ablation work
on pooled activations, SAEBench's set construction, the bundled labels and their counts, local datasets, clear
errors on bad input, the reseed noise and `--eval.compare`, and `saelab eval` writing JSON and a report section.
One slow test on the real bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support_run import SMALL, error_line

from saelab.cli import main
from saelab.eval.core import METRICS
from saelab.eval.noise import NOISE, NoiseRecord, Spread, compare, spread
from saelab.eval.probing_features import PooledFeatures
from saelab.eval.scr_data import (
    ScrTppError,
    gender_of,
    label_counts,
    profession_of,
    scr_pair,
    tpp_data,
    wikipedia_biographies,
)
from saelab.eval.scr_probes import (
    LinearProbe,
    ProbeSettings,
    ablate,
    latent_effects,
    top_n,
    tpp_negatives,
    train_probe,
)
from saelab.eval.scr_tpp import (
    SCR_TPP,
    Features,
    ScrTppResult,
    ScrTppSettings,
    _scr_pair,
    _tpp,
    scr_score,
)
from saelab.sae.base import SAEConfig, build

# --- probes, attribution, ablation -------------------------------------------------------------------------------


def test_probe_learns_a_planted_direction_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    x[:, 2] += 3 * (2 * y - 1)
    probe = train_probe(x[:300], y[:300], ProbeSettings(), seed=1)
    assert probe.accuracy(x[300:], y[300:]) > 0.95
    init = train_probe(x[:300], y[:300], ProbeSettings(epochs=0), seed=1)  # the same start, untrained
    assert np.argmax(probe.w_D - init.w_D) == 2  # training moved the planted dimension's weight the most
    again = train_probe(x[:300], y[:300], ProbeSettings(), seed=1)
    other = train_probe(x[:300], y[:300], ProbeSettings(), seed=2)
    assert np.array_equal(probe.w_D, again.w_D) and not np.array_equal(probe.w_D, other.w_D)


def test_latent_effects_follow_saebench_rules() -> None:
    z = np.array([[2.0, 0.0, 1.0], [4.0, 0.0, 1.0], [1.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    y = np.array([1, 1, 0, 0])  # mean diff per latent: +2, -2, 0
    w_dec = np.eye(3)
    probe = LinearProbe(np.array([0.5, 1.0, 7.0]), 0.0)
    assert np.allclose(latent_effects(z, y, probe, w_dec, scr=True), [1.0, 2.0, 0.0])  # |diff * (W_dec . w)|
    assert np.allclose(latent_effects(z, y, probe, w_dec, scr=False), [1.0, 0.0, 0.0])  # diff clamped at 0
    assert list(top_n(np.array([0.0, 3.0, 1.0, 0.0]), 10)) == [1, 2]  # only the nonzero effects
    assert list(top_n(np.array([1.0, 5.0, 1.0]), 2)) == [1, 0]  # ties: the lower index


def test_pooled_ablation_equals_saebench_per_token_ablation() -> None:
    """x' = decode(z with S zeroed) + (x - decode(z)) per kept token, then the mean: equal to ablating the mean."""
    torch.manual_seed(0)
    sae = build(SAEConfig("topk", 16, 64, k=6)).eval()
    torch.nn.init.normal_(sae.b_dec_D)
    x_BLD = torch.randn(5, 9, 16)
    keep_BL = torch.rand(5, 9) > 0.3
    keep_BL[:, 0] = True
    latents = np.array([3, 17, 40, 41, 63])
    with torch.no_grad():
        z_BLF = sae.dense_latents(x_BLD.reshape(-1, 16)).reshape(5, 9, 64)
        error_BLD = x_BLD - sae.decode_dense(z_BLF)
        z_abl = z_BLF.clone()
        z_abl[..., latents] = 0
        x_abl_BLD = sae.decode_dense(z_abl) + error_BLD
    n_B = keep_BL.sum(1, keepdim=True)
    want = ((x_abl_BLD * keep_BL[..., None]).sum(1) / n_B).numpy()
    x_ND = ((x_BLD * keep_BL[..., None]).sum(1) / n_B).numpy()
    z_NF = ((z_BLF * keep_BL[..., None]).sum(1) / n_B).numpy()
    got = ablate(x_ND, z_NF, sae.W_dec_FD.detach().numpy(), latents)
    assert np.allclose(got, want, atol=1e-5) and not np.allclose(got, x_ND, atol=1e-3)


def test_scr_score_is_normalised_with_saebench_floor() -> None:
    assert scr_score(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert scr_score(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert scr_score(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)
    assert scr_score(0.99, 0.9, 0.9005) == 0.0  # oracle - biased under 0.001


def test_tpp_negatives_draw_evenly_from_the_other_classes() -> None:
    pools = [tuple(range(c * 100, c * 100 + 12)) for c in range(4)]
    neg = tpp_negatives(pools, 1, np.random.default_rng(0))
    assert len(neg) == 12 and len(set(neg)) == 12
    assert all(not 100 <= i < 112 for i in neg)
    assert {i // 100 for i in neg} == {0, 2, 3}


# --- planted SCR / TPP problems ----------------------------------------------------------------------------------


def _features(texts: list[str], x_ND: np.ndarray, z_NF: np.ndarray, w_dec: np.ndarray) -> Features:
    pooled = PooledFeatures(x_ND.astype(np.float32), z_NF.astype(np.float32), np.ones(len(texts), np.int64))
    return Features(pooled, {t: i for i, t in enumerate(texts)}, w_dec, [[i] for i in range(len(texts))])


def test_scr_removes_planted_spurious_gender_latents() -> None:
    """Latents 0 / 2 fire for men / women (strongly), 1 / 3 for professions a / b; the biased probe (a-men against
    b-women) leans on gender, so ablating the gender probe's top two latents closes its gap to the oracle on
    profession data."""
    rng = np.random.default_rng(0)
    quadrants, rows = {}, []
    for prof in ("a", "b"):
        for gender in ("male", "female"):
            texts = [f"{prof}-{gender}-{i}" for i in range(120)]
            quadrants[(prof, gender)] = texts
            for _ in texts:
                v = np.abs(rng.normal(0, 1.0, 64))
                v[0 if gender == "male" else 2] += 10.0
                v[1 if prof == "a" else 3] += 8.0
                rows.append(v)
    texts = [t for q in quadrants.values() for t in q]
    z = np.asarray(rows)
    f = _features(texts, z, z, np.eye(64))
    pair = scr_pair("a / b", quadrants, "a", "b", ("male", "female"), 160, 80, seed=0)
    res = _scr_pair(pair, f, ScrTppSettings(n_values=(2,)), seed=0)
    assert res.profession_acc > 0.9 and res.gender_acc > 0.95
    assert res.biased_on_profession_acc < 0.7 < 0.95 < res.biased_on_gender_acc  # leans on gender
    assert res.direction == 1
    assert set(res.gender_latents[:2]) == {0, 2} and set(res.profession_latents[:2]) == {1, 3}
    (score,) = res.scores
    assert score.metric == score.dir1 > 0.8


def test_tpp_drops_only_the_targeted_class() -> None:
    rng = np.random.default_rng(1)
    classes = ("x", "y", "z")
    pools = {c: [f"{c}{i}" for i in range(80)] for c in classes}
    texts = [t for c in classes for t in pools[c]]
    z = np.abs(rng.normal(0, 1.0, (len(texts), 64)))
    for i, t in enumerate(texts):
        z[i, classes.index(t[0])] += 10.0
    data = tpp_data(pools, 60, 20, seed=0)
    out = _tpp(data, _features(texts, z, z, np.eye(64)), ScrTppSettings(n_values=(1, 2)), seed=0)
    for c, res in enumerate(out):
        assert res.clean_acc > 0.9 and res.latents[0] == c
        one = res.scores[0]
        assert one.intended > 0.2 and one.total > 0.05  # the targeted probe drops more than the others
        assert one.total == one.intended - one.unintended


# --- data ----------------------------------------------------------------------------------------------------


def test_bundled_biography_labels_and_their_counts() -> None:
    assert gender_of("She wrote. Her book. He said.") == "female"
    assert gender_of("He and his brother; she") == "male"
    assert gender_of("The band formed in 1972.") is None
    assert profession_of("English poet and playwright (actor in 1590)") == "writer"
    assert profession_of("American singer (writer)") == "performer"
    assert profession_of("Shah of Iran") is None
    counts = label_counts(wikipedia_biographies())
    assert (counts["gender=male"], counts["gender=female"], counts["gender=None"]) == (1469, 164, 195)
    assert (counts["writer/male"], counts["writer/female"]) == (216, 25)
    assert (counts["performer/male"], counts["performer/female"]) == (98, 47)


def test_scr_sets_follow_saebench_construction() -> None:
    quads = {(p, g): [f"{p}{g}{i}" for i in range(40)] for p in ("a", "b") for g in ("m", "f")}
    pair = scr_pair("a / b", quads, "a", "b", ("m", "f"), 32, 16, seed=0)
    for split, m in ((pair.train, 8), (pair.test, 4)):
        assert all(t[1] == "m" for t in split.gender.positives) and all(
            t[1] == "f" for t in split.gender.negatives
        )
        assert all(t[0] == "a" for t in split.profession.positives)
        assert {t[:2] for t in split.biased.positives} == {"am"} and {
            t[:2] for t in split.biased.negatives
        } == {"bf"}
        for b in (split.gender, split.profession, split.biased):
            assert len(b.positives) == len(b.negatives) == 2 * m
        assert sum(t[:2] == "af" for t in split.gender.negatives) == m  # balanced: m per quadrant
    train = {
        t
        for b in (pair.train.gender, pair.train.profession, pair.train.biased)
        for t in b.positives + b.negatives
    }
    test = {
        t
        for b in (pair.test.gender, pair.test.profession, pair.test.biased)
        for t in b.positives + b.negatives
    }
    assert train.isdisjoint(test)
    assert (
        scr_pair("a / b", quads, "a", "b", ("m", "f"), 32, 16, seed=1).train != pair.train
    )  # reseed = resample


@pytest.mark.bad_input
def test_a_quadrant_or_class_too_small_for_its_probe_is_one_clear_error() -> None:
    quads = {(p, g): [f"{p}{g}{i}" for i in range(40)] for p in ("a", "b") for g in ("m", "f")}
    quads[("a", "f")] = quads[("a", "f")][:5]
    with pytest.raises(
        ScrTppError, match=r"profession=a gender=f has 5 texts, fewer than the 12 .*scr-n-train"
    ):
        scr_pair("a / b", quads, "a", "b", ("m", "f"), 32, 16, seed=0)
    with pytest.raises(
        ScrTppError, match=r"TPP class 'y' has 3 texts, fewer than .* 10; lower --eval.scr-tpp"
    ):
        tpp_data({"x": [f"x{i}" for i in range(20)], "y": ["a", "b", "c"]}, 8, 2, seed=0)


def _save_dataset(folder: Path, columns: dict[str, list], n_test: int) -> Path:
    from datasets import Dataset, DatasetDict

    train = Dataset.from_dict({k: v[n_test:] for k, v in columns.items()})
    test = Dataset.from_dict({k: v[:n_test] for k, v in columns.items()})
    DatasetDict(train=train, test=test).save_to_disk(str(folder))
    return folder


def test_local_bias_in_bios_folder_gives_saebench_pairs_and_classes(tmp_path: Path) -> None:
    from saelab.eval.scr_local import local_scr_pairs, local_tpp

    ids = {"professor": 21, "nurse": 13, "architect": 1, "journalist": 11, "surgeon": 25, "psychologist": 22,
           "attorney": 2, "teacher": 26, "accountant": 0, "dentist": 6, "filmmaker": 9}  # fmt: skip
    rows = [(f"{split} {p} {g} {i}", ids[p], g) for split in ("test", "train") for p in ids for g in (0, 1)
            for i in range(12 if split == "test" else 24)]  # fmt: skip
    n_test = sum(r[0].startswith("test") for r in rows)
    cols = {
        "hard_text": [r[0] for r in rows],
        "profession": [r[1] for r in rows],
        "gender": [r[2] for r in rows],
    }
    folder = _save_dataset(tmp_path / "bios", cols, n_test)
    pairs = local_scr_pairs(str(folder), 32, 16, seed=0)
    assert [p.name for p in pairs] == [
        "professor / nurse",
        "architect / journalist",
        "surgeon / psychologist",
        "attorney / teacher",
    ]
    assert all(t.startswith("train professor 0") for t in pairs[0].train.biased.positives)
    assert all(t.startswith("test nurse 1") for t in pairs[0].test.biased.negatives)
    tpp = local_tpp(str(folder), 16, 8, seed=0)
    assert tpp.classes == ("accountant", "architect", "attorney", "dentist", "filmmaker")
    assert all(len(c) == 16 and all(t.startswith("train") for t in c) for c in tpp.train)
    assert sum(" 1 " in t for t in tpp.test[0]) == 4  # n / 2 of each gender


@pytest.mark.bad_input
def test_local_dataset_without_saebench_columns_is_one_clear_error(tmp_path: Path) -> None:
    from saelab.eval.scr_local import local_tpp

    folder = _save_dataset(tmp_path / "bad", {"text": ["a", "b", "c"], "label": [0, 1, 0]}, 1)
    with pytest.raises(
        ScrTppError, match=r"has columns \['label', 'text'\], not those of bias_in_bios \(hard_text"
    ):
        local_tpp(str(folder), 8, 4, seed=0)
    with pytest.raises(ScrTppError, match="no such folder"):
        local_tpp(str(tmp_path / "missing"), 8, 4, seed=0)


# --- noise -----------------------------------------------------------------------------------------------------


def test_spread_and_compare() -> None:
    s = spread([0.1, 0.3, 0.2, 0.4])
    assert s.mean == pytest.approx(0.25) and s.std == pytest.approx(np.std([0.1, 0.3, 0.2, 0.4], ddof=1))
    assert 0.1 <= s.ci_low < s.mean < s.ci_high <= 0.4
    one = spread([0.5])
    assert (one.std, one.ci_low, one.ci_high) == (0.0, 0.5, 0.5)
    a = {"m": spread([0.20, 0.25, 0.22]), "only_a": spread([1.0])}
    close = {"m": spread([0.21, 0.24, 0.23])}
    far = {"m": spread([0.60, 0.62, 0.61])}
    (d_close,) = compare(a, close)
    (d_far,) = compare(a, far)
    assert d_close.within_noise and not d_far.within_noise
    assert d_far.diff == pytest.approx(0.61 - np.mean([0.20, 0.25, 0.22])) and d_far.ci_low > 0


# --- through saelab eval -----------------------------------------------------------------------------------------


SCR_FLAGS = ["--eval.scr-tpp.scr", "--eval.scr-tpp.tpp", "--eval.scr-tpp.scr-n-train", "32",
             "--eval.scr-tpp.scr-n-test", "16", "--eval.scr-tpp.tpp-n-train", "16", "--eval.scr-tpp.tpp-n-test",
             "8", "--eval.scr-tpp.probe-epochs", "3"]  # fmt: skip


def test_eval_writes_scr_tpp_with_provenance_noise_and_a_report_section(run: Path, tmp_path: Path) -> None:
    args = ["eval", "--run-dir", str(run), *SMALL["eval"], *SCR_FLAGS, "--eval.repeats", "2", "--force"]
    assert main(args) == 0
    result = ScrTppResult.load(run / SCR_TPP)
    metrics = json.loads((run / METRICS).read_text())
    assert (result.sae_sha256, result.model_sha256) == (metrics["sae_sha256"], metrics["model_sha256"])
    assert result.hookpoint == metrics["hookpoint"] and len(result.data_sha256) == 64
    assert [r.seed for r in result.seeds] == [0, 1] and result.seeds[0].data_sha256 != result.seeds[
        1
    ].data_sha256
    assert result.settings.n_values == (2, 5, 10, 20, 50, 100)  # 500 > the SAE's width, left out
    assert result.seeds[0].scr[0].name == "writer / performer" and len(result.seeds[0].tpp) == 5
    spread10 = result.noise["tpp.total_n10"]
    assert spread10.values == tuple(r.tpp_metric[10] for r in result.seeds)
    noise = NoiseRecord.load(run / NOISE)
    assert noise.seeds == (0, 1) and noise.metrics["scr.metric_n10"] == result.noise["scr.metric_n10"]
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## SCR and TPP (SAEBench definitions)" in report and "plots/scr_tpp.png" in report
    assert "## Reseed noise" in report and (run / "plots" / "scr_tpp.png").stat().st_size > 1000

    # the same SAE compared with itself: every difference is 0, inside the noise
    other = tmp_path / "other"
    import shutil

    shutil.copytree(run, other)
    assert main([*args, "--eval.compare", str(other)]) == 0
    compared = NoiseRecord.load(run / NOISE)
    assert compared.compared_with == str(other) and compared.differences
    assert all(d.within_noise and d.diff == 0 for d in compared.differences)


@pytest.mark.bad_input
def test_eval_with_a_bad_scr_dataset_is_one_error_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _save_dataset(tmp_path / "bad", {"text": ["a", "b"], "stars": [1, 5]}, 1)
    args = ["eval", "--run-dir", str(run), *SMALL["eval"], *SCR_FLAGS, "--eval.scr-tpp.dataset", str(folder)]
    assert main([*args, "--force"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "ScrTppError" in line and "has columns ['stars', 'text']" in line and "rename its columns" in line


@pytest.mark.bad_input
def test_compare_without_a_noise_record_is_one_error_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "eval",
        "--run-dir",
        str(run),
        *SMALL["eval"],
        *SCR_FLAGS,
        "--eval.compare",
        str(tmp_path),
        "--force",
    ]
    assert main(args) == 1
    assert "no eval/noise.json there; run `saelab eval" in error_line(capsys.readouterr().err)


def test_repeats_give_probing_its_noise_and_compare_flags_a_real_difference(
    run: Path, tmp_path: Path
) -> None:
    """--eval.repeats reruns sparse probing at every seed into eval/noise.json; comparing with a run whose SAE was
    retrained differently finds the metrics it shares and says for each whether the difference is inside the
    noise."""
    base = ["eval", *SMALL["eval"], "--eval.probing.tasks", "wiki_people_vs_places", "--eval.probing.n-per-class",
            "16", "--eval.repeats", "3", "--force"]  # fmt: skip
    assert main([base[0], "--run-dir", str(run), *base[1:]]) == 0
    noise = NoiseRecord.load(run / NOISE)
    acc = noise.metrics["probing.lm_logreg.accuracy"]
    assert noise.seeds == (0, 1, 2) and len(acc.values) == 3 and acc.ci_low <= acc.mean <= acc.ci_high
    assert "probing.sae_logreg_k1.accuracy" in noise.metrics
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert (
        main(["train", "--run-dir", str(other), *SMALL["train"], "--train.k", "2", "--seed", "5", "--force"])
        == 0
    )
    assert main([base[0], "--run-dir", str(other), *base[1:]]) == 0
    assert main([base[0], "--run-dir", str(run), *base[1:], "--eval.compare", str(other)]) == 0
    record = NoiseRecord.load(run / NOISE)
    assert record.compared_sae_sha256 == NoiseRecord.load(other / NOISE).sae_sha256 != record.sae_sha256
    by_metric = {d.metric: d for d in record.differences}
    lm = by_metric["probing.lm_logreg.accuracy"]  # the LM probe does not see the SAE: the same at every seed
    assert lm.diff == 0 and lm.within_noise
    assert all(d.within_noise == (d.ci_low <= 0 <= d.ci_high) for d in record.differences)


@pytest.mark.slow
def test_real_model_scr_tpp() -> None:
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.eval.scr_tpp import run_scr_tpp
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model
    from saelab.train.trainer import train

    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = "model.layers.15"
    windows = build_windows(DataConfig(max_docs=40, ctx_len=64), lm.tokenizer, seed=0)
    acts = collect(lm, windows, hookpoint, 2000, batch_size=16)
    sae = train(acts.acts_ND, TrainConfig(expansion=2, k=16, epochs=2, batch_size=256, checkpoint_every=0),
                seed=0).sae.eval()  # fmt: skip
    s = ScrTppSettings(n_values=(2, 20, 500), tpp_n_train=32, tpp_n_test=16, ctx_len=48)
    result = run_scr_tpp(lm, sae, hookpoint, s, seeds=(0, 1))
    tpp = result.seeds[0].tpp
    assert np.mean([c.clean_acc for c in tpp]) > 0.8  # Wikipedia topics are linearly separable in the LM
    pair = result.seeds[0].scr[0]
    assert pair.profession_acc > 0.6 and 0 <= pair.biased_on_profession_acc <= 1
    assert all(isinstance(v, Spread) and v.std >= 0 for v in result.noise.values())
    assert result.model_sha256 == lm.weights_sha256
