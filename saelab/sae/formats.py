"""Other libraries' SAE checkpoints: read and write SAELens, sparsify and dictionary_learning folders.

    export_sae(sae, "out/sl", "saelens")          # a folder SAELens's `SAE.load_from_disk` reads
    sae = import_sae("path/to/folder")            # the format is found from the files present
    saelab convert --src runs/demo/sae --dst out/sl --to saelens

Every peer's SAE is our affine encoder/decoder (sae.py) under other conventions; each is mapped exactly, so the
imported or exported SAE gives the same latents and reconstructions as the original (tests/test_formats.py checks
this against the peer libraries themselves):

- `saelens` (SAELens 6.x: `cfg.json` + `sae_weights.safetensors`). `standard` <-> relu, `topk` <-> topk,
  `jumprelu` <-> jumprelu. BatchTopK and Matryoshka are written the way SAELens saves its own: an inference
  `jumprelu` whose thresholds all equal the learned one, with `metadata.training_architecture` naming what was
  trained; such a file reads back as batchtopk / matryoshka. `apply_b_dec_to_input=false` (pre = x W_enc + b_enc)
  is folded into b_enc, `rescale_acts_by_decoder_norm` into the weights. Hookpoint and model go to
  `metadata.hook_name` / `metadata.model_name`.
- `sparsify` (EleutherAI sparsify 1.x: `cfg.json` + `sae.safetensors`). TopK only; the encoder is an
  `nn.Linear` (weight [F, D]). The format has no field for the hookpoint: sparsify names each SAE's folder after
  its hookpoint (`SparseCoder.load_many`), so reading takes the folder's name.
- `dictionary_learning` (0.1: `ae.pt` + the trainer's `config.json`). relu <-> `AutoEncoder`, topk <->
  `AutoEncoderTopK`, batchtopk <-> `BatchTopKSAE`, matryoshka <-> `MatryoshkaBatchTopKSAE` (`group_sizes`),
  jumprelu <-> `JumpReluAutoEncoder`, whose encoder does not subtract b_dec (folded into b_enc). `AutoEncoder`'s
  `from_pretrained` rescales latents to unit-norm decoder rows unless given `normalize_decoder=False` (the
  reconstruction is the same either way). Hookpoint and model go to `trainer.submodule_name` / `trainer.lm_name`.
- `saelab`: our own `cfg.json` + `sae.safetensors` (sae.save / sae.load).

Training-only hyperparameters a format has no place for (JumpReLU's kernel bandwidth and initial threshold) take
the peer's defaults on import; inference never reads them. Imports are float32 on CPU, in eval mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saelab.sae import base as sae_lib
from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.topk import prefix_sizes


@dataclass(frozen=True)
class Weights:
    """An SAE's tensors in saelab's convention: pre = (x - b_dec) @ W_enc + b_enc, x_hat = z @ W_dec + b_dec."""

    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    threshold: torch.Tensor | None = None
    """batchtopk and matryoshka: the scalar inference threshold; jumprelu: per-latent thresholds [F]."""


def weights_of(sae: SAE) -> Weights:
    """Detached CPU copies of an SAE's tensors (thresholds as values, not logarithms)."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().clone(memory_format=torch.contiguous_format)

    values = sae.threshold_values()
    threshold = None if values is None else copy(values)
    return Weights(copy(sae.W_enc_DF), copy(sae.b_enc_F), copy(sae.W_dec_FD), copy(sae.b_dec_D), threshold)


def assemble(cfg: SAEConfig, w: Weights) -> SAE:
    """Build an SAE of `cfg` holding `w` (cast to float32); a shape that does not fit is an SAEError."""
    D, F = cfg.d_in, cfg.d_sae
    shapes = {
        "W_enc": (w.W_enc_DF, (D, F)),
        "b_enc": (w.b_enc_F, (F,)),
        "W_dec": (w.W_dec_FD, (F, D)),
        "b_dec": (w.b_dec_D, (D,)),
    }
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise SAEError(f"{name} has shape {tuple(t.shape)}, expected {shape} for d_in={D}, d_sae={F}")
    sae = sae_lib.build(cfg)
    with torch.no_grad():
        sae.W_enc_DF.copy_(w.W_enc_DF)
        sae.b_enc_F.copy_(w.b_enc_F)
        sae.W_dec_FD.copy_(w.W_dec_FD)
        sae.b_dec_D.copy_(w.b_dec_D)
        if sae.has_threshold:
            if w.threshold is None:
                raise SAEError(f"a {cfg.architecture} SAE needs a threshold; the checkpoint has none")
            # Latents are ReLU'd before the threshold test, so a threshold below 0 acts as 0.
            sae.load_threshold_(w.threshold.float().clamp_min(0.0))
    return sae.eval()


# --- saelab --------------------------------------------------------------------------------------------------
def _write_saelab(sae: SAE, folder: Path) -> None:
    sae_lib.save(sae, folder)


def _read_saelab(folder: Path) -> SAE:
    return sae_lib.load(folder)


