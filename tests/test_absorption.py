"""First-letter feature absorption (saelab.eval.absorption): planted absorption and splitting recovered exactly, a
no-absorption control, the per-word formulas by hand, scikit-learn parity of the k-sparse probes, the vocabulary
and prompts on real tokenizers, the clear errors, and (slow) the bundled model end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import WORDS

from saelab.eval.absorption import LetterProbes, run_absorption, score_absorption, scored_letters
from saelab.eval.absorption_config import LETTERS, AbsorptionConfig, AbsorptionError
from saelab.eval.absorption_probes import SparseLatents, fit_nested_logistic, split_features, word_absorption
from saelab.eval.absorption_words import build_prompts, build_vocab, first_letter_prompt, word_activations
from saelab.models.loading import load_model
from saelab.sae.base import SAE, SAEConfig, SAEError, build


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> Any:
    """The fast tests' problems are tiny: one thread avoids OpenMP/BLAS hand-offs that dominate them on a loaded
    machine (0.9 s against 5.6 s for a planted run beside other jobs on 2 cores)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- planted data


class Planted(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sae: SAE
    main: dict[str, tuple[int, ...]]


def planted(
    absorbed_train: int, absorbed_test: int, n_train: int = 45, n_test: int = 15, seed: int = 0
) -> Planted:
    """Words of letters a-d in 64 dims, each x = u_letter + noise in a separate subspace, and a ReLU SAE built by hand:
    - 'a': main latent on u_a, inhibited by the token directions t_j of the absorbed a-words (x = u_a + t_j); each
      absorbed word has its own absorbing latent (encoder t_j, decoder (u_a + t_j)/sqrt 2), as in Chanin et al.;
    - 'b': split in two latents (b-words carry +h or -h, one latent per sign), so k-sparse probing needs k = 2;
    - 'c', 'd': one main latent each; plus latents of unrelated directions that fire on ~20% of words."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    basis = (
        torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float().T
    )  # orthonormal rows
    u = {c: basis[i] for i, c in enumerate("abcd")}
    h = basis[4]
    tok = basis[5 : 5 + absorbed_train + absorbed_test]
    rest = basis[5 + len(tok) :]
    enc, bias, dec = [], [], []

    def latent(e: torch.Tensor, b: float, w: torch.Tensor) -> int:
        enc.append(e)
        bias.append(b)
        dec.append(w / w.norm())
        return len(enc) - 1

    main = {
        "a": (latent(u["a"] - 2 * tok.sum(0), -0.5, u["a"]),),
        "b": (latent(u["b"] + h, -0.8, u["b"] + 0.5 * h), latent(u["b"] - h, -0.8, u["b"] - 0.5 * h)),
        "c": (latent(u["c"], -0.5, u["c"]),),
        "d": (latent(u["d"], -0.5, u["d"]),),
    }
    for t in tok:
        latent(1.3 * t, -0.3, u["a"] + t)
    for _ in range(8):
        latent(
            2 * rest.T @ torch.randn(len(rest), generator=g) / math.sqrt(len(rest)),
            -0.17,
            rest.T @ torch.randn(len(rest), generator=g),
        )

    def words(n: int, absorbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for c in "abcd":
            for i in range(n):
                x = u[c] + 0.1 * rest.T @ torch.randn(len(rest), generator=g)
                if c == "b":
                    x = x + (0.5 if i % 2 else -0.5) * h
                if c == "a" and i < len(absorbed):
                    x = x + absorbed[i]
                xs.append(x)
                ys.append(LETTERS.index(c))
        return torch.stack(xs), torch.tensor(ys)

    sae = build(SAEConfig("relu", d, len(enc)))
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.stack(enc).T)
        sae.b_enc_F.copy_(torch.tensor(bias))
        sae.W_dec_FD.copy_(torch.stack(dec))
        sae.b_dec_D.zero_()
    return Planted(*words(n_train, tok[:absorbed_train]), *words(n_test, tok[absorbed_train:]), sae, main)


CFG = AbsorptionConfig(letters="abcd", min_letters=4)


def run_planted(p: Planted, cfg: AbsorptionConfig = CFG) -> Any:
    probes = LetterProbes.fit(p.x_train, p.y_train, p.x_test, p.y_test, cfg, seed=0)
    return score_absorption(probes, p.sae, cfg, seed=0)


@pytest.mark.parametrize(("absorbed_train", "sparse_batch"), [(0, 4096), (10, 4096), (10, 32)])
def test_planted_absorption_and_splitting_are_recovered(absorbed_train: int, sparse_batch: int) -> None:
    p = planted(absorbed_train=absorbed_train, absorbed_test=5)
    r = run_planted(p, dataclasses.replace(CFG, sparse_probe_batch_size=sparse_batch))
    by = {row.letter: row for row in r.letters}
    assert all(row.probe_f1 == 1.0 and row.evaluated for row in r.letters)
    assert all(row.n_probe_true_positives == 15 for row in r.letters)
    # 5 of the 15 test a-words are absorbed: their main latent is off and one latent aligned with the probe fires.
    assert by["a"].main_latents == p.main["a"]
    assert by["a"].mean_absorption_fraction == pytest.approx(5 / 15)
    assert by["a"].full_absorption_rate == pytest.approx(5 / 15) and by["a"].n_full_absorption == 5
    # 'b' is split between two latents: F1 jumps from ~0.67 at k = 1 to 1 at k = 2, then stops rising.
    assert sorted(by["b"].main_latents) == sorted(p.main["b"]) and by["b"].num_split_features == 2
    assert by["b"].sparse_probe_f1[0] < 0.8 and by["b"].sparse_probe_f1[1] == 1.0
    for c in "bcd":
        assert by[c].mean_absorption_fraction == 0.0 and by[c].full_absorption_rate == 0.0
    assert by["c"].main_latents == p.main["c"] and by["d"].main_latents == p.main["d"]
    assert r.mean_absorption_fraction_score == pytest.approx((5 / 15) / 4)
    assert r.mean_full_absorption_score == pytest.approx((5 / 15) / 4)
    assert r.mean_num_split_features == pytest.approx(5 / 4)
    assert r.std_dev_num_split_features == pytest.approx(float(np.std([1, 2, 1, 1], ddof=1)))
    assert r.n_letters_evaluated == 4


def test_no_absorption_control_scores_zero() -> None:
    r = run_planted(planted(absorbed_train=0, absorbed_test=0), dataclasses.replace(CFG, letters=""))
    assert "".join(row.letter for row in r.letters) == "abcd"  # no letters named: those with enough words
    assert r.skipped_letters == LETTERS[4:]
    assert r.mean_absorption_fraction_score == 0.0 and r.mean_full_absorption_score == 0.0
    assert all(row.mean_absorption_fraction == 0.0 and row.full_absorption_rate == 0.0 for row in r.letters)
    assert [row.num_split_features for row in r.letters] == [1, 2, 1, 1]


def test_result_is_json_serialisable(tmp_path: Path) -> None:
    r = run_planted(planted(absorbed_train=0, absorbed_test=5))
    r.save(tmp_path / "absorption.json", sae_sha256="ab" * 32)
    back = json.loads((tmp_path / "absorption.json").read_text())
    assert back == {**json.loads(json.dumps(r.to_json())), "sae_sha256": "ab" * 32}
    assert back["letters"][0]["letter"] == "a" and back["letters"][0]["main_latents"] == list(
        r.letters[0].main_latents
    )


# ----------------------------------------------------------------------------------------------- the pieces


def _scores(
    probe_proj: list[float],
    acts: list[list[float]],
    dec_proj: list[float],
    cos: list[float],
    main: list[int],
    **kw: Any,
) -> tuple[list[float], list[bool]]:
    frac, full = word_absorption(
        torch.tensor(probe_proj),
        torch.tensor(acts),
        torch.tensor(dec_proj),
        torch.tensor(cos),
        main,
        AbsorptionConfig(**kw),
    )
    return frac.tolist(), full.tolist()


def test_word_absorption_by_hand() -> None:
    # Latent 0 is the main latent (dec . p = 1); latents 1-3 are candidate absorbers.
    dec, cos = [1.0, 0.5, 0.5, 0.05], [1.0, 0.5, 0.5, 0.05]
    frac, full = _scores(
        [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0],
        [
            [0.0, 1.2, 0.0, 0.0],  # main off, S = 0.6 >= 0.4 A: fraction 1, full absorption
            [0.5, 1.0, 0.0, 0.0],  # M = 0.5, S = 0.5: min(S, A - M) / (min + M) = 0.5; main fires, not full
            [0.5, 0.2, 0.0, 0.0],  # S = 0.1 < 0.4 A: none
            [1.2, 1.0, 0.0, 0.0],  # M >= A: none
            [
                0.0,
                0.0,
                0.0,
                20.0,
            ],  # latent 3's cos 0.05 < 0.1: no absorber (fraction 0), yet >= 0.025 for full
            [0.0, 2.0, 0.0, 0.0],  # A <= 0: none
            [0.2, 1.0, 1.0, 0.0],  # M = 0.2, S = 1.0 capped at A - M = 0.8: 0.8 / 1.0
        ],
        dec,
        cos,
        [0],
    )
    assert frac == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.8])
    assert full == [True, False, False, False, True, False, False]


def test_word_absorption_sums_at_most_max_absorbers() -> None:
    four = [[0.0, 0.3, 0.3, 0.3, 0.3]]  # each absorber adds 0.15 to the probe projection A = 1
    dec = cos = [1.0, 0.5, 0.5, 0.5, 0.5]
    assert _scores([1.0], four, dec, cos, [0])[0] == [1.0]  # S = 0.45 >= 0.4
    assert _scores([1.0], four, dec, cos, [0], max_absorbers=2)[0] == [0.0]  # S = 0.3 < 0.4


def test_split_feature_rule() -> None:
    assert split_features([0.5, 0.9, 0.91, 0.99], 0.03) == 2  # stops at the first rise <= 0.03
    assert split_features([0.5, 0.53, 0.9], 0.03) == 1  # a rise of exactly the threshold does not count
    assert split_features([0.2, 0.5, 0.8], 0.03) == 3
    assert split_features([0.0, 0.0], 0.03) == 1


def test_nested_logistic_equals_scikit_learn() -> None:
    """Each k-column fit equals scikit-learn's balanced LogisticRegression: exactly (up to solver tolerance) against a
    tight Newton-CG solve, and within lbfgs's default tolerance against the default solver SAEBench calls."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(300, 5, generator=g)) * 3
    x[torch.rand(300, 5, generator=g) < 0.7] = 0
    y = (torch.rand(300, generator=g) < 0.15).float()
    x[:, 1] += y  # one informative column
    W, b = fit_nested_logistic(x, y)
    for k in range(1, 6):
        assert bool((W[k - 1, k:] == 0).all())
        for ref, atol in (
            (LogisticRegression(class_weight="balanced", solver="newton-cg", tol=1e-10), 1e-5),
            (LogisticRegression(class_weight="balanced"), 2e-3),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # newton-cg's line search reports reaching machine precision
                ref.fit(x[:, :k].numpy(), y.numpy())
            np.testing.assert_allclose(W[k - 1, :k].numpy(), ref.coef_[0], atol=atol)
            assert float(b[k - 1]) == pytest.approx(float(ref.intercept_[0]), abs=atol)


def test_sparse_latents_match_dense() -> None:
    p = planted(absorbed_train=3, absorbed_test=2)
    lat = SparseLatents.encode(p.sae, p.x_test, batch_size=7)
    dense = p.sae.dense_latents(p.x_test).detach()
    rows = torch.tensor([5, 0, 59, 5])
    assert torch.equal(lat.dense(rows), dense[rows])
    ids = torch.tensor([3, 0, 9])
    assert torch.equal(lat.columns(ids), dense[:, ids])


# ----------------------------------------------------------------------------------------------- vocabulary and prompts


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, leading-space tokens marked with 'Ġ') trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["cat dog apple banana cherry has the first letter: A B C D", "a cat, 42 x-ray", "\n"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def test_vocab_keeps_alphabetic_tokens_with_their_leading_space(bpe_tokenizer: Any) -> None:
    words = build_vocab(bpe_tokenizer)
    texts = {w.text for w in words}
    assert {" cat", "cat", " apple", " banana"} <= texts
    assert all(t.strip().isalpha() and t.strip().isascii() and t.lstrip(" ") in (t, t[1:]) for t in texts)
    assert not {"<s>", " 42", "42", "-", ":"} & texts
    assert all(
        bpe_tokenizer.convert_ids_to_tokens(w.token_id) in (w.text, w.text.replace(" ", "Ġ")) for w in words
    )
    assert {w.letter for w in words if w.text == " apple"} == {"a"}


def test_vocab_on_the_tiny_word_level_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    words = build_vocab(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert [w.text for w in words] == [w for w in WORDS if w.isalpha()]  # digits and <unk>/<s>/</s> left out


def test_prompt_text() -> None:
    assert first_letter_prompt(" dog", [" cat", "apple"], "{word} has the first letter:") == (
        "\n cat has the first letter: C\napple has the first letter: A\n dog has the first letter:"
    )


def test_prompts_end_at_the_query_word(bpe_tokenizer: Any) -> None:
    words = [w for w in build_vocab(bpe_tokenizer) if len(w.text.strip()) > 2]
    cfg = AbsorptionConfig(icl_examples=3)
    prompts = build_prompts(bpe_tokenizer, words, cfg, np.random.default_rng(0))
    assert prompts.n_dropped + len(prompts.words) == len(words) and len(prompts.words) > 0
    for ids, w in zip(prompts.ids, prompts.words):
        assert ids[0] == bpe_tokenizer.bos_token_id and ids[-1] == w.token_id
        lines = bpe_tokenizer.decode(ids[1:]).split("\n")
        assert lines[0] == "" and lines[-1] == w.text and len(lines) == 5
        assert all(line.endswith(f" has the first letter: {line.strip()[0].upper()}") for line in lines[1:-1])
        assert all(not line.startswith(w.text + " has") for line in lines[1:-1])  # never its own example


def test_activations_at_the_word_equal_the_full_prompt_forward(tiny_model_dir: Path) -> None:
    """Batched, right-padded forwards that stop at the word equal one unpadded forward of the whole prompt."""
    from saelab.models.loading import capture, forward_until

    lm = load_model(str(tiny_model_dir), device="cpu")
    ids = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13, 14]]
    acts = word_activations(lm, "model.layers.2", ids, batch_size=2, desc="test")
    for i, p in enumerate(ids):
        full = torch.tensor([[*p, 15, 16, 17]])  # the words after the query cannot change its activation
        with torch.no_grad(), capture(lm.model, ["model.layers.2"]) as store:
            forward_until(lm.model, full)
        torch.testing.assert_close(
            acts[i], store["model.layers.2"][0, len(p) - 1].float(), atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------------------------- errors


def test_config_is_validated() -> None:
    for bad in (
        {"letters": "aB"},
        {"letters": "aa"},
        {"prompt_template": "no word here"},
        {"prompt_template": "{word} {other}"},
        {"letters": "abc", "min_letters": 4},
        {"min_letters": 27},
        {"min_letters": 1},
        {"test_fraction": 1.0},
        {"max_k": 0},
    ):
        with pytest.raises(AbsorptionError, match="absorption\\."):
            AbsorptionConfig(**bad)


@pytest.mark.bad_input
def test_too_few_words_for_a_letter_is_a_clear_error() -> None:
    y_train = torch.tensor([0] * 10 + [1] * 3 + [2] * 9)
    y_test = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    with pytest.raises(AbsorptionError, match=r"'b' \(3 train, 5 test\).*vocab_size"):
        scored_letters(y_train, y_test, AbsorptionConfig(letters="ab", min_letters=2))
    assert scored_letters(y_train, y_test, AbsorptionConfig(min_letters=2)) == ("ac", "b" + LETTERS[3:])
    with pytest.raises(AbsorptionError, match=r"only 2 letters have 5 words in each split \('ac'\)"):
        scored_letters(y_train, y_test, AbsorptionConfig(min_letters=3))
    p = planted(absorbed_train=0, absorbed_test=0, n_test=3)
    with pytest.raises(AbsorptionError, match="too few words"):
        run_planted(p)


@pytest.mark.bad_input
def test_too_few_letters_with_a_usable_probe_is_a_clear_error() -> None:
    p = planted(absorbed_train=0, absorbed_test=0)
    shuffled = p.y_train[torch.randperm(len(p.y_train), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(AbsorptionError, match="letters have a first-letter probe"):
        score_absorption(
            LetterProbes.fit(p.x_train, shuffled, p.x_test, p.y_test, CFG, seed=0), p.sae, CFG, seed=0
        )


@pytest.mark.bad_input
def test_sae_width_mismatch_is_a_clear_error(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu")
    wrong = build(SAEConfig("topk", 16, 64, k=4))  # the tiny model's residual stream is 32 wide
    with pytest.raises(SAEError, match=r"d_in=16 does not match the width 32 of model\.layers\.2"):
        run_absorption(lm, wrong, "layers.2", AbsorptionConfig(), seed=0)
    p = planted(absorbed_train=0, absorbed_test=0)
    probes = LetterProbes.fit(p.x_train, p.y_train, p.x_test, p.y_test, CFG, seed=0)
    with pytest.raises(SAEError, match="d_in=16 does not match the width 64 of the activations"):
        score_absorption(probes, wrong, CFG, seed=0)


@pytest.mark.bad_input
def test_run_absorption_on_a_vocabulary_too_small_for_the_letters(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu")
    sae = build(SAEConfig("topk", 32, 64, k=4))
    with pytest.raises(AbsorptionError, match="too few words for letter"):
        run_absorption(
            lm, sae, "layers.2", AbsorptionConfig(icl_examples=2, letters="cs", min_letters=2), seed=0
        )
    with pytest.raises(AbsorptionError, match="letters have 5 words in each split"):
        run_absorption(lm, sae, "layers.2", AbsorptionConfig(icl_examples=2), seed=0)


# ----------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_bundled_model_first_letters_are_linearly_decodable() -> None:
    """SmolLM2-135M at its middle layer, with a TopK SAE trained for seconds on ~2k corpus tokens."""
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.models.loading import BUNDLED_SMOLLM2
    from saelab.train.trainer import train

    start = time.time()
    lm = load_model(BUNDLED_SMOLLM2, device="cpu")
    hookpoint = "model.layers.15"
    windows = build_windows(DataConfig(max_docs=40), lm.tokenizer, seed=0)
    acts = collect(lm, windows, hookpoint, n_tokens=2000, batch_size=16)
    sae = train(acts.acts_ND, TrainConfig(expansion=2, k=16, epochs=2, batch_size=256), seed=0).sae
    cfg = AbsorptionConfig(
        vocab_size=400,
        letters="acps",
        icl_examples=1,  # the probe reads the word's own token; one example keeps prompts at 11 tokens
        batch_size=128,
        min_letters=2,
        min_probe_f1=0.3,
        min_words_per_letter=5,
    )
    r = run_absorption(lm, sae, "layers.15", cfg, seed=0)
    elapsed = time.time() - start

    assert r.hookpoint == hookpoint and r.n_train_words + r.n_test_words + r.n_dropped_words == 400
    assert r.example_prompt.count(" has the first letter: ") == 1
    # First-letter information is linearly decodable: each letter holds ~9% of the words, so a probe guessing
    # at that rate has F1 ~0.09.
    prevalence = np.mean([row.n_test_words / r.n_test_words for row in r.letters])
    mean_f1 = float(np.mean([row.probe_f1 for row in r.letters]))
    assert mean_f1 > 0.45 and mean_f1 > 4 * prevalence, [(row.letter, row.probe_f1) for row in r.letters]
    for row in r.letters:
        assert 0 <= row.mean_absorption_fraction <= 1 and 0 <= row.full_absorption_rate <= 1
        assert 1 <= row.num_split_features == len(row.main_latents) <= cfg.max_k
        assert all(0 <= i < sae.cfg.d_sae for i in row.main_latents) and len(set(row.main_latents)) == len(
            row.main_latents
        )
        assert 0 <= row.n_full_absorption <= row.n_probe_true_positives <= row.n_test_words
        assert len(row.sparse_probe_f1) == cfg.max_k and all(0 <= f <= 1 for f in row.sparse_probe_f1)
    scored = [row for row in r.letters if row.evaluated]
    assert r.n_letters_evaluated == len(scored) >= 2
    assert r.mean_absorption_fraction_score == pytest.approx(
        np.mean([row.mean_absorption_fraction for row in scored])
    )
    assert 0 <= r.mean_absorption_fraction_score <= 1 and 0 <= r.mean_full_absorption_score <= 1
    assert 1 <= r.mean_num_split_features <= cfg.max_k
    json.dumps(r.to_json())
    print(
        f"absorption slow test: {elapsed:.0f} s, probe F1 {mean_f1:.2f}, {r.to_json()['mean_absorption_fraction_score']:.3f}"
    )
