"""The results store: DuckDB over every run's manifest and score records (`saelab runs`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.autointerp.results import load_run_overall, run_score_files
from saelab.run.manifest import MANIFEST, RunError, read_manifest

STORE_DOC = """Tables of `open_store(root)` (one row per ...):
  runs     run folder: run, name, created, seed, saelab_version, git_commit, git_dirty, model, dataset,
           hookpoint, architecture, k, d_sae_expansion, stages, seconds, peak_rss_mib, ev, l0, dead_fraction,
           ce_loss_score, kl_score, config (the full config as a STRUCT: config.train.lr), hashes (STRUCT)
  stages   run and stage: run, stage, seconds, peak_rss_mib, finished, git_commit
  overall  run, explainer and scorer (pooled over latents): accuracy, precision, recall, specificity, f1,
           balanced_accuracy, auc, n_pos, n_neg, n_failed, n_latents
  scores   run, latent, explainer and scorer, read from the runs' score/scores.jsonl (predictions left out)"""

LIST_COLUMNS = (
    "name, created, model, architecture, k, seed, stages, round(seconds, 1) AS seconds, round(ev, 4) AS ev, "
    "round(l0, 2) AS l0, round(ce_loss_score, 4) AS ce_loss_score, run"
)
_EVAL_COLUMNS = ("explained_variance", "l0", "dead_fraction", "ce_loss_score", "kl_score")


def find_runs(root: Path | str) -> list[Path]:
    """Every run folder (a folder holding manifest.json) under `root`, `root` itself included."""
    return sorted(p.parent for p in Path(root).rglob(MANIFEST))


def _run_row(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    cfg = data.get("config", {})
    stages = data.get("stages", {})
    summary = stages.get("eval", {}).get("summary", {})
    row = {
        "run": str(folder),
        "name": folder.name,
        "created": data.get("created"),
        "seed": data.get("seed"),
        "saelab_version": data.get("saelab_version"),
        "git_commit": data.get("git_commit"),
        "git_dirty": data.get("git_dirty"),
        "model": cfg.get("model", {}).get("name"),
        "dataset": cfg.get("data", {}).get("dataset"),
        "hookpoint": stages.get("collect", {}).get("hookpoint"),
        "architecture": cfg.get("train", {}).get("architecture") if "train" in stages else None,
        "k": cfg.get("train", {}).get("k") if "train" in stages else None,
        "d_sae_expansion": cfg.get("train", {}).get("expansion") if "train" in stages else None,
        "stages": ",".join(stages),
        "seconds": sum(float(st.get("seconds") or 0) for st in stages.values()),
        "peak_rss_mib": max((float(st.get("peak_rss_mib") or 0) for st in stages.values()), default=None),
        **{("ev" if k == "explained_variance" else k): summary.get(k) for k in _EVAL_COLUMNS},
        "config": cfg,
        "hashes": data.get("hashes", {}),
    }
    return row


def _table_from_rows(con: Any, name: str, rows: list[dict[str, Any]], tmp: Path, schema: str) -> None:
    """A table from JSON rows (DuckDB infers nested STRUCTs); `schema` makes the empty table."""
    if not rows:
        con.execute(f"CREATE TABLE {name} ({schema})")
        return
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_json_auto(?, union_by_name = true)", [str(path)])
    # times are recorded in UTC; plain TIMESTAMPs read back into Python without a time-zone library
    for (col,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND data_type LIKE 'TIMESTAMP WITH%'",
        [name],
    ).fetchall():
        con.execute(f'ALTER TABLE {name} ALTER "{col}" TYPE TIMESTAMP')


def open_store(root: Path | str) -> Any:
    """An in-memory DuckDB connection over every run under `root` (tables: see STORE_DOC), for SQL queries."""
    import tempfile

    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    runs, stages, overall, score_files = [], [], [], []
    for folder in find_runs(root):
        data = read_manifest(folder / MANIFEST)  # one that is no manifest: one line naming it
        runs.append(_run_row(folder, data))
        for name, st in data.get("stages", {}).items():
            keys = ("seconds", "peak_rss_mib", "finished", "git_commit")
            stages.append({"run": str(folder), "stage": name, **{k: st.get(k) for k in keys}})
        for o in load_run_overall(folder) or []:
            overall.append({"run": str(folder), **{k: v for k, v in o.to_dict().items() if k != "macro"}})
        scores, _ = run_score_files(folder)
        if scores.exists():
            score_files.append({"run": str(folder), "path": str(scores.resolve())})
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _table_from_rows(con, "runs", runs, t, "run VARCHAR, name VARCHAR, created VARCHAR")
        _table_from_rows(con, "stages", stages, t, "run VARCHAR, stage VARCHAR, seconds DOUBLE")
        _table_from_rows(con, "overall", overall, t, "run VARCHAR, explainer VARCHAR, scorer VARCHAR")
        _table_from_rows(con, "_score_files", score_files, t, "run VARCHAR, path VARCHAR")
    if score_files:
        con.execute(
            "CREATE TABLE scores AS SELECT f.run, s.* EXCLUDE (predictions, filename) FROM read_json_auto(?, "
            "filename = true, union_by_name = true) s JOIN _score_files f ON s.filename = f.path",
            [[f["path"] for f in score_files]],
        )
    else:
        con.execute("CREATE TABLE scores (run VARCHAR, latent BIGINT, explainer VARCHAR, scorer VARCHAR)")
    return con


def query_runs(
    root: Path | str, where: str | None = None, sql: str | None = None
) -> tuple[list[str], list[tuple]]:
    """Column names and rows of `sql` over the store, or of the run listing filtered by `where`."""
    import duckdb

    con = open_store(root)
    query = (
        sql or f"SELECT {LIST_COLUMNS} FROM runs" + (f" WHERE {where}" if where else "") + " ORDER BY created"
    )
    try:
        rel = con.execute(query)
    except duckdb.Error as err:
        raise RunError(f"query failed: {err}\n{STORE_DOC}") from None
    return [d[0] for d in rel.description], rel.fetchall()
