"""Refusing SAEs too large for the machine before any of them is allocated.

Training holds, per parameter, its weight, its gradient and Adam's two moments, and per step at least the [B, F]
latents of a batch; `training_bytes` counts those (a lower bound: activations of the loss parts come on top).
`shortfall` compares the sum over the SAEs trained together with the memory available on their device (CUDA:
`torch.cuda.mem_get_info`; CPU on Linux: MemAvailable in /proc/meminfo; elsewhere no check) and says, in one line
naming both and the flag to lower, why they do not fit; the trainer raises that before building any SAE, instead of
the allocator's traceback part-way through.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from saelab.sae.base import SAEConfig, build

MEMINFO = Path("/proc/meminfo")

_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def human(n_bytes: float) -> str:
    for size, unit in _UNITS:
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def training_bytes(cfg: SAEConfig, batch_rows: int) -> tuple[int, int]:
    """(bytes, parameters) of training an SAE of `cfg` on batches of `batch_rows` rows: weights, gradients and
    two Adam moments of every parameter, plus one [batch_rows, d_sae] tensor of latents. The SAE is built on the
    meta device, so nothing is allocated and the architecture itself says which parameters it has."""
    with torch.device("meta"):
        params = list(build(cfg).parameters())
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    itemsize = params[0].element_size() if params else 4
    return 4 * param_bytes + batch_rows * cfg.d_sae * itemsize, n_params


def available_bytes(device: torch.device, meminfo: Path | None = None) -> tuple[int, str] | None:
    """(bytes available, where that figure comes from) on `device`, or None when it cannot be told; on the CPU
    from `meminfo` (default `MEMINFO`)."""
    meminfo = meminfo or MEMINFO
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} (torch.cuda.mem_get_info)"
    if device.type == "cpu":
        try:
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}"
        except (OSError, ValueError, IndexError):
            return None
    return None


def shortfall(
    cfgs: Sequence[SAEConfig], batch_rows: int, device: torch.device, expansions: Sequence[int]
) -> str | None:
    """Why the SAEs of `cfgs` (trained together, at `expansions`) cannot fit in the memory `device` has, in one
    line naming the estimate, the memory available and the flag to lower; None when they fit or it cannot be
    told."""
    have = available_bytes(device)
    if have is None:
        return None
    counts = [training_bytes(c, batch_rows) for c in cfgs]
    need, n_params = sum(b for b, _ in counts), sum(n for _, n in counts)
    if need <= have[0]:
        return None
    what = (
        f"train.expansion {expansions[0]}"
        if len(cfgs) == 1
        else f"{len(cfgs)} SAEs (expansion up to {max(expansions)})"
    )
    widest = max(cfgs, key=lambda c: c.d_sae)
    return (
        f"{what} needs at least {human(need)} on {device.type} to train: weights, gradients and two Adam moments "
        f"of {n_params:.3g} parameters and a batch's [{batch_rows}, {widest.d_sae}] latents, but "
        f"{human(have[0])} is available ({have[1]}); lower --train.expansion (or --train.batch-size)"
    )
