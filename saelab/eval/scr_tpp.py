"""SCR (spurious correlation removal) and TPP (targeted probe perturbation), as SAEBench defines them (Karvonen et
al. 2025, `evals/scr_and_tpp`), repeated over seeds with the reseed noise beside every number.

Both train linear probes on mean-pooled LM activations at the SAE's hookpoint, choose the SAE latents most tied
to a class by probe attribution, zero-ablate the top n of them (n in `N_VALUES`) and re-test the probes on the
ablated activations (`scr_probes.py`: probe, attribution, ablation; `scr_data.py` / `scr_local.py`: the data).

- SCR, per profession pair: a *biased* probe trained on A-male against B-female (gender and profession agree),
  and *oracle* probes on the balanced gender and profession sets. Direction 1 ablates the gender probe's top
  latents and measures the biased probe on the profession test set; direction 2 ablates the profession probe's
  and measures it on the gender set. Score = (acc_ablated - acc_biased) / (acc_oracle - acc_biased) (0 when the
  denominator is under 0.001); SAEBench's headline `scr_metric` takes direction 1 when the biased probe is worse
  on profession than on gender (it leans on gender, so removing gender should help), else direction 2 (saelab:
  direction 1 on a tie, which SAEBench leaves undefined). Averaged over the pairs.
- TPP, per class i of C: one probe per class (class against the others, SAEBench's negatives); ablate class i's
  top latents; total = (clean_i - ablated_i) - mean_{j != i}(clean_j - ablated_j), the accuracy drop on the
  targeted class against the others; averaged over the classes.

Every seed (`seeds`) redraws the train/test subsample and the probes' initialisation and batch order; the texts
of all seeds run through the model once. The result holds each seed's numbers and the spread of the headline
ones (`saelab.eval.noise`).

Use: `run_scr_tpp(lm, sae, hookpoint, ScrTppSettings(), seeds=(0, 1, 2)).save(path)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saelab.eval.noise import Spread, spread
from saelab.eval.probing_features import PooledFeatures, pooled_features, tokenize
from saelab.eval.scr_data import ScrPair, ScrTppError, TppData, dataset_name, wiki_scr_pairs, wiki_tpp
from saelab.eval.scr_local import local_scr_pairs, local_tpp
from saelab.eval.scr_probes import (
    LinearProbe,
    ProbeSettings,
    Rows,
    ablate,
    latent_effects,
    rows_of,
    top_n,
    tpp_negatives,
    train_probe,
)
from saelab.models.loading import LoadedModel, hookpoint_width
from saelab.run import atomic
from saelab.run.records import load_json
from saelab.sae.base import SAE, params_sha256

N_VALUES = (2, 5, 10, 20, 50, 100, 500)
"""Latents ablated, as SAEBench reports."""
SCR_MIN_DENOMINATOR = 0.001
"""SAEBench's floor on acc_oracle - acc_biased below which the SCR score is 0."""
N_LATENTS_KEPT = 20
"""Top latents recorded per probe in the result."""


@dataclass(frozen=True)
class ScrTppSettings:
    """What SCR/TPP run on and how (`saelab eval --eval.scr-tpp.*` builds it)."""

    scr: bool = True
    tpp: bool = True
    dataset: str = ""
    """"" = the bundled Wikipedia tasks; else a `datasets.save_to_disk` folder (`scr_local.py`)."""
    n_values: tuple[int, ...] = N_VALUES
    scr_n_train: int = 64
    """Texts per SCR probe set and split (m = n / 4 per quadrant; SAEBench: 4,000 / 1,000)."""
    scr_n_test: int = 28
    tpp_n_train: int = 128
    """Texts per TPP class and split (SAEBench: 2,000 / 500)."""
    tpp_n_test: int = 32
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    ctx_len: int = 128
    batch_size: int = 16
    """Texts per forward pass."""
    exclude_first: int = 2
    """Leading positions left out of the pooled means (the SAE's data.exclude_first)."""
    exclude_special: bool = True
    """Also leave out special tokens (SAEBench masks BOS, EOS and padding)."""


