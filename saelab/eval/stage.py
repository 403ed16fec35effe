"""The eval stage: core metrics of the run's SAE on held-out tokens; with `train.variants` or `eval.extra_saes`,
of every SAE on the same tokens (`eval/matched_l0.json`); sparse probing and absorption when asked for.

Artifacts (relative to the run folder), each defined by its record's module: `eval/metrics.json`
(`saelab.eval.core`), `eval/matched_l0.json` (`saelab.eval.matched_l0`), `eval/probing.json`
(`saelab.eval.probing`), `eval/absorption.json` (`saelab.eval.absorption`), `eval/scr_tpp.json`
(`saelab.eval.scr_tpp`), `eval/noise.json` (`saelab.eval.noise`, with `--eval.repeats` >= 2 or `--eval.compare`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saelab.activations.stage import CollectRecord
from saelab.config import to_dict
from saelab.data.windows import TokenWindows
from saelab.eval.absorption import ABSORPTION, AbsorptionResult, collect_letter_probes, score_absorption
from saelab.eval.absorption_config import AbsorptionConfig, AbsorptionError
from saelab.eval.core import METRICS, EvalResult, Provenance, evaluate_many
from saelab.eval.matched_l0 import MatchedL0, mark_dominated
from saelab.eval.noise import NOISE
from saelab.eval.probing import PROBING, ProbingConfig, ProbingResult, run_probing
from saelab.eval.probing_tasks import ProbingError
from saelab.eval.repeats import (
    PerSeed,
    absorption_metrics,
    noise_record,
    probing_metrics,
    scr_tpp_metrics,
    with_comparison,
)
from saelab.eval.scr_data import ScrTppError
from saelab.eval.scr_probes import ProbeSettings
from saelab.eval.scr_tpp import SCR_TPP, ScrTppResult, ScrTppSettings, run_scr_tpp
from saelab.eval.transcoder import describe, evaluate_models
from saelab.models.loading import LoadedModel
from saelab.run.session import Session
from saelab.sae import base as sae_lib
from saelab.sae.formats import import_sae
from saelab.train.stage import TrainRecord, load_run_sae

log = logging.getLogger(__name__)


def _reads(s: Session) -> tuple[str, ...]:
    """The stages eval reads: collect, and train unless the run is untrained and eval.extra_saes are evaluated."""
    with_run_sae = "train" in s.run.stages or not s.cfg.eval.extra_saes
    return ("collect", "train") if with_run_sae else ("collect",)


def _named_saes(s: Session, reads: tuple[str, ...]) -> list[tuple[str, sae_lib.SAE]]:
    """(name, SAE) of every SAE to evaluate: the run's and its variants' (when trained), then eval.extra_saes's."""
    named = []
    if "train" in reads:
        named.append(("sae", load_run_sae(s.run)))
        for folder in TrainRecord.of(s.run).variants:
            named.append((folder, sae_lib.load(s.folder / folder)))
    for folder in s.cfg.eval.extra_saes:
        named.append((folder, import_sae(Path(folder))))
    return named