# --- SAELens 6.x ---------------------------------------------------------------------------------------------
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
_SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_SAELENS_TRAINING_ARCH = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}


def _write_saelens(sae: SAE, folder: Path) -> None:
    cfg, w = sae.cfg, weights_of(sae)
    dtype = w.W_enc_DF.dtype
    tensors = {"W_enc": w.W_enc_DF, "b_enc": w.b_enc_F, "W_dec": w.W_dec_FD, "b_dec": w.b_dec_D}
    arch = _SAELENS_ARCH.get(cfg.architecture, "jumprelu")
    if w.threshold is not None:
        tensors["threshold"] = w.threshold.expand(cfg.d_sae).to(dtype).contiguous()
    details: dict[str, Any] = {}
    if cfg.architecture in ("batchtopk", "matryoshka"):
        details["k"] = cfg.k
    if cfg.architecture == "matryoshka":
        details["matryoshka_widths"] = prefix_sizes(cfg.matryoshka_prefix_fractions, cfg.d_sae)
    if cfg.architecture == "jumprelu":
        details = {
            "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
            "jumprelu_init_threshold": cfg.jumprelu_init_threshold,
        }
    doc: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
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
    _write_files(
        folder,
        {
            "sae_weights.safetensors": lambda p: save_file(tensors, str(p)),
            "cfg.json": lambda p: p.write_text(json.dumps(doc, indent=2)),
        },
    )


