"""The stages over a run folder: each reads the previous stage's artifacts and writes its own.

`saelab demo` runs them all in one process (the subject model is loaded once); `saelab <stage> --run-dir R` runs
one on the artifacts already in R. Artifacts (relative to the run folder):

    data/windows.npz            token windows, exclusion mask, split          (collect)
    activations/acts.safetensors  training activations at the hookpoint       (collect, format=file)
    activations/store/            the same as sharded safetensors              (collect, format=store)
    sae/cfg.json, sae/sae.safetensors, sae/train_log.jsonl                      (train)
    sae-variants/<i>-<overrides>/   the SAEs of train.variants, same files    (train)
    eval/metrics.json, eval/compare.json (several SAEs on the same tokens),
    eval/probing.json, eval/absorption.json (when asked for)                  (eval)
    latents/cache.json, latents/shard-*.safetensors, latents/tokens.safetensors,
    latents/stats.safetensors                                                   (cache)
    samples/samples.json                                                       (sample)
    explain/explanations.jsonl                                                 (explain)
    score/scores.jsonl, score/scores_summary.json                              (score)
    llm/cache.sqlite            every LLM answer, so a rerun asks nothing twice   (explain, score)
    report.md, report.html, plots/                                             (report)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.activations.store import (
    Activations,
    ActivationStore,
    CollectProgress,
    collect_to_store,
    iter_window_batches,
)
from saelab.autointerp.llm.cache import CachedClient, ResponseCache
from saelab.config import CollectConfig, RunConfig, from_dict, to_dict
from saelab.data.windows import TokenWindows, build_windows
from saelab.eval.absorption import (
    AbsorptionConfig,
    AbsorptionError,
    AbsorptionResult,
    collect_letter_probes,
    score_absorption,
)
from saelab.eval.core import EvalResult, evaluate_many, mark_dominated
from saelab.eval.probing import ProbingConfig, ProbingError, ProbingResult, run_probing
from saelab.latents.build import (
    CacheProgress,
    Chunk,
    build_cache,
    check_n_tokens,
    chunks_from_file,
    chunks_from_store,
)
from saelab.latents.cache import MANIFEST, STATS, TOKENS, CacheError, LatentCache
from saelab.latents.sampling import SampleSet, sample
from saelab.models.loading import LoadedModel, load_model, resolve_hookpoint
from saelab.run import atomic
from saelab.run.manifest import Run
from saelab.sae import base as sae_lib
from saelab.sae.formats import import_sae
from saelab.train.distributed import DistInfo
from saelab.train.trainer import TrainResult, train_many

log = logging.getLogger(__name__)

WINDOWS = "data/windows.npz"
ACTS = "activations/acts.safetensors"
STORE = "activations/store"
ROWS = "activations/rows"
SAE_DIR = "sae"
VARIANTS_DIR = "sae-variants"
METRICS = "eval/metrics.json"
COMPARE = "eval/compare.json"
PROBING = "eval/probing.json"
ABSORPTION = "eval/absorption.json"
LATENTS = "latents"
SAMPLES = "samples/samples.json"
EXPLANATIONS = "explain/explanations.jsonl"
SCORES = "score"
LLM_CACHE = "llm/cache.sqlite"


@dataclass
class Session:
    """State shared by stages run in one process (the loaded subject model)."""

    cfg: RunConfig
    run: Run
    _lm: LoadedModel | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.run.folder

    def lm(self) -> LoadedModel:
        if self._lm is None:
            m = self.cfg.model
            if m.threads:
                torch.set_num_threads(m.threads)
            self._lm = load_model(m.name, m.dtype, m.device)
            self.run.set_hash("model", self._lm.weights_sha256)
        return self._lm


def open_session(cfg: RunConfig, *, new: bool) -> Session:
    """A session on `cfg.run_dir`. A new run records `cfg`; otherwise the model and data config come from the
    manifest (so a later stage always uses the model the activations came from), and `cfg`'s own sections for
    the later stages are kept."""
    if new:
        return Session(cfg, Run.create(cfg.run_dir, to_dict(cfg), cfg.seed))
    run = Run.open(cfg.run_dir)
    run.check_writable()
    recorded: RunConfig = from_dict(RunConfig, run.data["config"])
    merged = dataclasses.replace(
        cfg, seed=recorded.seed, model=recorded.model, data=recorded.data, collect=recorded.collect
    )
    return Session(merged, run)


def stage_collect(s: Session) -> None:
    """Windows and activations. Rows are written shard by shard (for `format=file` into `activations/rows`, joined
    into one file at the end), so `--collect.resume` after a kill collects only the rows after the last
    finished shard."""
    cfg = s.cfg
    lm = s.lm()
    hookpoint = resolve_hookpoint(lm.model, cfg.collect.hookpoint)
    c = cfg.collect
    row_bytes = int(lm.model.config.hidden_size) * getattr(torch, c.store_dtype).itemsize + 8
    s.run.check_free_space(
        c.n_train_tokens * row_bytes * (2 if c.format == "file" else 1),  # a file collect is written twice
        f"collecting {c.n_train_tokens} tokens",
        "lower --collect.n-train-tokens or pass --collect.store-dtype float16",
    )
    with s.run.stage("collect", {"data": to_dict(cfg.data), "collect": to_dict(cfg.collect)}) as rec:
        windows = build_windows(cfg.data, lm.tokenizer, cfg.seed)
        (s.folder / "data").mkdir(exist_ok=True)
        windows.save(s.folder / WINDOWS)
        (s.folder / "activations").mkdir(exist_ok=True)
        rec["outputs"].append(WINDOWS)
        folder = s.folder / (STORE if c.format == "store" else ROWS)
        shutil.rmtree(folder, ignore_errors=True)
        key = _collect_key(lm, windows, hookpoint, c)
        progress = CollectProgress()
        store = collect_to_store(
            lm, windows, hookpoint, c.n_train_tokens, c.batch_size, folder, c.shard_rows,
            getattr(torch, c.store_dtype), key=key, resume=c.resume, progress=progress,
        )  # fmt: skip
        if c.format == "store":
            rec["outputs"] += sorted(str(p.relative_to(s.folder)) for p in folder.iterdir())
        else:
            store.load().save(s.folder / ACTS)
            shutil.rmtree(folder)
            rec["outputs"].append(ACTS)
        if progress.resumed_rows:
            log.info("collect: resumed with %d rows already stored", progress.resumed_rows)
        rec.update(
            hookpoint=hookpoint, format=c.format, n_tokens=store.n_rows, n_windows=int(windows.tokens.shape[0]),
            resumed_rows=progress.resumed_rows, forward_batches=progress.forward_batches,
        )  # fmt: skip
    s.run.set_hash("data", windows.sha256())


def _collect_key(lm: LoadedModel, windows: TokenWindows, hookpoint: str, c: CollectConfig) -> str:
    """What decides the collected rows: an interrupted collect is continued only under the same key."""
    fields = {k: v for k, v in to_dict(c).items() if k not in ("resume", "format")}
    text = json.dumps([lm.weights_sha256, windows.sha256(), hookpoint, fields], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _hookpoint(s: Session) -> str:
    return str(s.run.require("collect", "collect")["hookpoint"])


def variant_dir(i: int, text: str) -> str:
    """Folder (relative to the run) of `train.variants[i]`."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]
    return f"{VARIANTS_DIR}/{i + 1}-{slug}"