def stage_eval(s: Session) -> None:
    """Core metrics of the run's SAE; with train.variants or eval.extra_saes, of every SAE on the same tokens. A run
    that was collected but not trained evaluates the `eval.extra_saes` SAEs alone (SAEs trained elsewhere)."""
    reads = _reads(s)
    s.start("eval", reads)
    named = _named_saes(s, reads)
    lm = s.lm()
    hookpoint = CollectRecord.of(s.run).hookpoint
    windows = TokenWindows.load_run(s.folder)
    if len(windows.eval_idx) < s.cfg.eval.n_windows:  # collect packs data.min_eval_windows held-out windows
        log.warning(
            "eval: the run holds %d held-out windows, fewer than eval.n_windows %d; all of them are used (collect "
            "again with --data.min-eval-windows %d to evaluate on more)",
            len(windows.eval_idx), s.cfg.eval.n_windows, s.cfg.eval.n_windows,
        )  # fmt: skip
    with s.run.stage("eval", {"eval": to_dict(s.cfg.eval)}, reads) as rec:
        saes = [sae.to(lm.device) for _, sae in named]
        model_reads = None
        if any(
            sae.cfg.is_transcoder for sae in saes
        ):  # each model at its own hookpoints (eval/transcoder.py)
            if s.cfg.eval.absorption.enabled:
                raise sae_lib.SAEError(
                    "first-letter absorption reads an SAE's decoder in its input's space; a transcoder writes "
                    "another hookpoint: leave out --eval.absorption.enabled"
                )
            results, model_reads = evaluate_models(lm, saes, windows, hookpoint, s.cfg.eval)
        else:
            results = evaluate_many(lm, saes, windows, hookpoint, s.cfg.eval)
        extra: list[dict[str, Any]] = [{} for _ in saes]
        if model_reads is not None:
            extra = [{**describe(sae, r), "fvu": 1 - res.explained_variance}
                     for sae, r, res in zip(saes, model_reads, results, strict=True)]  # fmt: skip
        (s.folder / "eval").mkdir(exist_ok=True)
        # Each result file names what it was computed from, so it stays attributable when copied out of the run.
        hashes = [sae_lib.params_sha256(sae) for sae in saes]
        source = Provenance(
            named[0][0], saes[0].cfg.to_json(), hashes[0], windows.sha256(), lm.weights_sha256, hookpoint
        )
        results[0].save(s.folder / METRICS, source)
        rec["outputs"].append(METRICS)
        rec["summary"] = {**_summary(results[0]), **extra[0]}
        with _cli_names():
            absorption = (
                _absorption(s, lm, saes, hookpoint, s.cfg.seed) if s.cfg.eval.absorption.enabled else []
            )
            probing = _probing(s, lm, saes[0], hookpoint, s.cfg.seed) if s.cfg.eval.probing.tasks else None
            scr_cfg = s.cfg.eval.scr_tpp
            scr_tpp = _scr_tpp(s, lm, saes[0], hookpoint) if scr_cfg.scr or scr_cfg.tpp else None
        if absorption:
            absorption[0].save(
                s.folder / ABSORPTION,
                model_sha256=lm.weights_sha256,
                hookpoint=hookpoint,
                sae_sha256=hashes[0],
            )
            rec["outputs"].append(ABSORPTION)
            rec["summary"]["mean_absorption_fraction_score"] = absorption[0].mean_absorption_fraction_score
        if probing is not None:
            probing.save(s.folder / PROBING)
            rec["outputs"].append(PROBING)
        if scr_tpp is not None:
            scr_tpp.save(s.folder / SCR_TPP)
            rec["outputs"].append(SCR_TPP)
            rec["summary"].update(
                {f"{k}_mean": v.mean for k, v in scr_tpp.noise.items() if k.endswith("_n20")}
            )
        if s.cfg.eval.repeats > 1 or s.cfg.eval.compare:
            per_seed = _repeated(s, lm, saes[0], hookpoint, absorption[:1], probing, scr_tpp)
            record = noise_record(_seeds(s), per_seed, hashes[0], lm.weights_sha256, hookpoint)
            with _cli_names():
                record = with_comparison(record, s.cfg.eval.compare) if s.cfg.eval.compare else record
            record.save(s.folder / NOISE)
            rec["outputs"].append(NOISE)
        if len(named) > 1:
            entries = [
                {"name": name, "architecture": sae.architecture, "d_sae": sae.cfg.d_sae, "sae_sha256": h,
                 **_summary(r), **e}
                for (name, sae), h, r, e in zip(named, hashes, results, extra, strict=True)
            ]  # fmt: skip
            for entry, a in zip(entries, absorption, strict=False):
                entry["mean_absorption_fraction_score"] = a.mean_absorption_fraction_score
            compared = MatchedL0(mark_dominated(entries), lm.weights_sha256, hookpoint, source.data_sha256)
            rec["outputs"].append(compared.save_run(s.folder))


_CLI_NAMES = {
    "probing.n_per_class": "--eval.probing.n-per-class",
    "absorption.vocab_size": "--eval.absorption.vocab-size",
}
"""Settings the library's probing/absorption errors name, as the eval stage's flags spell them (SCR/TPP errors
name the flags themselves)."""