@dataclass(frozen=True)
class ScrScore:
    """One pair's SCR scores with the top n latents ablated."""

    n: int
    dir1: float
    """Gender latents ablated, biased probe on the profession test set."""
    dir2: float
    """Profession latents ablated, biased probe on the gender test set."""
    metric: float
    """The direction SAEBench's `scr_metric` takes (`ScrPairResult.direction`)."""


@dataclass(frozen=True)
class ScrPairResult:
    """SCR of one profession pair at one seed."""

    name: str
    n_train: int
    n_test: int
    profession_acc: float
    """Oracle profession probe on the profession test set."""
    gender_acc: float
    biased_on_profession_acc: float
    biased_on_gender_acc: float
    direction: int
    gender_latents: tuple[int, ...]
    """Top gender-probe latents by attribution, largest first."""
    profession_latents: tuple[int, ...]
    scores: tuple[ScrScore, ...]


@dataclass(frozen=True)
class TppScore:
    """One class's TPP with its top n latents ablated."""

    n: int
    total: float
    """intended - unintended."""
    intended: float
    """Accuracy drop of the targeted class's probe."""
    unintended: float
    """Mean accuracy drop of the other classes' probes."""


@dataclass(frozen=True)
class TppClassResult:
    name: str
    n_train: int
    n_test: int
    clean_acc: float
    latents: tuple[int, ...]
    scores: tuple[TppScore, ...]


@dataclass(frozen=True)
class SeedResult:
    """SCR and TPP at one seed."""

    seed: int
    data_sha256: str
    """Hash of this seed's sets (token ids in order, per probe)."""
    scr: tuple[ScrPairResult, ...]
    tpp: tuple[TppClassResult, ...]
    scr_metric: dict[int, float]
    """n -> `scr_metric` averaged over the pairs (SAEBench's `scr_metric_threshold_n`)."""
    tpp_metric: dict[int, float]
    """n -> TPP total averaged over the classes (SAEBench's `tpp_threshold_n_total_metric`)."""


@dataclass(frozen=True)
class ScrTppResult:
    """SCR/TPP of one SAE over seeds, with what it was computed from."""

    settings: ScrTppSettings
    dataset: str
    hookpoint: str
    model_sha256: str
    sae_sha256: str
    data_sha256: str
    """Hash of every seed's `data_sha256`."""
    excluded: str
    seeds: tuple[SeedResult, ...]
    noise: dict[str, Spread]
    """`scr.metric_n{n}` / `tpp.total_n{n}` -> spread over the seeds."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> ScrTppResult:
        return load_json(path, cls)


SCR_TPP = "eval/scr_tpp.json"
"""The run's SCR/TPP result, relative to the run folder."""


def load_run_scr_tpp(run_folder: Path) -> ScrTppResult | None:
    path = run_folder / SCR_TPP
    return ScrTppResult.load(path) if path.exists() else None


# --- one seed ----------------------------------------------------------------------------------------------------


class Features(NamedTuple):
    """Pooled features of every text, with the SAE's decoder."""

    pooled: PooledFeatures
    row_of: dict[str, int]
    W_dec_FD: np.ndarray
    ids: list[list[int]]


def scr_score(changed: float, original: float, clean: float) -> float:
    """SAEBench's normalised SCR score."""
    return 0.0 if clean - original < SCR_MIN_DENOMINATOR else (changed - original) / (clean - original)


