"""The SAELens 6.x format: `cfg.json` + `sae_weights.safetensors` (SAELens's `SAE.load_from_disk` reads it).

`standard` <-> relu, `topk` <-> topk, `jumprelu` <-> jumprelu. BatchTopK and Matryoshka are written the way
SAELens saves its own: an inference `jumprelu` whose thresholds all equal the learned one, with
`metadata.training_architecture` naming what was trained; such a file reads back as batchtopk / matryoshka.
`apply_b_dec_to_input=false` (pre = x W_enc + b_enc) is folded into b_enc, `rescale_acts_by_decoder_norm` into the
weights. Hookpoint and model go to `metadata.hook_name` / `metadata.model_name`. Where the file has no training
details, JumpReLU's bandwidth and initial threshold take SAELens's defaults.

Transcoders (SAELens loads them; it does not train them): relu <-> `transcoder` / `skip_transcoder`, jumprelu (and
batchtopk / matryoshka, as above) <-> `jumprelu_transcoder` / `jumprelu_skip_transcoder`, with `d_out` and, for the
skip, `W_skip` [O, D] (x_hat += x @ W_skip.T). Their encoder subtracts nothing (`apply_b_dec_to_input` must be
false), so saelab's input centre is folded into b_enc. SAELens has no TopK transcoder: exporting one is refused.
SAELens's config has no field for the output hookpoint; saelab writes it to `metadata.hook_name_out` (SAELens
keeps extra metadata) and reads a file without it with an empty target, which evaluation refuses by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.formats.common import (
    Format,
    Weights,
    assemble,
    expect_keys,
    read_json,
    read_safetensors,
    weights_of,
    write_files,
)
from saelab.sae.topk import prefix_sizes

# SAELens reads a file without `sae_lens_version` as a pre-6.0 config and rewrites it; the layout written here is
# the 6.x one, so the version names that layout (SAELens checks only that it is >= 6.0).
_SAELENS_LAYOUT_VERSION = "6.0.0"
_SAELENS_DEFAULTS: dict[str, Any] = {
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "rescale_acts_by_decoder_norm": False,
    "metadata": {},
}
# Where the config has no training details: SAELens's JumpReLU training defaults.
_SAELENS_JUMPRELU_DEFAULTS = {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.01}
_SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
"""The SAELens inference architecture each saelab architecture is written as: what this format can hold."""
_SAELENS_TRAINING_ARCH = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}
_SAELENS_READS = ("standard", "topk", "jumprelu")
_SAELENS_TRANSCODER = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
"""(inference architecture, skip) -> SAELens's transcoder architecture; SAELens has no TopK transcoder."""
_SAELENS_TRANSCODER_READS = {name: key for key, name in _SAELENS_TRANSCODER.items()}


def _refuse(cfg: SAEConfig) -> str | None:
    if cfg.is_transcoder and (_SAELENS_ARCH[cfg.architecture], cfg.skip) not in _SAELENS_TRANSCODER:
        kinds = ", ".join(sorted(set(_SAELENS_TRANSCODER.values())))
        return f"SAELens has no {_SAELENS_ARCH[cfg.architecture]} transcoder (it loads {kinds})"
    return None


def _write_saelens(sae: SAE, folder: Path) -> None:
    cfg, w = sae.cfg, weights_of(sae)
    dtype = w.W_enc_DF.dtype
    tensors = {"W_enc": w.W_enc_DF, "b_enc": w.b_enc_F, "W_dec": w.W_dec_FD, "b_dec": w.b_dec_D}
    arch = _SAELENS_ARCH[cfg.architecture]
    if w.threshold is not None:
        tensors["threshold"] = w.threshold.expand(cfg.d_sae).to(dtype).contiguous()
    if w.W_skip_DO is not None:
        tensors["W_skip"] = w.W_skip_DO.T.contiguous()
    details: dict[str, Any] = {}
    if cfg.architecture in _SAELENS_TRAINING_ARCH:
        details["k"] = cfg.k
    if cfg.architecture == "matryoshka":
        details["matryoshka_widths"] = prefix_sizes(cfg.matryoshka_prefix_fractions, cfg.d_sae)
    if cfg.architecture == "jumprelu":
        details = {
            "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
            "jumprelu_init_threshold": cfg.jumprelu_init_threshold,
        }
    doc: dict[str, Any] = {
        "architecture": _SAELENS_TRANSCODER[arch, cfg.skip] if cfg.is_transcoder else arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": _SAELENS_LAYOUT_VERSION,
            "model_name": cfg.model or None,
            "hook_name": cfg.hookpoint or None,
            "training_architecture": _SAELENS_TRAINING_ARCH.get(cfg.architecture, arch),
            "training_architecture_details": details,
        },
    }
    if arch == "topk":
        doc |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if cfg.is_transcoder:
        doc["d_out"] = cfg.d_out
        doc["metadata"]["hook_name_out"] = cfg.target_hookpoint
    write_files(
        folder,
        {
            "sae_weights.safetensors": lambda p: save_file(tensors, str(p)),
            "cfg.json": lambda p: p.write_text(json.dumps(doc, indent=2)),
        },
    )