def stage_train(s: Session) -> None:
    """Train the SAE of `train` and those of `train.variants` together, one pass over the activations."""
    s.run.verify("collect", "collect")
    data: torch.Tensor | ActivationStore
    if s.run.require("collect", "collect").get("format") == "store":
        data = ActivationStore(s.folder / STORE)
    else:
        data = Activations.load(s.folder / ACTS).acts_ND.float()
    cfgs = [s.cfg.train, *s.cfg.train.variant_configs()]
    folders = [s.folder / SAE_DIR] + [
        s.folder / variant_dir(i, v) for i, v in enumerate(s.cfg.train.variants)
    ]

    def fit() -> list[TrainResult]:
        return train_many(
            data,
            cfgs,
            s.cfg.seed,
            _hookpoint(s),
            s.cfg.model.name,
            [f / "train_log.jsonl" for f in folders],
            [f / "checkpoints" for f in folders],
        )

    if (
        not DistInfo.current().is_main
    ):  # under torchrun, rank 0 alone writes logs, checkpoints, SAEs, manifest
        fit()
        return
    with s.run.stage("train", {"train": to_dict(s.cfg.train)}) as rec:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        results = fit()
        summaries = []
        for folder, result in zip(folders, results, strict=True):
            sae_lib.save(result.sae, folder)
            rel = folder.relative_to(s.folder)
            rec["outputs"] += [f"{rel}/cfg.json", f"{rel}/sae.safetensors"]
            summaries.append(
                {
                    "folder": str(rel),
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "final_loss": result.final_loss,
                    "dead_fraction": result.dead_fraction,
                    "resumed_from": result.resumed_from,
                    "resample_events": [e._asdict() for e in result.resample_events],
                }
            )
        rec.update({k: v for k, v in summaries[0].items() if k != "folder"})
        if len(summaries) > 1:
            rec["variants"] = summaries[1:]
    s.run.set_hash("sae", sae_lib.file_sha256(s.folder / SAE_DIR))