def _read_saelens(folder: Path) -> SAE:
    raw = _read_json(folder / "cfg.json")
    if "architecture" not in raw:
        raise SAEError(
            "cfg.json is a pre-6.0 SAELens config; load it with SAELens 6 and save it again "
            "(SAE.load_from_disk, then save_model)"
        )
    doc = {**_SAELENS_DEFAULTS, **raw}
    arch = doc["architecture"]
    if arch not in ("standard", "topk", "jumprelu"):
        raise SAEError(
            f"SAELens architecture {arch!r} has no saelab equivalent; saelab reads SAELens "
            "standard, topk and jumprelu SAEs (SAELens saves its batchtopk and matryoshka_batchtopk as jumprelu)"
        )
    for key in ("normalize_activations", "reshape_activations"):
        if doc[key] != "none":
            raise SAEError(
                f"{key}={doc[key]!r}: an input transform saelab SAEs do not have; "
                "fold it into the weights with SAELens first (e.g. fold_activation_norm_scaling_factor) or use "
                "an SAE saved with 'none'"
            )
    state = _read_safetensors(folder / "sae_weights.safetensors")
    _expect_keys(
        state, {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
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
    threshold = t.get("threshold")
    if arch == "standard":
        cfg = SAEConfig("relu", **common)
    elif arch == "topk":
        cfg = SAEConfig("topk", k=int(doc["k"]), **common)
    else:
        assert threshold is not None
        cfg = _saelens_jumprelu_config(meta, threshold, common)
        threshold = threshold[0] if cfg.architecture != "jumprelu" else threshold
    return assemble(cfg, Weights(W_enc, b_enc, W_dec, t["b_dec"], threshold))


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


# --- sparsify 1.x --------------------------------------------------------------------------------------------
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
    _write_files(
        folder,
        {
            "sae.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            "cfg.json": lambda p: p.write_text(json.dumps(doc, indent=2)),
        },
    )


def _read_sparsify(folder: Path) -> SAE:
    doc = {**_SPARSIFY_DEFAULTS, **_read_json(folder / "cfg.json")}
    if doc["activation"] != "topk":
        raise SAEError(f"activation={doc['activation']!r}: saelab reads sparsify's topk SAEs only")
    for kind in ("transcode", "skip_connection"):
        if doc[kind]:
            raise SAEError(
                f"{kind}=true: saelab reads plain sparsify SAEs only (no transcoders, no skip connections)"
            )
    d_in = int(doc["d_in"])
    state = _read_safetensors(folder / "sae.safetensors")
    _expect_keys(state, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    t = {k: v.float() for k, v in state.items()}
    cfg = SAEConfig(
        "topk",
        d_in,
        int(doc["num_latents"] or d_in * doc["expansion_factor"]),
        k=int(doc["k"]),
        hookpoint=folder.name,
    )
    return assemble(cfg, Weights(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"]))


# --- dictionary_learning 0.1 ---------------------------------------------------------------------------------
_DL_CLASS = {
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
    _write_files(
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
    trainer = _read_json(config_path).get("trainer", {}) if config_path.exists() else {}
    dict_class = trainer.get("dict_class") or _dl_class_from_keys(set(state))
    if dict_class not in _DL_ARCH:
        raise SAEError(
            f"dictionary_learning class {dict_class!r} has no saelab equivalent; saelab reads "
            f"{', '.join(_DL_ARCH)}"
        )
    _expect_keys(state, _DL_KEYS[dict_class])
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


# --- registry ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """One checkpoint layout: what it stores and how to write, read and recognise it."""

    architectures: tuple[str, ...]
    """saelab architectures the format can store."""
    files: tuple[str, ...]
    """Files a checkpoint of this format has."""
    write: Callable[[SAE, Path], None]
    read: Callable[[Path], SAE]
    recognise: Callable[[Path], bool]
    """Whether a folder holds a checkpoint of this format (by its files)."""


def _has_cfg_with(folder: Path, weights: str, architecture_key: bool) -> bool:
    """saelab and sparsify share file names; saelab's cfg.json names an architecture, sparsify's does not."""
    if not ((folder / weights).exists() and (folder / "cfg.json").exists()):
        return False
    return ("architecture" in _read_json(folder / "cfg.json")) == architecture_key


ALL = tuple(sae_lib.REGISTRY)
FORMATS: dict[str, Format] = {
    "saelab": Format(
        ALL,
        ("cfg.json", "sae.safetensors"),
        _write_saelab,
        _read_saelab,
        lambda f: _has_cfg_with(f, "sae.safetensors", True),
    ),
    "saelens": Format(
        ALL,
        ("cfg.json", "sae_weights.safetensors"),
        _write_saelens,
        _read_saelens,
        lambda f: (f / "sae_weights.safetensors").exists(),
    ),
    "sparsify": Format(
        ("topk",),
        ("cfg.json", "sae.safetensors"),
        _write_sparsify,
        _read_sparsify,
        lambda f: _has_cfg_with(f, "sae.safetensors", False),
    ),
    "dictionary_learning": Format(
        ALL,
        ("ae.pt",),
        _write_dictionary_learning,
        _read_dictionary_learning,
        lambda f: (f / "ae.pt").exists(),
    ),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise SAEError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def formats_in(folder: Path) -> list[str]:
    """Names of the formats whose checkpoint files `folder` holds (none for a missing folder)."""
    if not folder.is_dir():
        return []
    return [name for name, spec in FORMATS.items() if spec.recognise(folder)]


def detect_format(folder: Path | str) -> str:
    """The one format whose files `folder` holds; none or several is an SAEError that says what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"{folder} is not a folder; point to the folder that holds the SAE's files")
    found = formats_in(folder)
    if len(found) > 1:
        raise SAEError(
            f"{folder} holds checkpoints of several formats ({', '.join(found)}); say which to read"
        )
    if not found:
        expected = "; ".join(f"{name}: {' + '.join(spec.files)}" for name, spec in FORMATS.items())
        raise SAEError(f"{folder} holds no SAE checkpoint of a known format ({expected})")
    return found[0]


def export_sae(sae: SAE, folder: Path | str, fmt: str) -> None:
    """Write `sae` into `folder` in format `fmt`. A format that cannot hold its architecture, or a folder that
    already holds another format's checkpoint, is an SAEError."""
    spec, folder = get_format(fmt), Path(folder)
    if sae.architecture not in spec.architectures:
        raise SAEError(
            f"the {fmt} format cannot store a {sae.architecture} SAE; it stores {', '.join(spec.architectures)}"
        )
    others = [name for name in formats_in(folder) if name != fmt]
    if others:
        raise SAEError(
            f"{folder} already holds a {others[0]} checkpoint; write the {fmt} copy to another folder"
        )
    spec.write(sae, folder)


def import_sae(folder: Path | str, fmt: str | None = None) -> SAE:
    """Read the SAE in `folder` (format `fmt`, or the one its files show) as a float32 saelab SAE in eval mode."""
    folder = Path(folder)
    name = fmt or detect_format(folder)
    spec = get_format(name)
    missing = [f for f in spec.files if not (folder / f).exists()]
    if missing:
        raise SAEError(f"{folder} is not a {name} checkpoint: {', '.join(missing)} missing")
    try:
        return spec.read(folder)
    except SAEError as err:
        raise SAEError(f"{name} checkpoint in {folder}: {err}") from err
    except Exception as err:  # a field of the wrong type or a truncated file: name the file, keep the cause
        raise SAEError(f"{name} checkpoint in {folder} is unreadable ({type(err).__name__}: {err})") from err


def convert(src: Path | str, dst: Path | str, to: str, src_fmt: str | None = None) -> str:
    """Read the SAE in `src` and write it to `dst` in format `to`; returns the format it was read from."""
    if Path(src).resolve() == Path(dst).resolve():
        raise SAEError(
            f"source and destination are the same folder ({src}); write the copy to another folder"
        )
    name = src_fmt or detect_format(src)
    export_sae(import_sae(src, name), dst, to)
    return name


# --- helpers -------------------------------------------------------------------------------------------------
def _write_files(folder: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write each file beside its final name, then rename all into place: a kill never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        write(folder / f"{name}.tmp")
    for name in writers:
        (folder / f"{name}.tmp").replace(folder / name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SAEError(f"{path} is not readable JSON ({err})") from err
    if not isinstance(doc, dict):
        raise SAEError(f"{path} holds a JSON {type(doc).__name__}, not an object")
    return doc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a truncated file
        raise SAEError(f"{path} is not a readable safetensors file ({err})") from err


def _expect_keys(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise SAEError(f"tensors do not fit: missing {missing}, unexpected {extra}")