@contextlib.contextmanager
def _cli_names() -> Iterator[None]:
    """Re-raise probing/absorption errors with the settings they name spelt as the eval stage's flags, so the fix
    they advise can be typed as it reads. The config settings only the library exposes keep their names."""
    try:
        yield
    except (ProbingError, AbsorptionError, ScrTppError) as err:
        message = str(err)
        for name, flag in _CLI_NAMES.items():
            message = message.replace(name, flag)
        raise type(err)(message) from err


def _seeds(s: Session) -> tuple[int, ...]:
    return tuple(s.cfg.seed + i for i in range(s.cfg.eval.repeats))


def _repeated(
    s: Session, lm: LoadedModel, sae: sae_lib.SAE, hookpoint: str, absorption: list[AbsorptionResult],
    probing: ProbingResult | None, scr_tpp: ScrTppResult | None,
) -> list[PerSeed]:  # fmt: skip
    """The headline numbers at every seed: the first seed's from the results already computed, the others' from
    absorption and probing run again (SCR/TPP ran every seed at once)."""
    per_seed: list[PerSeed] = [{} for _ in _seeds(s)]
    for i, seed in enumerate(_seeds(s)):
        with _cli_names():
            if absorption:
                a = absorption[0] if i == 0 else _absorption(s, lm, [sae], hookpoint, seed)[0]
                per_seed[i].update(absorption_metrics(a))
            if probing is not None:
                per_seed[i].update(
                    probing_metrics(probing if i == 0 else _probing(s, lm, sae, hookpoint, seed))
                )
    if scr_tpp is not None:
        for d, extra in zip(per_seed, scr_tpp_metrics(scr_tpp), strict=True):
            d.update(extra)
    return per_seed


def _scr_tpp(s: Session, lm: LoadedModel, sae: sae_lib.SAE, hookpoint: str) -> ScrTppResult:
    c, d = s.cfg.eval.scr_tpp, s.cfg.data
    n_values = tuple(n for n in c.n_values if n <= sae.cfg.d_sae)
    if len(n_values) < len(c.n_values):
        log.warning("scr/tpp: n <= %d only (the SAE has %d latents)", sae.cfg.d_sae, sae.cfg.d_sae)
    settings = ScrTppSettings(
        scr=c.scr, tpp=c.tpp, dataset=c.dataset, n_values=n_values, scr_n_train=c.scr_n_train,
        scr_n_test=c.scr_n_test, tpp_n_train=c.tpp_n_train, tpp_n_test=c.tpp_n_test,
        probe=ProbeSettings(epochs=c.probe_epochs), ctx_len=d.ctx_len, exclude_first=d.exclude_first,
        exclude_special=d.exclude_special,
    )  # fmt: skip
    return run_scr_tpp(lm, sae, hookpoint, settings, _seeds(s))


def _probing(s: Session, lm: LoadedModel, sae: sae_lib.SAE, hookpoint: str, seed: int) -> ProbingResult:
    d = s.cfg.data
    width = min(sae.cfg.d_in, sae.cfg.d_sae)  # a top-k probe needs k features on both sides
    ks = tuple(k for k in ProbingConfig().ks if k <= width)
    if len(ks) < len(ProbingConfig().ks):
        log.warning("probing: top-k probes with k <= %d only (the features are %d wide)", width, width)
    cfg = ProbingConfig(
        tasks=s.cfg.eval.probing.tasks,
        n_per_class=s.cfg.eval.probing.n_per_class,
        ctx_len=d.ctx_len,
        ks=ks,
        exclude_first=d.exclude_first,
        exclude_special=d.exclude_special,
    )
    return run_probing(lm, sae, hookpoint, cfg, seed)


def _absorption(
    s: Session, lm: LoadedModel, saes: list[sae_lib.SAE], hookpoint: str, seed: int
) -> list[AbsorptionResult]:
    """First-letter absorption of every SAE; the forwards and letter probes are shared (one hookpoint)."""
    cfg = AbsorptionConfig(vocab_size=s.cfg.eval.absorption.vocab_size)
    probes = collect_letter_probes(lm, hookpoint, cfg, seed)
    return [score_absorption(probes, sae, cfg, seed) for sae in saes]


def _summary(result: EvalResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_json().items() if k != "log10_frequency"}