def _load_sae(s: Session) -> sae_lib.SAE:
    s.run.verify("train", "train")
    return sae_lib.load(s.folder / SAE_DIR)


def stage_eval(s: Session) -> None:
    """Core metrics of the run's SAE; with train.variants or eval.compare, of every SAE on the same tokens. A run
    that was collected but not trained evaluates the `eval.compare` SAEs alone (SAEs trained elsewhere)."""
    named = []
    if "train" in s.run.stages or not s.cfg.eval.compare:
        named.append(("sae", _load_sae(s)))
        for v in s.run.require("train", "train").get("variants", []):
            named.append((v["folder"], sae_lib.load(s.folder / v["folder"])))
    else:
        s.run.verify("collect", "collect")
    for folder in s.cfg.eval.compare:
        named.append((folder, import_sae(Path(folder))))
    lm = s.lm()
    windows = TokenWindows.load(s.folder / WINDOWS)
    with s.run.stage("eval", {"eval": to_dict(s.cfg.eval)}) as rec:
        saes = [sae.to(lm.device) for _, sae in named]
        results = evaluate_many(lm, saes, windows, _hookpoint(s), s.cfg.eval)
        (s.folder / "eval").mkdir(exist_ok=True)
        # Each result file names what it was computed from, so it stays attributable when copied out of the run.
        source = {"model_sha256": lm.weights_sha256, "hookpoint": _hookpoint(s)}
        hashes = [sae_lib.params_sha256(sae) for sae in saes]
        data_sha256 = windows.sha256()
        results[0].save(
            s.folder / METRICS,
            sae=named[0][0],
            sae_config=saes[0].cfg.to_json(),
            **source,
            sae_sha256=hashes[0],
            data_sha256=data_sha256,
        )
        rec["outputs"].append(METRICS)
        rec["summary"] = _summary(results[0])
        with _cli_names():
            absorption = _absorption(s, lm, saes) if s.cfg.eval.absorption else []
            probing = _probing(s, lm, saes[0]) if s.cfg.eval.probing else None
        if absorption:
            absorption[0].save(s.folder / ABSORPTION, **source, sae_sha256=hashes[0])
            rec["outputs"].append(ABSORPTION)
            rec["summary"]["mean_absorption_fraction_score"] = absorption[0].mean_absorption_fraction_score
        if probing is not None:
            probing.save(s.folder / PROBING)
            rec["outputs"].append(PROBING)
        if len(named) > 1:
            entries = [
                {
                    "name": name,
                    "architecture": sae.architecture,
                    "d_sae": sae.cfg.d_sae,
                    "sae_sha256": h,
                    **_summary(r),
                }
                for (name, sae), h, r in zip(named, hashes, results, strict=True)
            ]
            for entry, a in zip(entries, absorption, strict=False):
                entry["mean_absorption_fraction_score"] = a.mean_absorption_fraction_score
            atomic.write_json(
                s.folder / COMPARE, {**source, "data_sha256": data_sha256, "saes": mark_dominated(entries)}
            )
            rec["outputs"].append(COMPARE)


_CLI_NAMES = {
    "probing.n_per_class": "--eval.probing-n-per-class",
    "absorption.vocab_size": "--eval.absorption-vocab-size",
}
"""Settings the library's probing/absorption errors name, as the eval stage's flags spell them."""


@contextlib.contextmanager
def _cli_names() -> Iterator[None]:
    """Re-raise probing/absorption errors with the settings they name spelt as the eval stage's flags, so the fix
    they advise can be typed as it reads. The config settings only the library exposes keep their names."""
    try:
        yield
    except (ProbingError, AbsorptionError) as err:
        message = str(err)
        for name, flag in _CLI_NAMES.items():
            message = message.replace(name, flag)
        raise type(err)(message) from err


def _probing(s: Session, lm: LoadedModel, sae: sae_lib.SAE) -> ProbingResult:
    d = s.cfg.data
    width = min(sae.cfg.d_in, sae.cfg.d_sae)  # a top-k probe needs k features on both sides
    ks = tuple(k for k in ProbingConfig().ks if k <= width)
    if len(ks) < len(ProbingConfig().ks):
        log.warning("probing: top-k probes with k <= %d only (the features are %d wide)", width, width)
    cfg = ProbingConfig(
        tasks=s.cfg.eval.probing,
        n_per_class=s.cfg.eval.probing_n_per_class,
        ctx_len=d.ctx_len,
        ks=ks,
        exclude_first=d.exclude_first,
        exclude_special=d.exclude_special,
    )
    return run_probing(lm, sae, _hookpoint(s), cfg, s.cfg.seed)