def _scr_pair(
    pair: ScrPair, f: Features, s: ScrTppSettings, seed: int, probes: dict[str, LinearProbe] | None = None
) -> ScrPairResult:
    """One pair's SCR; `probes` (gender, profession, biased) replace the trained ones (the parity test's)."""
    x_ND, z_NF, W = f.pooled.lm_ND, f.pooled.sae_NF, f.W_dec_FD
    kinds = ("gender", "profession", "biased")
    tr = {k: rows_of(getattr(pair.train, k), f.row_of) for k in kinds}
    te = {k: rows_of(getattr(pair.test, k), f.row_of) for k in kinds}
    if probes is None:
        probes = {k: train_probe(x_ND[tr[k].idx_N], tr[k].y_N, s.probe, seed * 31 + i)
                  for i, k in enumerate(kinds)}  # fmt: skip

    def acc(probe: LinearProbe, rows: Rows, latents: np.ndarray | None = None) -> float:
        x = x_ND[rows.idx_N] if latents is None else ablate(x_ND[rows.idx_N], z_NF[rows.idx_N], W, latents)
        return probe.accuracy(x, rows.y_N)

    clean_prof, clean_gender = (
        acc(probes["profession"], te["profession"]),
        acc(probes["gender"], te["gender"]),
    )
    orig1, orig2 = acc(probes["biased"], te["profession"]), acc(probes["biased"], te["gender"])
    effects = {k: latent_effects(z_NF[tr[k].idx_N], tr[k].y_N, probes[k], W, scr=True)
               for k in ("gender", "profession")}  # fmt: skip
    direction = 1 if orig1 <= orig2 else 2
    scores = []
    for n in s.n_values:
        d1 = scr_score(
            acc(probes["biased"], te["profession"], top_n(effects["gender"], n)), orig1, clean_prof
        )
        d2 = scr_score(
            acc(probes["biased"], te["gender"], top_n(effects["profession"], n)), orig2, clean_gender
        )
        scores.append(ScrScore(n, d1, d2, d1 if direction == 1 else d2))
    return ScrPairResult(
        pair.name, len(tr["biased"].y_N), len(te["biased"].y_N), clean_prof, clean_gender, orig1, orig2,
        direction, _ints(top_n(effects["gender"], N_LATENTS_KEPT)),
        _ints(top_n(effects["profession"], N_LATENTS_KEPT)), tuple(scores),
    )  # fmt: skip


def _tpp_sets(texts: tuple[tuple[str, ...], ...], f: Features, rng: np.random.Generator) -> list[Rows]:
    pools = [tuple(f.row_of[t] for t in cls) for cls in texts]
    out = []
    for c, pool in enumerate(pools):
        neg = tpp_negatives(pools, c, rng)
        out.append(
            Rows(np.asarray([*pool, *neg], dtype=np.int64), np.r_[np.ones(len(pool)), np.zeros(len(neg))])
        )
    return out


def _tpp(
    data: TppData, f: Features, s: ScrTppSettings, seed: int, probes: list[LinearProbe] | None = None
) -> list[TppClassResult]:
    """TPP of every class; `probes` (one per class) replace the trained ones (the parity test's)."""
    x_ND, z_NF, W = f.pooled.lm_ND, f.pooled.sae_NF, f.W_dec_FD
    rng = np.random.default_rng([seed, 7])
    train, test = _tpp_sets(data.train, f, rng), _tpp_sets(data.test, f, rng)
    if probes is None:
        probes = [train_probe(x_ND[r.idx_N], r.y_N, s.probe, seed * 31 + c) for c, r in enumerate(train)]
    clean = [p.accuracy(x_ND[r.idx_N], r.y_N) for p, r in zip(probes, test, strict=True)]
    effects = [
        latent_effects(z_NF[r.idx_N], r.y_N, p, W, scr=False) for p, r in zip(probes, train, strict=True)
    ]
    out = []
    for i, name in enumerate(data.classes):
        scores = []
        for n in s.n_values:
            latents = top_n(effects[i], n)
            drop = [clean[j] - probes[j].accuracy(ablate(x_ND[r.idx_N], z_NF[r.idx_N], W, latents), r.y_N)
                    for j, r in enumerate(test)]  # fmt: skip
            unintended = float(np.mean([d for j, d in enumerate(drop) if j != i]))
            scores.append(TppScore(n, drop[i] - unintended, drop[i], unintended))
        out.append(TppClassResult(name, len(train[i].y_N), len(test[i].y_N), clean[i],
                                  _ints(top_n(effects[i], N_LATENTS_KEPT)), tuple(scores)))  # fmt: skip
    return out


def _ints(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in a)


# --- the entry point ---------------------------------------------------------------------------------------------


def build_data(s: ScrTppSettings, seed: int) -> tuple[list[ScrPair], TppData | None]:
    """The SCR pairs and TPP classes of one seed, from the bundled corpus or `s.dataset`."""
    if s.dataset:
        pairs = local_scr_pairs(s.dataset, s.scr_n_train, s.scr_n_test, seed) if s.scr else []
        return pairs, local_tpp(s.dataset, s.tpp_n_train, s.tpp_n_test, seed) if s.tpp else None
    pairs = wiki_scr_pairs(s.scr_n_train, s.scr_n_test, seed) if s.scr else []
    return pairs, wiki_tpp(s.tpp_n_train, s.tpp_n_test, seed) if s.tpp else None


