"""The EleutherAI sparsify 1.x format: `cfg.json` + `sae.safetensors`, TopK only.

The encoder is an `nn.Linear` (weight [F, D]). The format has no field for the hookpoint: sparsify names each SAE's
folder after its hookpoint (`SparseCoder.load_many`), so reading takes the folder's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.formats.common import (
    Format,
    Weights,
    assemble,
    expect_keys,
    has_cfg_with,
    read_json,
    read_safetensors,
    weights_of,
    write_files,
)

_SPARSIFY_DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "num_latents": 0,
    "k": 32,
    "transcode": False,
    "skip_connection": False,
}


def _write_sparsify(sae: SAE, folder: Path) -> None:
    cfg, w = sae.cfg, weights_of(sae)
    doc = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),  # unused: num_latents is set
        "normalize_decoder": sae.unit_norm_decoder,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    tensors = {
        "encoder.weight": w.W_enc_DF.T.contiguous(),
        "encoder.bias": w.b_enc_F,
        "W_dec": w.W_dec_FD,
        "b_dec": w.b_dec_D,
    }
    write_files(
        folder,
        {
            "sae.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            "cfg.json": lambda p: p.write_text(json.dumps(doc, indent=2)),
        },
    )


def _read_sparsify(folder: Path) -> SAE:
    doc = {**_SPARSIFY_DEFAULTS, **read_json(folder / "cfg.json")}
    if doc["activation"] != "topk":
        raise SAEError(f"activation={doc['activation']!r}: saelab reads sparsify's topk SAEs only")
    for kind in ("transcode", "skip_connection"):
        if doc[kind]:
            raise SAEError(
                f"{kind}=true: saelab reads plain sparsify SAEs only (no transcoders, no skip connections)"
            )
    d_in = int(doc["d_in"])
    state = read_safetensors(folder / "sae.safetensors")
    expect_keys(state, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    t = {k: v.float() for k, v in state.items()}
    cfg = SAEConfig(
        "topk",
        d_in,
        int(doc["num_latents"] or d_in * doc["expansion_factor"]),
        k=int(doc["k"]),
        hookpoint=folder.name,
    )
    return assemble(cfg, Weights(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"]))


FORMAT = Format(
    "sparsify",
    ("topk",),
    ("cfg.json", "sae.safetensors"),
    _write_sparsify,
    _read_sparsify,
    lambda f: has_cfg_with(f, "sae.safetensors", False),
)
