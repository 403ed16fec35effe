"""The dictionary_learning 0.1 format: `ae.pt` (the module's state dict) + the trainer's `config.json`.

relu <-> `AutoEncoder`, topk <-> `AutoEncoderTopK`, batchtopk <-> `BatchTopKSAE`, matryoshka <->
`MatryoshkaBatchTopKSAE` (`group_sizes`), jumprelu <-> `JumpReluAutoEncoder`, whose encoder does not subtract b_dec
(folded into b_enc). `AutoEncoder`'s `from_pretrained` rescales latents to unit-norm decoder rows unless given
`normalize_decoder=False` (the reconstruction is the same either way). Hookpoint and model go to
`trainer.submodule_name` / `trainer.lm_name`. dictionary_learning has no transcoders: exporting one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.formats.common import (
    Format,
    Weights,
    assemble,
    expect_keys,
    read_json,
    weights_of,
    write_files,
)
from saelab.sae.topk import prefix_sizes

_DL_CLASS = {  # what this format can hold
    "relu": "AutoEncoder",
    "topk": "AutoEncoderTopK",
    "batchtopk": "BatchTopKSAE",
    "matryoshka": "MatryoshkaBatchTopKSAE",
    "jumprelu": "JumpReluAutoEncoder",
}
_DL_ARCH = {v: k for k, v in _DL_CLASS.items()}
_DL_LINEAR_K = {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}
_DL_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderTopK": _DL_LINEAR_K,
    "BatchTopKSAE": _DL_LINEAR_K,
    "MatryoshkaBatchTopKSAE": {"k", "threshold", "group_sizes", "W_enc", "b_enc", "W_dec", "b_dec"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}
_DL_BANDWIDTH = 0.001  # JumpReluTrainer's default
_DL_INIT_THRESHOLD = 0.001  # JumpReluAutoEncoder's initial threshold


def _dl_state(sae: SAE) -> dict[str, torch.Tensor]:
    """The state dict of the dictionary_learning class for `sae` (nn.Linear weights are [out, in])."""
    cfg, w = sae.cfg, weights_of(sae)
    arch = cfg.architecture
    if arch == "relu":
        return {
            "bias": w.b_dec_D,
            "encoder.weight": w.W_enc_DF.T.contiguous(),
            "encoder.bias": w.b_enc_F,
            "decoder.weight": w.W_dec_FD.T.contiguous(),
        }
    if arch == "jumprelu":
        assert w.threshold is not None
        return {  # JumpReluAutoEncoder computes x W_enc + b_enc: fold -b_dec W_enc into b_enc
            "W_enc": w.W_enc_DF,
            "b_enc": w.b_enc_F - w.b_dec_D @ w.W_enc_DF,
            "W_dec": w.W_dec_FD,
            "b_dec": w.b_dec_D,
            "threshold": w.threshold.to(w.W_enc_DF.dtype),
        }
    # The k-sparse classes keep k and a float32 threshold as buffers; -1 is "unset" (AutoEncoderTopK selects by
    # k and ignores it by default).
    threshold = torch.tensor(-1.0) if w.threshold is None else w.threshold.float()
    k = torch.tensor(cfg.k, dtype=torch.int32)
    if arch == "matryoshka":
        sizes = prefix_sizes(cfg.matryoshka_prefix_fractions, cfg.d_sae)
        group_sizes = torch.tensor(sizes).diff(prepend=torch.tensor([0]))
        return {
            "k": k,
            "threshold": threshold,
            "group_sizes": group_sizes,
            "W_enc": w.W_enc_DF,
            "b_enc": w.b_enc_F,
            "W_dec": w.W_dec_FD,
            "b_dec": w.b_dec_D,
        }
    return {
        "k": k,
        "threshold": threshold,
        "decoder.weight": w.W_dec_FD.T.contiguous(),
        "encoder.weight": w.W_enc_DF.T.contiguous(),
        "encoder.bias": w.b_enc_F,
        "b_dec": w.b_dec_D,
    }


def _write_dictionary_learning(sae: SAE, folder: Path) -> None:
    cfg = sae.cfg
    state = _dl_state(sae)
    trainer: dict[str, Any] = {
        "dict_class": _DL_CLASS[cfg.architecture],
        "trainer_class": "saelab",
        "activation_dim": cfg.d_in,
        "dict_size": cfg.d_sae,
        "lm_name": cfg.model or None,
        "submodule_name": cfg.hookpoint or None,
        "layer": None,
    }
    if cfg.k:
        trainer["k"] = cfg.k
    if cfg.architecture == "matryoshka":
        trainer["group_sizes"] = state["group_sizes"].tolist()
        trainer["group_fractions"] = [s / cfg.d_sae for s in trainer["group_sizes"]]
    if cfg.architecture == "jumprelu":
        trainer["bandwidth"] = cfg.jumprelu_bandwidth
    write_files(
        folder,
        {
            "ae.pt": lambda p: torch.save(state, p),
            "config.json": lambda p: p.write_text(json.dumps({"trainer": trainer}, indent=4)),
        },
    )


def _read_dictionary_learning(folder: Path) -> SAE:
    try:
        state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle and zip errors of several types for a bad file
        raise SAEError(f"ae.pt is not a readable state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEError("ae.pt is not a state dict of tensors (dictionary_learning saves ae.state_dict())")
    config_path = folder / "config.json"
    trainer = read_json(config_path).get("trainer", {}) if config_path.exists() else {}
    dict_class = trainer.get("dict_class") or _dl_class_from_keys(set(state))
    if dict_class not in _DL_ARCH:
        raise SAEError(
            f"dictionary_learning class {dict_class!r} has no saelab equivalent; saelab reads "
            f"{', '.join(_DL_ARCH)}"
        )
    expect_keys(state, _DL_KEYS[dict_class])
    arch = _DL_ARCH[dict_class]
    t = {k: v.float() for k, v in state.items()}
    if "W_enc" in t:
        w = Weights(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"))
        if arch == "jumprelu":  # its encoder computes x W_enc + b_enc
            w = Weights(w.W_enc_DF, w.b_enc_F + w.b_dec_D @ w.W_enc_DF, w.W_dec_FD, w.b_dec_D, w.threshold)
    else:
        b_dec = t["bias"] if arch == "relu" else t["b_dec"]
        threshold = t["threshold"] if arch == "batchtopk" else None
        w = Weights(t["encoder.weight"].T, t["encoder.bias"], t["decoder.weight"].T, b_dec, threshold)
    D, F = w.W_enc_DF.shape
    common: dict[str, Any] = {
        "d_in": D,
        "d_sae": F,
        "hookpoint": trainer.get("submodule_name") or "",
        "model": trainer.get("lm_name") or "",
    }
    if arch in ("topk", "batchtopk", "matryoshka"):
        common["k"] = int(state["k"])
    if arch == "matryoshka":
        sizes = state["group_sizes"].cumsum(0).tolist()
        common["matryoshka_prefix_fractions"] = tuple(s / F for s in sizes)
    if arch == "jumprelu":
        common["jumprelu_bandwidth"] = float(trainer.get("bandwidth") or _DL_BANDWIDTH)
        common["jumprelu_init_threshold"] = _DL_INIT_THRESHOLD
    return assemble(SAEConfig(arch, **common), w)


def _dl_class_from_keys(keys: set[str]) -> str:
    """The class whose state dict has exactly these tensors, for an ae.pt without its config.json."""
    found = [name for name, expected in _DL_KEYS.items() if expected == keys]
    if len(found) == 1:
        return found[0]
    if found:
        raise SAEError(
            f"ae.pt fits both {' and '.join(found)} (same tensors) and there is no config.json to tell "
            "them apart; add the config.json its trainer wrote (trainer.dict_class)"
        )
    raise SAEError(
        f"ae.pt holds tensors {sorted(keys)}, which match none of the dictionary_learning classes saelab "
        f"reads ({', '.join(_DL_ARCH)})"
    )


FORMAT = Format(
    "dictionary_learning",
    tuple(_DL_CLASS),
    ("ae.pt",),
    _write_dictionary_learning,
    _read_dictionary_learning,
    lambda f: (f / "ae.pt").exists(),
    lambda cfg: (
        "dictionary_learning has no transcoder layout (its dictionaries reconstruct their input)"
        if cfg.is_transcoder
        else None
    ),
)