def _texts(pairs: Sequence[ScrPair], tpp: TppData | None) -> list[str]:
    out: list[str] = []
    for p in pairs:
        for split in (p.train, p.test):
            for b in (split.gender, split.profession, split.biased):
                out += [*b.positives, *b.negatives]
    for cls in (tpp.train + tpp.test) if tpp else ():
        out += cls
    return out


def _seed_sha256(texts: Sequence[str], f: Features) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(np.asarray([len(f.ids[f.row_of[t]]), *f.ids[f.row_of[t]]], dtype=np.int64).tobytes())
    return h.hexdigest()


def check_inputs(lm: LoadedModel, sae: SAE, hookpoint: str, s: ScrTppSettings) -> None:
    """The SAE fits the hookpoint and is no transcoder, and every n fits its width."""
    if sae.cfg.is_transcoder:
        raise ScrTppError("SCR/TPP ablate latents in the probed activations' space; a transcoder writes another "
                          "hookpoint: leave out --eval.scr-tpp.scr / --eval.scr-tpp.tpp")  # fmt: skip
    width = hookpoint_width(lm, hookpoint)
    if width != sae.cfg.d_in:
        raise ScrTppError(f"SAE d_in={sae.cfg.d_in} does not match the width {width} of {hookpoint}; evaluate the "
                          "SAE at the hookpoint (and with the model) it was trained on")  # fmt: skip
    if not s.n_values or max(s.n_values) > sae.cfg.d_sae:
        raise ScrTppError(f"SCR/TPP n values {s.n_values} must be nonempty and at most the SAE's {sae.cfg.d_sae} "
                          "latents; pass fewer with --eval.scr-tpp.n-values")  # fmt: skip


def run_scr_tpp(
    lm: LoadedModel, sae: SAE, hookpoint: str, s: ScrTppSettings, seeds: Sequence[int]
) -> ScrTppResult:
    """SCR and/or TPP of `sae` at `hookpoint`, once per seed (module docstring)."""
    check_inputs(lm, sae, hookpoint, s)
    data = [build_data(s, seed) for seed in seeds]
    row_of = {t: i for i, t in enumerate(dict.fromkeys(t for d in data for t in _texts(*d)))}
    ids = tokenize(lm.tokenizer, list(row_of), s.ctx_len)
    f = Features(pooled_features(lm, sae, hookpoint, ids, s), row_of,
                 sae.W_dec_FD.detach().float().cpu().numpy(), ids)  # fmt: skip
    results = []
    for seed, (pairs, tpp) in zip(seeds, data, strict=True):
        scr = [_scr_pair(p, f, s, seed) for p in pairs]
        tpp_res = _tpp(tpp, f, s, seed) if tpp is not None else []
        results.append(SeedResult(
            seed, _seed_sha256(_texts(pairs, tpp), f), tuple(scr), tuple(tpp_res),
            {n: float(np.mean([p.scores[i].metric for p in scr])) for i, n in enumerate(s.n_values)} if scr else {},
            {n: float(np.mean([c.scores[i].total for c in tpp_res])) for i, n in enumerate(s.n_values)}
            if tpp_res else {},
        ))  # fmt: skip
    excluded = f"the first {s.exclude_first} positions of every text, padding" + (
        ", special tokens" if s.exclude_special else ""
    )
    return ScrTppResult(
        s, dataset_name(s.dataset), hookpoint, lm.weights_sha256, params_sha256(sae),
        hashlib.sha256("".join(r.data_sha256 for r in results).encode()).hexdigest(), excluded,
        tuple(results), headline_spreads(results),
    )  # fmt: skip


def headline_spreads(results: Sequence[SeedResult]) -> dict[str, Spread]:
    """`scr.metric_n{n}` and `tpp.total_n{n}` over the seeds."""
    out = {}
    for key, attr in (("scr.metric", "scr_metric"), ("tpp.total", "tpp_metric")):
        for n in getattr(results[0], attr):
            out[f"{key}_n{n}"] = spread([getattr(r, attr)[n] for r in results])
    return out