def _absorption(s: Session, lm: LoadedModel, saes: list[sae_lib.SAE]) -> list[AbsorptionResult]:
    """First-letter absorption of every SAE; the forwards and letter probes are shared (one hookpoint)."""
    cfg = AbsorptionConfig(vocab_size=s.cfg.eval.absorption_vocab_size)
    probes = collect_letter_probes(lm, _hookpoint(s), cfg, s.cfg.seed)
    return [score_absorption(probes, sae, cfg, s.cfg.seed) for sae in saes]


def _summary(result: EvalResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_json().items() if k != "log10_frequency"}


def stage_cache(s: Session) -> None:
    """Cache the SAE's latents over `cache.n_tokens` tokens of `cache.dataset_split`, in bounded memory;
    `--cache.resume` continues a killed build from its last spilled run."""
    sae = _load_sae(s)
    s.run.verify("collect", "collect")
    c = s.cfg.cache
    windows = TokenWindows.load(s.folder / WINDOWS)
    with s.run.stage("cache", {"cache": to_dict(c)}) as rec:
        progress = CacheProgress()
        cache = build_cache(
            sae, _cache_chunks(s, windows), s.folder / LATENTS, c, _sae_sha256(s), windows.sha256(), progress
        )
        if progress.resumed_tokens:
            log.info("cache: resumed with %d tokens already encoded", progress.resumed_tokens)
        rec["outputs"] += [f"{LATENTS}/{name}" for name in (MANIFEST, STATS, TOKENS)]
        rec["outputs"] += [f"{LATENTS}/{shard.file}" for shard in cache.info.shards]
        rec.update(cache.summary())
        rec.update(resumed_tokens=progress.resumed_tokens, encoded_chunks=progress.encoded_chunks)


def _sae_sha256(s: Session) -> str:
    """sha256 of the run's SAE file as it is now (a retrained SAE has a new one)."""
    return sae_lib.file_sha256(s.folder / SAE_DIR)


def _cache_chunks(s: Session, windows: TokenWindows) -> Callable[[int], Iterator[Chunk]]:
    """The cached split's activations in chunks from a token on: collect's artifacts for `train`, the model
    for `eval`."""
    c = s.cfg.cache
    if c.dataset_split == "train":
        if s.run.require("collect", "collect").get("format") == "store":
            store = ActivationStore(s.folder / STORE)
            return functools.partial(chunks_from_store, store, c.batch_size, c.n_tokens)
        return functools.partial(chunks_from_file, s.folder / ACTS, c.batch_size, c.n_tokens)
    available = int(windows.keep[windows.eval_idx].sum())
    n = check_n_tokens(c.n_tokens, available, "eval", "raise --data.eval-fraction or use a larger corpus")
    return lambda start: _eval_chunks(s.lm(), windows, _hookpoint(s), n, s.cfg.collect.batch_size, start)


def _eval_chunks(
    lm: LoadedModel, windows: TokenWindows, hookpoint: str, n: int, batch: int, start: int = 0
) -> Iterator[Chunk]:
    """Kept positions of the held-out windows, in order, until `n` tokens; from token `start` on, which must
    begin a batch of windows (where a resumed cache build stops): the batches before it are not run."""
    if start >= n:
        return
    idx = windows.eval_idx
    before = windows.kept_before_batches(idx, batch)
    first = int(np.searchsorted(before, start))
    if first == len(before) or before[first] != start:
        raise CacheError(f"token {start} does not begin a batch of held-out windows; rebuild without resume")
    done = start
    for idx_b, a_BTD in iter_window_batches(
        lm, windows, idx[first * batch :], hookpoint, batch, "cache (eval)"
    ):
        keep = windows.keep[idx_b]
        w, p = keep.nonzero()
        take = min(len(w), n - done)
        acts = a_BTD[torch.as_tensor(keep, device=a_BTD.device)]
        yield acts[:take], idx_b[w[:take]].astype(np.int32), p[:take].astype(np.int32)
        done += take
        if done >= n:
            return


