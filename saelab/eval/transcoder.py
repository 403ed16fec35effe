"""Transcoders evaluated beside SAEs on the same held-out tokens (issue 20).

A transcoder reads one hookpoint (`SAEConfig.hookpoint`, e.g. an MLP's input after its norm) and reconstructs
another's output (`SAEConfig.target_hookpoint`, that MLP's output). Its core metrics are `saelab.eval.core`'s
with the target in place of the input: the target's MSE, explained variance (FVU = 1 - EV), cosine, and the
latents' L0, dead and dense fractions. Its CE-loss and KL scores replace the target module's output by the
transcoder's prediction from the input captured in the same forward (kept positions only, as for SAEs), against
zero-ablating that module (every position), so an MLP replaced by its transcoder is scored against the MLP
removed: CE-loss score = (CE_zero - CE_replaced) / (CE_zero - CE_clean).

Each model is evaluated at its own hookpoints: a transcoder at the two its config names; an SAE at its recorded
hookpoint when that is a module of this model, else (an SAE imported from another library's naming) at the
run's. Models that reconstruct the same hookpoint (an SAE trained on `layers.6.mlp` and a transcoder into it)
share the zero-ablation baseline and are compared at matched L0 (`matched_l0.mark_dominated` groups by
`reconstructs`). `saelab eval` takes this path when any model it evaluates is a transcoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.config import EvalConfig
from saelab.data.windows import TokenWindows
from saelab.eval.core import EvalResult, ReconstructionStats, _Clean, _log_probs
from saelab.models.loading import LoadedModel, capture, forward_until, hookpoint_width, replace_output
from saelab.sae.base import SAE, SAEError, check_width


@dataclass(frozen=True)
class Reads:
    """Where a model is evaluated: the module whose output it reads, and the one whose output it rebuilds."""

    input: str
    target: str


def reads_of(lm: LoadedModel, sae: SAE, run_hookpoint: str) -> Reads:
    """The hookpoints `sae` is evaluated at (module docstring); a transcoder whose hookpoints this model lacks,
    or whose widths are not its d_in / d_out, is an SAEError in one line."""
    modules = {name for name, _ in lm.model.named_modules() if name}
    cfg = sae.cfg
    if not cfg.is_transcoder:
        hp = cfg.hookpoint if cfg.hookpoint in modules else run_hookpoint
        check_width(sae, hookpoint_width(lm, hp), hp)
        return Reads(hp, hp)
    names = {}
    for role, hp in (("input", cfg.hookpoint), ("target", cfg.target_hookpoint)):
        if not hp:  # a peer's file that names one end only (saelab.sae.formats.sparsify, .saelens)
            raise SAEError(
                f"the transcoder's {role} hookpoint is not recorded in its checkpoint; write it into the file "
                "(sparsify: `input_hookpoint` in cfg.json; SAELens: `metadata.hook_name_out`) and load it again"
            )
        # A unique suffix names the module too: sparsify names modules from the base model (`layers.15.mlp`).
        suffix = [m for m in modules if m.endswith("." + hp)]
        if hp not in modules and len(suffix) != 1:
            raise SAEError(
                f"the transcoder's {role} hookpoint {hp!r} is not a module of {lm.name}; evaluate it on the model "
                f"it was trained on ({cfg.model or 'see its cfg.json'})"
            )
        names[role] = hp if hp in modules else suffix[0]
    for role, width in (("input", cfg.d_in), ("target", cfg.d_out)):
        hp, found = names[role], hookpoint_width(lm, names[role])
        if found != width:
            name = "d_in" if role == "input" else "d_out"
            raise SAEError(
                f"{hp} is {found} wide but the transcoder's {name} is {width}; evaluate it on the model it was "
                f"trained on ({cfg.model or 'see its cfg.json'})"
            )
    return Reads(names["input"], names["target"])


def describe(sae: SAE, reads: Reads) -> dict[str, Any]:
    """What a comparison entry says about a model beside its metrics."""
    cfg = sae.cfg
    kind = ("skip transcoder" if cfg.skip else "transcoder") if cfg.is_transcoder else "sae"
    return {"kind": kind, "hookpoint": reads.input, "reconstructs": reads.target}


@torch.no_grad()
def evaluate_models(
    lm: LoadedModel, saes: list[SAE], windows: TokenWindows, run_hookpoint: str, cfg: EvalConfig
) -> tuple[list[EvalResult], list[Reads]]:
    """Core metrics and replacement scores of SAEs and transcoders on the same held-out windows; every
    hookpoint any of them reads or rebuilds is captured in one forward per batch."""
    reads = [reads_of(lm, sae, run_hookpoint) for sae in saes]
    hookpoints = sorted({hp for r in reads for hp in (r.input, r.target)})
    stats = [ReconstructionStats(sae, cfg.dense_threshold) for sae in saes]
    idx = windows.eval_idx[: cfg.n_windows]
    for start in tqdm(range(0, len(idx), cfg.batch_size), desc="eval recon", unit="batch", leave=False):
        batch = idx[start : start + cfg.batch_size]
        ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long, device=lm.device)
        with torch.inference_mode(), capture(lm.model, hookpoints) as store:
            forward_until(lm.model, ids)
        keep = torch.as_tensor(windows.keep[batch], device=lm.device)
        for s, r in zip(stats, reads, strict=True):
            s.add(store[r.input][keep].float(), store[r.target][keep].float())
    recon = [s.result() for s in stats]
    down = replacement_scores(
        lm, saes, reads, windows, windows.eval_idx[: cfg.n_ce_windows], cfg.ce_batch_size
    )
    excluded = "leading positions and special tokens (see data config: exclude_first, exclude_special)"
    results = [EvalResult(**r, **d, excluded=excluded) for r, d in zip(recon, down, strict=True)]
    return results, reads


@torch.no_grad()
def replacement_scores(
    lm: LoadedModel,
    saes: list[SAE],
    reads: list[Reads],
    windows: TokenWindows,
    idx: np.ndarray,
    batch_size: int,
) -> list[dict[str, Any]]:
    """CE-loss and KL scores with each model's output replacing its target's (from its input in the same
    forward), against the clean forward and zero-ablating the target (one ablation per distinct target)."""
    targets = sorted({r.target for r in reads})
    ce_zero = dict.fromkeys(targets, 0.0)
    kl_zero = dict.fromkeys(targets, 0.0)
    ce_clean, n = 0.0, 0
    per_model = [{"ce_sae": 0.0, "kl_sae": 0.0} for _ in saes]
    for start in tqdm(range(0, len(idx), batch_size), desc="eval CE/KL", unit="batch", leave=False):
        batch = idx[start : start + batch_size]
        ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long, device=lm.device)
        keep = torch.as_tensor(windows.keep[batch], device=lm.device)
        mask = keep[:, :-1]
        clean = _Clean(_log_probs(lm, ids, mask), ids[:, 1:][mask])
        ce_clean += clean.ce
        for target in targets:
            with replace_output(
                lm.model, target, torch.zeros_like
            ):  # every position, BOS included (SAEBench)
                ce, kl = clean.ce_kl(_log_probs(lm, ids, mask))
            ce_zero[target] += ce
            kl_zero[target] += kl
        for sae, r, totals in zip(saes, reads, per_model, strict=True):
            with _replaced(lm, sae, r, keep):
                ce, kl = clean.ce_kl(_log_probs(lm, ids, mask))
            totals["ce_sae"] += ce
            totals["kl_sae"] += kl
        n += int(mask.sum())
    out = []
    for r, totals in zip(reads, per_model, strict=True):
        d: dict[str, Any] = {"ce_clean": ce_clean / n, "ce_zero_ablation": ce_zero[r.target] / n,
                             "kl_zero_ablation": kl_zero[r.target] / n, **{k: v / n for k, v in totals.items()}}  # fmt: skip
        d["ce_loss_score"] = (d["ce_zero_ablation"] - d["ce_sae"]) / (d["ce_zero_ablation"] - d["ce_clean"])
        d["kl_score"] = (d["kl_zero_ablation"] - d["kl_sae"]) / d["kl_zero_ablation"]
        d["n_ce_tokens"] = n
        out.append(d)
    return out


@contextmanager
def _replaced(lm: LoadedModel, sae: SAE, reads: Reads, keep: torch.Tensor) -> Iterator[None]:
    """During the forwards inside the block, `reads.target`'s output at kept positions is the model's output
    from `reads.input`'s output of the same forward (an SAE: its own reconstruction)."""
    seen: dict[str, torch.Tensor] = {}

    def record(_mod: Any, _inp: Any, output: Any) -> None:
        seen["input"] = output[0] if isinstance(output, tuple) else output

    def splice(out: torch.Tensor) -> torch.Tensor:
        x = out if reads.input == reads.target else seen.pop("input", None)
        if x is None:
            raise SAEError(
                f"{reads.input} did not run before {reads.target} in the forward: a transcoder's input hookpoint "
                "must come before its target"
            )
        new = out.clone()
        new[keep] = sae.reconstruct(x[keep].float())[0].to(out.dtype)
        return new

    handle = None
    if reads.input != reads.target:
        handle = dict(lm.model.named_modules())[reads.input].register_forward_hook(record)
    try:
        with replace_output(lm.model, reads.target, splice):
            yield
    finally:
        if handle is not None:
            handle.remove()
