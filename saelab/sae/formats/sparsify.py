"""The EleutherAI sparsify 1.x format: `cfg.json` + `sae.safetensors`, TopK only: SAEs, transcoders and skip
transcoders (`SparseCoder` with `transcode=true`, `skip_connection=true`).

The encoder is an `nn.Linear` (weight [F, D]). The format has no field for the hookpoint: sparsify names each SAE's
folder after its hookpoint (`SparseCoder.load_many`), so reading takes the folder's name.

Transcoders. sparsify's transcoder at module M reads M's input and rebuilds M's output, so the folder's name is
saelab's target hookpoint. saelab names the input by the module whose output it is (a Llama MLP's input is
`post_attention_layernorm`'s output); sparsify has no field for that and drops unknown fields on load, so saelab
writes it as `input_hookpoint`, and reads a file without one as the norm before an `mlp` (Llama, Mistral, Qwen
and GPT-NeoX layouts) or, elsewhere, an empty hookpoint that evaluation refuses by name. Its encoder subtracts
nothing (saelab's input centre is folded into the encoder bias), the skip is `x @ W_skip.T` with W_skip [O, D],
and its decoder writes the input's width: a transcoder with d_out != d_in has no place in the format.
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


# The module whose output is a Llama-layout MLP's input (sparsify names a transcoder after the MLP).
_MLP_INPUT = {"mlp": "post_attention_layernorm"}


def _refuse(cfg: SAEConfig) -> str | None:
    if cfg.is_transcoder and cfg.d_out != cfg.d_in:
        return f"d_out={cfg.d_out} differs from d_in={cfg.d_in}, and a sparsify transcoder writes its input's width"
    return None


def _write_sparsify(sae: SAE, folder: Path) -> None:
    cfg, w = sae.cfg, weights_of(sae)
    doc: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),  # unused: num_latents is set
        "normalize_decoder": sae.unit_norm_decoder,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": cfg.skip,
        "transcode": cfg.is_transcoder,
        "d_in": cfg.d_in,
    }
    if cfg.is_transcoder:
        doc["input_hookpoint"] = cfg.hookpoint
    tensors = {
        "encoder.weight": w.W_enc_DF.T.contiguous(),
        "encoder.bias": w.b_enc_F,
        "W_dec": w.W_dec_FD,
        "b_dec": w.b_dec_D,
    }
    if w.W_skip_DO is not None:
        tensors["W_skip"] = w.W_skip_DO.T.contiguous()
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
    transcode, skip = bool(doc["transcode"]), bool(doc["skip_connection"])
    if skip and not transcode:
        raise SAEError(
            "skip_connection=true without transcode: an SAE with a skip path, which saelab has no place for "
            "(it reads sparsify's SAEs, transcoders and skip transcoders)"
        )
    d_in = int(doc["d_in"])
    state = read_safetensors(folder / "sae.safetensors")
    expect_keys(state, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if skip else set()))
    t = {k: v.float() for k, v in state.items()}
    d_sae, k = int(doc["num_latents"] or d_in * doc["expansion_factor"]), int(doc["k"])
    if not transcode:
        cfg = SAEConfig("topk", d_in, d_sae, k=k, hookpoint=folder.name)
        return assemble(cfg, Weights(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"]))
    target = folder.name
    parent, _, last = target.rpartition(".")
    derived = f"{parent}.{_MLP_INPUT[last]}" if parent and last in _MLP_INPUT else ""
    cfg = SAEConfig(
        "topk", d_in, d_sae, k=k, hookpoint=str(doc.get("input_hookpoint") or derived),
        target_hookpoint=target, d_out=d_in, skip=skip,
    )  # fmt: skip
    skip_DO = t["W_skip"].T if skip else None
    return assemble(
        cfg, Weights(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"], None, skip_DO)
    )


FORMAT = Format(
    "sparsify",
    ("topk",),
    ("cfg.json", "sae.safetensors"),
    _write_sparsify,
    _read_sparsify,
    lambda f: has_cfg_with(f, "sae.safetensors", False),
    _refuse,
)
