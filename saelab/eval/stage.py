"""The eval stage: core metrics of the run's SAE on held-out tokens; with `train.variants` or `eval.extra_saes`,
of every SAE on the same tokens (`eval/matched_l0.json`); sparse probing and absorption when asked for.

Artifacts (relative to the run folder), each defined by its record's module: `eval/metrics.json`
(`saelab.eval.core`), `eval/matched_l0.json` (`saelab.eval.matched_l0`), `eval/probing.json`
(`saelab.eval.probing`), `eval/absorption.json` (`saelab.eval.absorption`).
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
from saelab.eval.probing import PROBING, ProbingConfig, ProbingResult, run_probing
from saelab.eval.probing_tasks import ProbingError
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
            absorption = _absorption(s, lm, saes, hookpoint) if s.cfg.eval.absorption.enabled else []
            probing = _probing(s, lm, saes[0], hookpoint) if s.cfg.eval.probing.tasks else None
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


def _probing(s: Session, lm: LoadedModel, sae: sae_lib.SAE, hookpoint: str) -> ProbingResult:
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
    return run_probing(lm, sae, hookpoint, cfg, s.cfg.seed)


def _absorption(
    s: Session, lm: LoadedModel, saes: list[sae_lib.SAE], hookpoint: str
) -> list[AbsorptionResult]:
    """First-letter absorption of every SAE; the forwards and letter probes are shared (one hookpoint)."""
    cfg = AbsorptionConfig(vocab_size=s.cfg.eval.absorption.vocab_size)
    probes = collect_letter_probes(lm, hookpoint, cfg, s.cfg.seed)
    return [score_absorption(probes, sae, cfg, s.cfg.seed) for sae in saes]


def _summary(result: EvalResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_json().items() if k != "log10_frequency"}
