"""Whether a device multiplies bfloat16 natively, and the float type an `auto` setting resolves to there.

Two settings use it: `TrainConfig.selection_matmul` (a TopK step's choice of entries, saelab/sae/selection.py) and
`LLMConfig.local_dtype` (the local explainer / judge model). On CPUs without AVX512-BF16 or AMX, torch computes
bfloat16 by conversion and gains nothing, so `auto` stays float32 there.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX CPUs; CUDA GPUs from compute
    capability 8.0)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":  # private probes of torch.cpu; absent ones mean "not known to be native"
        probes = (
            getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def resolve_float(setting: str, device: torch.device) -> str:
    """`float32` or `bfloat16` for a setting of `auto`, `float32` or `bfloat16` (`auto`: bfloat16 where native)."""
    if setting == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return setting
