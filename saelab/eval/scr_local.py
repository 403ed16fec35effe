"""SCR and TPP on the real datasets, read from a local `datasets.save_to_disk` folder (nothing is downloaded).

A folder holding `train` and `test` splits with SAEBench's column names is recognised by its columns:
- bias_in_bios (`LabHC/bias_in_bios`): `hard_text`, `profession` (int), `gender` (0 male, 1 female);
- Amazon reviews (`canrager/amazon_reviews_mcauley_1and5`): `text`, `category` (int), `rating` (1.0 or 5.0).
The SCR pairs and TPP classes are SAEBench's defaults for these datasets (`KINDS`); as in SAEBench, a TPP class
of n texts takes n / 2 of each value of the second column, per split (SAEBench's train_set_size 4,000 makes
2,000 per class: `--eval.scr-tpp.tpp-n-train 2000 --eval.scr-tpp.tpp-n-test 500`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab.eval.scr_data import ScrPair, ScrTppError, TppData, scr_pair


@dataclass(frozen=True)
class DatasetKind:
    """How SAEBench reads one real dataset."""

    name: str
    text: str
    column1: str
    column2: str
    column2_values: tuple[Any, Any]
    """SAEBench's (positive, negative) second-column values: (male, female), (1-star, 5-star)."""
    scr_pairs: tuple[tuple[str, str], ...]
    column1_ids: dict[str, int]
    """Names of the first column's ids that SCR pairs and TPP classes use."""
    tpp_classes: tuple[int, ...]


KINDS = (
    DatasetKind(
        "bias_in_bios", "hard_text", "profession", "gender", (0, 1),
        (("professor", "nurse"), ("architect", "journalist"), ("surgeon", "psychologist"), ("attorney", "teacher")),
        {"accountant": 0, "architect": 1, "attorney": 2, "dentist": 6, "filmmaker": 9, "journalist": 11,
         "nurse": 13, "professor": 21, "psychologist": 22, "surgeon": 25, "teacher": 26},
        (0, 1, 2, 6, 9),
    ),
    DatasetKind(
        "amazon_reviews", "text", "category", "rating", (1.0, 5.0),
        (("Books", "CDs_and_Vinyl"), ("Software", "Electronics"), ("Pet_Supplies", "Office_Products"),
         ("Industrial_and_Scientific", "Toys_and_Games")),
        {"Toys_and_Games": 1, "Cell_Phones_and_Accessories": 2, "Industrial_and_Scientific": 3, "Electronics": 6,
         "Office_Products": 11, "Pet_Supplies": 18, "Books": 24, "CDs_and_Vinyl": 26, "Software": 30},
        (1, 2, 3, 5, 6),
    ),
)  # fmt: skip
"""The datasets SAEBench's SCR/TPP run on, with its pairs and classes (`sae_bench/evals/scr_and_tpp`)."""


def open_local(folder: str) -> tuple[DatasetKind, dict[str, dict[str, list[Any]]]]:
    """(kind, split -> column -> values) of a `save_to_disk` folder; a folder that is no such dataset, lacks a
    split or lacks SAEBench's columns is one ScrTppError line naming what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise ScrTppError(
            f"--eval.scr-tpp.dataset {folder}: no such folder; pass a datasets.save_to_disk folder"
        )
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ScrTppError(
            "reading --eval.scr-tpp.dataset needs `datasets`: pip install 'saelab[data]'"
        ) from None
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ScrTppError(
            f"--eval.scr-tpp.dataset {folder} is not a datasets.save_to_disk folder ({err})"
        ) from None
    splits = {s: data[s] for s in ("train", "test") if s in getattr(data, "keys", lambda: ())()}
    if len(splits) < 2:
        raise ScrTppError(
            f"--eval.scr-tpp.dataset {folder} needs a `train` and a `test` split (a DatasetDict), as "
            "bias_in_bios and the Amazon reviews have"
        )
    columns = set(splits["train"].column_names) & set(splits["test"].column_names)
    for kind in KINDS:
        if {kind.text, kind.column1, kind.column2} <= columns:
            return kind, {s: {c: list(d[c]) for c in (kind.text, kind.column1, kind.column2)}
                          for s, d in splits.items()}  # fmt: skip
    wanted = " or ".join(f"{k.name} ({k.text}, {k.column1}, {k.column2})" for k in KINDS)
    raise ScrTppError(
        f"--eval.scr-tpp.dataset {folder} has columns {sorted(columns)}, not those of {wanted}; rename its "
        "columns to SAEBench's"
    )


def local_scr_pairs(folder: str, n_train: int, n_test: int, seed: int) -> list[ScrPair]:
    """SAEBench's SCR pairs of the dataset in `folder`, each split's quadrants from its own split."""
    kind, splits = open_local(folder)
    pairs = []
    for a, b in kind.scr_pairs:
        # One quadrant map for both splits: scr_pair cuts test then train texts from each quadrant, so the
        # train texts are drawn from the train split and the test ones from the test split by keying on split.
        quads: dict[tuple[str, str], list[str]] = {}
        for split, cols in splits.items():
            for text, c1, c2 in zip(cols[kind.text], cols[kind.column1], cols[kind.column2], strict=True):
                for name in (a, b):
                    if c1 == kind.column1_ids[name] and c2 in kind.column2_values:
                        gender = "male" if c2 == kind.column2_values[0] else "female"
                        quads.setdefault((f"{split}:{name}", gender), []).append(text)
        train = scr_pair(f"{a} / {b}", _prefixed(quads, "train"), a, b, ("male", "female"), n_train, 0, seed)
        test = scr_pair(f"{a} / {b}", _prefixed(quads, "test"), a, b, ("male", "female"), 0, n_test, seed)
        pairs.append(ScrPair(train.name, train.train, test.test))
    return pairs


def _prefixed(quads: dict[tuple[str, str], list[str]], split: str) -> dict[tuple[str, str], list[str]]:
    return {(p.split(":", 1)[1], g): t for (p, g), t in quads.items() if p.startswith(split + ":")}


def local_tpp(folder: str, n_train: int, n_test: int, seed: int) -> TppData:
    """SAEBench's TPP classes of the dataset in `folder`: per class and split, n // 2 texts of each second-column
    value (seeded)."""
    kind, splits = open_local(folder)
    names = {v: k for k, v in kind.column1_ids.items()}
    out: dict[str, list[tuple[str, ...]]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        cols = splits[split]
        for cls in kind.tpp_classes:
            texts: list[str] = []
            for value in kind.column2_values:
                pool = [t for t, c1, c2 in zip(cols[kind.text], cols[kind.column1], cols[kind.column2],
                                               strict=True) if c1 == cls and c2 == value]  # fmt: skip
                texts += _draw(pool, n // 2, seed, f"{kind.name} {split} class {names.get(cls, cls)} {value}")
            out[split].append(tuple(texts))
    classes = tuple(names.get(c, str(c)) for c in kind.tpp_classes)
    return TppData(classes, tuple(out["train"]), tuple(out["test"]))


def _draw(pool: Sequence[str], n: int, seed: int, what: str) -> list[str]:
    if len(pool) < n:
        raise ScrTppError(
            f"{what}: {len(pool)} texts, fewer than the {n} its probe needs; lower --eval.scr-tpp.tpp-n-train / "
            "--eval.scr-tpp.tpp-n-test"
        )
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