def _read_saelens(folder: Path) -> SAE:
    raw = read_json(folder / "cfg.json")
    if "architecture" not in raw:
        raise SAEError(
            "cfg.json is a pre-6.0 SAELens config; load it with SAELens 6 and save it again "
            "(SAE.load_from_disk, then save_model)"
        )
    doc = {**_SAELENS_DEFAULTS, **raw}
    arch, skip = doc["architecture"], False
    transcoder = arch in _SAELENS_TRANSCODER_READS
    if transcoder:
        arch, skip = _SAELENS_TRANSCODER_READS[arch]
        if doc["apply_b_dec_to_input"] and "apply_b_dec_to_input" in raw:
            raise SAEError("apply_b_dec_to_input=true on a transcoder, which SAELens itself refuses")
        doc["apply_b_dec_to_input"] = True  # nothing to fold: the encoder subtracts nothing
    elif arch not in _SAELENS_READS:
        raise SAEError(
            f"SAELens architecture {arch!r} has no saelab equivalent; saelab reads SAELens "
            f"{', '.join(_SAELENS_READS)} SAEs (SAELens saves its batchtopk and matryoshka_batchtopk as jumprelu) "
            f"and {', '.join(_SAELENS_TRANSCODER_READS)}"
        )
    for key in ("normalize_activations", "reshape_activations"):
        if doc[key] != "none":
            raise SAEError(
                f"{key}={doc[key]!r}: an input transform saelab SAEs do not have; "
                "fold it into the weights with SAELens first (e.g. fold_activation_norm_scaling_factor) or use "
                "an SAE saved with 'none'"
            )
    state = read_safetensors(folder / "sae_weights.safetensors")
    expect_keys(
        state,
        {"W_enc", "b_enc", "W_dec", "b_dec"}
        | ({"threshold"} if arch == "jumprelu" else set())
        | ({"W_skip"} if skip else set()),
    )
    t = {k: v.float() for k, v in state.items()}
    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if not doc["apply_b_dec_to_input"]:  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + t["b_dec"] @ W_enc
    if arch == "topk" and doc["rescale_acts_by_decoder_norm"]:
        # SAELens selects on pre * ||W_dec_i|| and decodes z / ||W_dec_i||: the same as unit-norm rows with
        # the norms moved into the encoder.
        norm_F = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norm_F, b_enc * norm_F, W_dec / norm_F[:, None]
    meta = doc["metadata"] or {}
    common: dict[str, Any] = {
        "d_in": int(doc["d_in"]),
        "d_sae": int(doc["d_sae"]),
        "hookpoint": meta.get("hook_name") or doc.get("hook_name") or "",
        "model": meta.get("model_name") or doc.get("model_name") or "",
    }
    if transcoder:
        common |= {
            "d_out": int(doc["d_out"]),
            "target_hookpoint": meta.get("hook_name_out") or "",
            "skip": skip,
        }
    threshold = t.get("threshold")
    if arch == "standard":
        cfg = SAEConfig("relu", **common)
    elif arch == "topk":
        cfg = SAEConfig("topk", k=int(doc["k"]), **common)
    else:
        assert threshold is not None
        cfg = _saelens_jumprelu_config(meta, threshold, common)
        threshold = threshold[0] if cfg.architecture != "jumprelu" else threshold
    skip_DO = t["W_skip"].T if skip else None
    return assemble(cfg, Weights(W_enc, b_enc, W_dec, t["b_dec"], threshold, skip_DO))


def _saelens_jumprelu_config(
    meta: dict[str, Any], threshold_F: torch.Tensor, common: dict[str, Any]
) -> SAEConfig:
    """A SAELens inference jumprelu: batchtopk or matryoshka where SAELens trained it so (one threshold for all
    latents and an integer k), jumprelu otherwise (the same latents either way)."""
    trained = meta.get("training_architecture")
    details = meta.get("training_architecture_details") or {}
    k = details.get("k")
    uniform = bool((threshold_F == threshold_F[0]).all())
    if (
        trained in ("batchtopk", "matryoshka_batchtopk")
        and uniform
        and isinstance(k, (int, float))
        and float(k).is_integer()
    ):
        if trained == "batchtopk":
            return SAEConfig("batchtopk", k=int(k), **common)
        widths = [int(w) for w in details.get("matryoshka_widths") or []]
        if not widths or widths[-1] != common["d_sae"]:
            widths.append(common["d_sae"])  # SAELens adds the whole dictionary as the last level too
        fractions = tuple(w / common["d_sae"] for w in widths)
        return SAEConfig("matryoshka", k=int(k), matryoshka_prefix_fractions=fractions, **common)
    params = {**_SAELENS_JUMPRELU_DEFAULTS, **(details if trained == "jumprelu" else {})}
    return SAEConfig("jumprelu", **{name: params[name] for name in _SAELENS_JUMPRELU_DEFAULTS}, **common)


FORMAT = Format(
    "saelens",
    tuple(_SAELENS_ARCH),
    ("cfg.json", "sae_weights.safetensors"),
    _write_saelens,
    _read_saelens,
    lambda f: (f / "sae_weights.safetensors").exists(),
    _refuse,
)
