"""Sparse probing: offline tasks (balanced, disjoint, seeded splits), mean-pooled features, top-k latent choice,
probes on planted and shuffled problems, clear errors on bad input; one slow test on the real bundled model."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.eval.probing import (
    ProbingConfig,
    pooled_features,
    probe_scores,
    run_probing,
    tokenize,
    top_k_by_mean_diff,
)
from saelab.eval.probing_tasks import (
    MIN_CHARS,
    ProbingError,
    ProbingTask,
    bible_chapters,
    build_task,
    make_task,
    wikipedia_by_topic,
)
from saelab.models.loading import LoadedModel, capture, forward_until, load_model
from saelab.sae.base import SAE, SAEConfig, build

HOOK = "model.layers.1"
SCIENCE = ["science", "atom", "energy", "light", "star", "planet", "orbit", "green"]
ROYAL = ["king", "queen", "war", "church", "city", "paris", "france", "red"]
FILLER = ["the", "a", "of", "and", "in", "was", "is"]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_sae() -> SAE:
    torch.manual_seed(0)
    return build(SAEConfig("topk", 32, 96, k=8)).eval()


def themed_texts(theme: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(theme if rng.random() < 0.5 else FILLER) for _ in range(rng.randint(12, 30)))
        for _ in range(n)
    ]


def tiny_task(n_per_class: int = 24, seed: int = 0) -> ProbingTask:
    pools = {"science": themed_texts(SCIENCE, 60, 1), "royal": themed_texts(ROYAL, 60, 2)}
    return make_task("tiny_topics", pools, n_per_class, 0.25, seed)


def assert_balanced_disjoint(task: ProbingTask, n_per_class: int, n_test: int) -> None:
    assert len(task.texts) == len(task.labels) == len(task.is_test) == n_per_class * len(task.classes)
    for label in range(len(task.classes)):
        assert (task.labels == label).sum() == n_per_class
        assert (task.is_test & (task.labels == label)).sum() == n_test
    assert len(set(task.texts)) == len(task.texts)  # no text twice, so none in both splits
    train = {t for t, test in zip(task.texts, task.is_test) if not test}
    assert train.isdisjoint(t for t, test in zip(task.texts, task.is_test) if test)


# --- tasks -------------------------------------------------------------------------------------------------------


def test_make_task_is_balanced_disjoint_and_seeded() -> None:
    pools = {"a": [f"a{i}" for i in range(50)] + ["a0", "a1"], "b": [f"b{i}" for i in range(30)]}
    task = make_task("t", pools, 20, 0.25, seed=3)
    assert task.classes == ("a", "b")
    assert_balanced_disjoint(task, 20, 5)
    assert all(t.startswith(task.classes[y]) for t, y in zip(task.texts, task.labels))
    again = make_task("t", pools, 20, 0.25, seed=3)
    assert again.texts == task.texts and (again.is_test == task.is_test).all()
    other = make_task("t", pools, 20, 0.25, seed=4)
    assert other.texts != task.texts


@pytest.mark.bad_input
def test_make_task_refuses_a_class_with_too_few_texts() -> None:
    # duplicates do not count: "b" has 3 distinct texts
    with pytest.raises(ProbingError, match=r"class 'b' has 3 distinct texts.*n_per_class to <= 3"):
        make_task("t", {"a": [str(i) for i in range(20)], "b": ["x", "y", "z", "x"]}, 10, 0.25, 0)


@pytest.mark.parametrize(
    "name",
    ["wiki_vs_bible", "wiki_people_vs_places", "wiki_biology_vs_physics", "wiki_topics5", "code_vs_prose"],
)
def test_bundled_tasks_are_balanced_disjoint_seeded_and_labelled_from_the_data(name: str) -> None:
    cfg = ProbingConfig(tasks=(name,), n_per_class=16)
    task = build_task(name, cfg, seed=0)
    assert_balanced_disjoint(task, 16, 4)
    assert all(len(t) >= MIN_CHARS for t in task.texts)
    assert build_task(name, cfg, seed=0).texts == task.texts
    assert build_task(name, cfg, seed=1).texts != task.texts
    by_class = {c: [t for t, y in zip(task.texts, task.labels) if y == i] for i, c in enumerate(task.classes)}
    if name == "code_vs_prose":
        for code in by_class["code"]:
            tree = ast.parse(code)
            assert isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef)
            assert ast.get_docstring(tree.body[0]) is None  # the docstring went to the other class's pool
        assert not any(">>>" in p for p in by_class["prose"])
        return
    topics = wikipedia_by_topic()
    sources = {"wikipedia": {t for ts in topics.values() for t in ts}, "bible": set(bible_chapters())}
    for cls, texts in by_class.items():
        assert set(texts) <= sources.get(cls, set(topics.get(cls, [])))


def test_a_class_draws_the_same_texts_in_every_task() -> None:
    cfg = ProbingConfig(n_per_class=16)
    pairs, five = build_task("wiki_people_vs_places", cfg, 0), build_task("wiki_topics5", cfg, 0)
    for task in (pairs, five):
        assert task.classes[:2] == ("People", "Geography")
    people = [t for t, y in zip(pairs.texts, pairs.labels) if y == 0]
    assert people == [t for t, y in zip(five.texts, five.labels) if y == 0]


# --- probes ------------------------------------------------------------------------------------------------------


def test_top_k_by_mean_diff_finds_planted_latents() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = rng.random((200, 300)).astype(np.float32)
    for j, shift in ((7, 3.0), (42, 2.0), (3, 1.0)):  # latent j fires more on class 1, by `shift`
        x[:, j] += shift * y
    assert top_k_by_mean_diff(x, y, 3).tolist() == [7, 42, 3]
    x[:, 250] -= 5.0 * y  # a latent that fires less on class 1 separates as well
    assert top_k_by_mean_diff(x, y, 1).tolist() == [250]
    y3 = np.repeat([0, 1, 2], 100)
    x3 = rng.random((300, 50))
    x3[:, 11] += 4.0 * (y3 == 2)  # separates class 2 from the others only
    x3[:, 20] += 1.0 * y3
    assert top_k_by_mean_diff(x3, y3, 2).tolist() == [11, 20]


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian features, 3 of 200 informative; half the rows test."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat([0, 1], n // 2))
    x = rng.standard_normal((n, 200)).astype(np.float32)
    x[:, [5, 17, 123]] += 2.5 * (2 * y[:, None] - 1)
    return x, y, rng.permutation(np.arange(n) % 2 == 0)


def test_probes_separate_a_planted_problem() -> None:
    x, y, is_test = separable(300, 0)
    scores, ranked = probe_scores(x, y, is_test, "sae", (1, 3, 10), seed=0)
    assert set(ranked[:3].tolist()) == {5, 17, 123}
    by = {(s.probe, s.k): s for s in scores}
    assert set(by) == {
        ("logreg", None),
        ("logreg", 1),
        ("logreg", 3),
        ("logreg", 10),
        ("lasso", None),
        ("random_forest", None),
    }
    for s in scores:
        floor = (
            0.85 if s.k == 1 else 0.95
        )  # one planted feature alone: Bayes accuracy Phi(2.5) = 0.994 > 0.85
        assert s.accuracy > floor and s.f1 > floor, s
    assert by[("lasso", None)].n_features < 40  # L1 keeps a few of the 200 features
    assert by[("logreg", 3)].n_features == 3 and by[("logreg", None)].n_features == 200


def test_probes_sit_at_chance_on_shuffled_labels() -> None:
    x, y, is_test = separable(400, 1)
    shuffled = np.random.default_rng(2).permutation(y)
    scores, _ = probe_scores(x, shuffled, is_test, "lm", (1, 5, 20), seed=0)
    accs = [s.accuracy for s in scores]
    assert all(0.35 < a < 0.65 for a in accs), accs  # 200 test rows: chance is 0.5 +- 0.035
    assert abs(np.mean(accs) - 0.5) < 0.06


def test_multiclass_probes_report_macro_f1() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 60)
    x = rng.standard_normal((180, 40))
    x[np.arange(180), y] += 4.0  # feature c marks class c
    is_test = rng.permutation(np.arange(180) % 3 == 0)
    scores, ranked = probe_scores(x, y, is_test, "sae", (3,), seed=0)
    assert set(ranked.tolist()) == {0, 1, 2}
    assert all(s.accuracy > 0.9 and s.f1 > 0.9 for s in scores), scores


# --- features and the entry point on the tiny model --------------------------------------------------------------


def test_pooled_features_are_means_over_kept_positions(tiny_lm: LoadedModel, tiny_sae: SAE) -> None:
    texts = [
        "star atom light energy orbit planet",
        "king </s> queen war church city paris france red",
        "a of",
    ]
    cfg = ProbingConfig(batch_size=2, exclude_first=1)
    ids = tokenize(tiny_lm.tokenizer, texts, cfg.ctx_len)
    feats = pooled_features(tiny_lm, tiny_sae, HOOK, ids, cfg)
    special = set(tiny_lm.tokenizer.all_special_ids)
    for i, x in enumerate(ids):  # each text alone, no padding
        with torch.inference_mode(), capture(tiny_lm.model, [HOOK]) as store:
            forward_until(tiny_lm.model, torch.as_tensor([x]))
        keep = [p for p, t in enumerate(x) if p >= 1 and t not in special]
        a = store[HOOK][0, keep]
        assert feats.n_kept_N[i] == len(keep)
        np.testing.assert_allclose(feats.lm_ND[i], a.mean(0).numpy(), rtol=1e-5, atol=1e-5)
        z = tiny_sae.dense_latents(a).mean(0).detach().numpy()
        np.testing.assert_allclose(feats.sae_NF[i], z, rtol=1e-5, atol=1e-5)
    assert 2 in ids[1] and feats.n_kept_N[1] == len(ids[1]) - 2  # EOS inside the text is left out
    one = pooled_features(tiny_lm, tiny_sae, HOOK, ids, ProbingConfig(batch_size=1, exclude_first=1))
    np.testing.assert_allclose(one.lm_ND, feats.lm_ND, rtol=1e-5, atol=1e-5)  # padding changes nothing


def test_run_probing_on_the_tiny_model(tiny_lm: LoadedModel, tiny_sae: SAE, tmp_path: Path) -> None:
    cfg = ProbingConfig(n_per_class=24, ks=(1, 2, 5), batch_size=8)
    result = run_probing(tiny_lm, tiny_sae, HOOK, cfg, seed=0, tasks=[tiny_task()])
    (task,) = result.tasks
    assert (task.n_train, task.n_test, task.classes) == (36, 12, ("science", "royal"))
    assert len(task.top_latents) == 5 and len(set(task.top_latents)) == 5
    assert all(0 <= i < 96 for i in task.top_latents)
    assert len(task.scores) == 2 * (1 + 3 + 2)
    assert all(0.0 <= s.accuracy <= 1.0 and 0.0 <= s.f1 <= 1.0 for s in task.scores)
    assert (
        task.score("lm", "logreg").accuracy >= 0.9
    )  # disjoint vocabularies: separable even for a random model
    assert len(result.sae_sha256) == 64 and len(task.data_sha256) == 64
    path = tmp_path / "probing.json"
    result.save(path)
    data = json.loads(path.read_text())
    assert data["config"]["ks"] == [1, 2, 5] and data["tasks"][0]["scores"][0]["probe"] == "logreg"
    assert {(m["features"], m["probe"], m["k"]) for m in data["mean"]} == {
        (s.features, s.probe, s.k) for s in task.scores
    }
    again = run_probing(tiny_lm, tiny_sae, HOOK, cfg, seed=0, tasks=[tiny_task()])
    assert again.to_json() == result.to_json()  # seeded: the same numbers and hashes


@pytest.mark.bad_input
def test_probing_config_refuses_splits_too_small_for_the_probes() -> None:
    with pytest.raises(ProbingError, match=r"n_per_class=8 .* 6 train and 2 test .*raise n_per_class"):
        ProbingConfig(n_per_class=8)
    with pytest.raises(ProbingError, match="unknown probing tasks"):
        ProbingConfig(tasks=("imdb",))  # type: ignore[arg-type]


@pytest.mark.bad_input
def test_run_probing_refuses_a_task_too_small_for_the_probes(tiny_lm: LoadedModel, tiny_sae: SAE) -> None:
    small = make_task("tiny", {"a": themed_texts(SCIENCE, 9, 0), "b": themed_texts(ROYAL, 9, 0)}, 9, 0.25, 0)
    with pytest.raises(ProbingError, match=r"task 'tiny': class 'a' has 7 train and 2 test texts"):
        run_probing(tiny_lm, tiny_sae, HOOK, ProbingConfig(ks=(1,)), seed=0, tasks=[small])


@pytest.mark.bad_input
def test_run_probing_refuses_an_sae_of_another_width(tiny_lm: LoadedModel) -> None:
    sae = build(SAEConfig("topk", 16, 64, k=4))
    with pytest.raises(ProbingError, match=r"SAE d_in=16 does not match the width 32 of model.layers.1"):
        run_probing(tiny_lm, sae, HOOK, ProbingConfig(), seed=0, tasks=[tiny_task()])


@pytest.mark.bad_input
def test_k_larger_than_the_features_is_an_error(tiny_lm: LoadedModel, tiny_sae: SAE) -> None:
    with pytest.raises(ProbingError, match="asks for 50 features but the hookpoint has 32 and the SAE 96"):
        run_probing(tiny_lm, tiny_sae, HOOK, ProbingConfig(ks=(1, 50)), seed=0, tasks=[tiny_task()])


# --- the real bundled model --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_separates_wikipedia_from_the_bible() -> None:
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.models.loading import BUNDLED_SMOLLM2
    from saelab.train.trainer import train

    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = "model.layers.15"
    windows = build_windows(DataConfig(max_docs=40, ctx_len=64), lm.tokenizer, seed=0)
    acts = collect(lm, windows, hookpoint, 2000, batch_size=16)
    tcfg = TrainConfig(expansion=2, k=16, epochs=2, batch_size=256, checkpoint_every=0)
    sae = train(acts.acts_ND, tcfg, seed=0).sae.eval()
    cfg = ProbingConfig(tasks=("wiki_vs_bible",), n_per_class=32, ctx_len=48, ks=(1, 5, 20))
    result = run_probing(lm, sae, hookpoint, cfg, seed=0)
    (task,) = result.tasks
    assert (task.n_train, task.n_test) == (48, 16)
    assert task.score("lm", "logreg").accuracy > 0.9
    assert 40 < task.mean_positions <= 46  # 48 tokens minus the first two (texts are >= 300 characters)
    assert all(0.0 <= s.accuracy <= 1.0 and 0.0 <= s.f1 <= 1.0 for s in task.scores)
    assert all(0 <= i < sae.cfg.d_sae for i in task.top_latents) and len(task.top_latents) == 20
    assert result.model_sha256 == lm.weights_sha256 and len(result.sae_sha256) == 64
    json.dumps(result.to_json())