def stage_sample(s: Session) -> None:
    s.run.verify("cache", "cache")
    windows = TokenWindows.load(s.folder / WINDOWS)
    cache = LatentCache.open(s.folder / LATENTS, _sae_sha256(s), windows.sha256())
    tokenizer = _tokenizer(s)

    @functools.cache
    def token_str(t: int) -> str:
        return str(tokenizer.decode([t]))

    embed = None
    if s.cfg.sample.non_activating_source == "similar":
        from saelab.autointerp.embed import Embedder

        embed = Embedder().embed
    with s.run.stage("sample", {"sample": to_dict(s.cfg.sample)}) as rec:
        samples = sample(cache, windows.tokens, token_str, s.cfg.sample, s.cfg.seed, embed)
        (s.folder / "samples").mkdir(exist_ok=True)
        samples.save(s.folder / SAMPLES)
        rec["outputs"].append(SAMPLES)
        rec.update(samples.summary())


def _tokenizer(s: Session) -> Any:
    if s._lm is not None:
        return s._lm.tokenizer
    from transformers import AutoTokenizer

    from saelab.models.loading import _bundled_cache

    name = s.cfg.model.name
    source = str(_bundled_cache(name)) if name.startswith("bundled:") else name
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def _client(s: Session) -> Any:
    from saelab.autointerp.llm import make_client, run_sync

    cfg = s.cfg.llm
    shared = None
    if not cfg.url and cfg.local_model == s.cfg.model.name:
        shared = s.lm()  # the bundled chat model is the subject model: load it once
    client: Any = make_client(cfg, shared)
    client = CachedClient(client, ResponseCache(s.folder / LLM_CACHE) if cfg.cache else None)
    if hasattr(client, "check"):
        run_sync(client.check(), client)  # before any work: an unreachable server is one clear error
    return client


def _llm_counts(client: Any) -> dict[str, int]:
    """Real LLM requests, their tokens and the cache hits of a stage, for its manifest record."""
    if isinstance(client, CachedClient):
        return {
            "llm_calls": client.calls,
            "llm_cache_hits": client.hits,
            "llm_prompt_tokens": client.prompt_tokens,
            "llm_completion_tokens": client.completion_tokens,
        }
    return {}


def stage_explain(s: Session) -> None:
    from saelab.autointerp.explain import run_explain

    s.run.verify("sample", "sample")
    samples = SampleSet.load(s.folder / SAMPLES)
    needs_llm = any(e != "token_stats" for e in s.cfg.explain.explainers)
    client = _client(s) if needs_llm else None
    with s.run.stage("explain", {"explain": to_dict(s.cfg.explain), "llm": to_dict(s.cfg.llm)}) as rec:
        (s.folder / "explain").mkdir(exist_ok=True)
        records = run_explain(samples, s.cfg.explain, client, s.folder / EXPLANATIONS, s.cfg.llm.temperature)
        rec["outputs"].append(EXPLANATIONS)
        rec.update(
            n_explanations=len(records),
            n_failed=sum(not r.ok for r in records),
            n_failed_requests=sum(r.request_failed for r in records),
            model=getattr(client, "model_name", "none"),
            **_llm_counts(client),
        )


def stage_score(s: Session) -> None:
    from saelab.autointerp.explain import load_explanations
    from saelab.autointerp.score import run_score
    from saelab.autointerp.scorers import llm_scorers

    s.run.verify("sample", "sample")
    s.run.verify("explain", "explain")
    samples = SampleSet.load(s.folder / SAMPLES)
    explanations = load_explanations(s.folder / EXPLANATIONS)
    needs_llm = any(x in llm_scorers() for x in s.cfg.score.scorers)
    client = _client(s) if needs_llm else None
    with s.run.stage("score", {"score": to_dict(s.cfg.score), "llm": to_dict(s.cfg.llm)}) as rec:
        out = s.folder / SCORES
        out.mkdir(exist_ok=True)
        summary = run_score(samples, explanations, s.cfg.score, client, out, s.cfg.seed)
        rec.update(summary.failures())
        rec["outputs"] += [f"{SCORES}/scores.jsonl", f"{SCORES}/scores_summary.json"]
        rec["model"] = getattr(client, "model_name", "none")
        rec.update(_llm_counts(client))


def stage_report(s: Session) -> Path:
    from saelab.report.run_report import write_report

    with s.run.stage("report", {"report": to_dict(s.cfg.report)}) as rec:
        paths = write_report(s.run, s.cfg.report)
        rec["outputs"] += [str(p.relative_to(s.folder)) for p in paths]
    return s.folder / "report.md"


STAGES = {
    "collect": stage_collect,
    "train": stage_train,
    "eval": stage_eval,
    "cache": stage_cache,
    "sample": stage_sample,
    "explain": stage_explain,
    "score": stage_score,
}


def run_all(cfg: RunConfig) -> Path:
    """Every stage in order, then the report; returns the report's path."""
    s = open_session(cfg, new=True)
    for name, fn in STAGES.items():
        log.info("stage %s", name)
        fn(s)
    return stage_report(s)
