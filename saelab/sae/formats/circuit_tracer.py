"""circuit-tracer's per-layer transcoder files (circuit-tracer 0.5): a folder holding `config.yaml` and one
`layer_{i}.safetensors` per layer, the layout circuit-tracer's own cache has (`load_transcoders_from_cache` reads
the whole set; `load_relu_transcoder(path, layer)` reads one layer's file).

    export_sae(tc, "out/ct", "circuit_tracer")     # writes out/ct/layer_3.safetensors and out/ct/config.yaml
    tc = import_sae("out/ct")                      # a folder holding one layer's file
    tcs = read_set("path/to/set")                  # layer index -> transcoder, every layer of a set
    tc = read_layer("path/to/set", 3)

One layer's file: `W_enc` [F, D], `W_dec` [F, D], `b_enc` [F], `b_dec` [D], for JumpReLU
`activation_function.threshold` [F] (latents pre * (pre > threshold); none: ReLU), for a skip transcoder `W_skip`
[D, D] (x_hat += x @ W_skip.T). The encoder subtracts nothing, so saelab's input centre is folded into b_enc.
circuit-tracer's `SingleLayerTranscoder` has one width (d_model) for input and output and no TopK, so it holds
ReLU and JumpReLU transcoders with d_out = d_in; BatchTopK and Matryoshka go as JumpReLU with every threshold equal
to the learned one (saelab's latents are ReLU'd before the threshold test, so a threshold below 0 is written as 0).

`config.yaml` is the set's: `model_kind: transcoder_set`, `model_name`, and the TransformerLens hook names
`feature_input_hook` / `feature_output_hook` (without the `blocks.{i}.` prefix). The layer comes from the
hookpoints: `layers.{i}.post_attention_layernorm -> layers.{i}.mlp` (a Llama-layout MLP, any prefix) is
`mlp.hook_in -> mlp.hook_out`, as circuit-tracer's own TransformerLens-to-HuggingFace mapping has it, and
`blocks.{i}.<hook>` is `<hook>`; a transcoder with other hookpoints, or input and output in different layers, is
refused. Exporting into a folder that already holds other layers of a set adds this layer, if the set's
`config.yaml` names the same hooks and model and its layers the same number of latents; circuit-tracer loads a
set only once it covers every layer from 0.

saelab's own config of the layer (hookpoints as written, the trained architecture, k, Matryoshka's prefixes,
JumpReLU's training parameters) goes in the layer file's safetensors metadata (`saelab_cfg`), which circuit-tracer
ignores, and is read back where it fits the tensors. A file without it (circuit-tracer's own, or one it saved
again) reads as `relu` or `jumprelu` (bandwidth 0.1, as circuit-tracer's loader gives its JumpReLU; initial
threshold saelab's training default, 1.0), its hookpoints mapped back from the hooks (`mlp.hook_in` ->
`layers.{i}.post_attention_layernorm`, `mlp.hook_out` -> `layers.{i}.mlp`, any other `<hook>` ->
`blocks.{i}.<hook>`, a TransformerLens name that saelab's HuggingFace models do not have). Cross-layer
transcoders (`model_kind: cross_layer_transcoder`) are not read, and a config's `transcoders:` list (hub URIs) is
not followed: saelab reads the layer files in the folder, and nothing here downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.formats.common import (
    Format,
    Weights,
    assemble,
    expect_keys,
    read_safetensors,
    weights_of,
    write_files,
)

CONFIG = "config.yaml"
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_THRESHOLD = "activation_function.threshold"
_META_KEY = "saelab_cfg"
# saelab's module name (a Llama-layout MLP's input and output) <-> circuit-tracer's TransformerLens hook name.
_TL_HOOK = {"post_attention_layernorm": "mlp.hook_in", "mlp": "mlp.hook_out"}
_MODULE = {hook: module for module, hook in _TL_HOOK.items()}
_HF_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(post_attention_layernorm|mlp)$")
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
# A file without saelab's config: circuit-tracer's loader builds its JumpReLU with bandwidth 0.1; it has no
# initial threshold, so saelab's training default stands in (inference reads neither).
_JUMPRELU_DEFAULTS: dict[str, Any] = {"jumprelu_bandwidth": 0.1, "jumprelu_init_threshold": 1.0}
_THRESHOLD_ARCHS = ("jumprelu", "batchtopk", "matryoshka")


def _tl_hook(hookpoint: str) -> tuple[int, str] | None:
    """(layer, TransformerLens hook name) of a saelab hookpoint, where saelab knows it."""
    if m := _TL_NAME.match(hookpoint):
        return int(m[1]), m[2]
    if m := _HF_NAME.search(hookpoint):
        return int(m[1]), _TL_HOOK[m[2]]
    return None


def _hookpoint(layer: int, hook: str) -> str:
    """The saelab hookpoint of a circuit-tracer hook at `layer` (the inverse of `_tl_hook`)."""
    return f"layers.{layer}.{_MODULE[hook]}" if hook in _MODULE else f"blocks.{layer}.{hook}"


def _refuse(cfg: SAEConfig) -> str | None:
    if not cfg.is_transcoder:
        return "circuit-tracer's files hold transcoders (one layer's MLP input to its output), not SAEs"
    if cfg.d_out != cfg.d_in:
        return (
            f"d_out={cfg.d_out} differs from d_in={cfg.d_in}, and circuit-tracer's SingleLayerTranscoder has one "
            "width (d_model) for input and output"
        )
    hooks = [_tl_hook(cfg.hookpoint), _tl_hook(cfg.target_hookpoint)]
    if hooks[0] is None or hooks[1] is None:
        return (
            "circuit-tracer names hooks by layer and TransformerLens hook, which saelab knows for "
            "layers.{i}.post_attention_layernorm -> layers.{i}.mlp (Llama layout) and blocks.{i}.<hook>"
        )
    if hooks[0][0] != hooks[1][0]:
        return (
            f"its input is in layer {hooks[0][0]} and its output in layer {hooks[1][0]}, and a circuit-tracer "
            "layer file reads and writes one layer"
        )
    return None


def layers_in(folder: Path) -> dict[int, Path]:
    """Layer index -> that layer's file, for the `layer_{i}.safetensors` files in `folder`."""
    found = {}
    for path in folder.glob("layer_*.safetensors"):
        if m := _LAYER_FILE.match(path.name):
            found[int(m[1])] = path
    return dict(sorted(found.items()))


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load((folder / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SAEError(f"{folder / CONFIG} is not readable YAML ({err})") from err
    if not isinstance(doc, dict):
        raise SAEError(f"{folder / CONFIG} holds a YAML {type(doc).__name__}, not a mapping")
    return doc


def _set_config(cfg: SAEConfig) -> dict[str, Any]:
    """The set's `config.yaml` for a set holding this transcoder (`_refuse` has checked its hookpoints)."""
    hook_in, hook_out = _tl_hook(cfg.hookpoint), _tl_hook(cfg.target_hookpoint)
    assert hook_in is not None and hook_out is not None
    doc: dict[str, Any] = {"model_kind": "transcoder_set"}
    if cfg.model:
        doc["model_name"] = cfg.model
    return doc | {"feature_input_hook": hook_in[1], "feature_output_hook": hook_out[1]}


def _check_joins(folder: Path, doc: dict[str, Any], layer: int, d_sae: int) -> None:
    """Refuse to add a layer to a set in `folder` whose config or latent count differs from this one's."""
    if not (folder / CONFIG).exists():
        return
    old = _read_config(folder)
    for key in ("model_kind", "model_name", "feature_input_hook", "feature_output_hook"):
        if old.get(key) != doc.get(key):
            raise SAEError(
                f"{folder} holds a circuit-tracer set with {key}={old.get(key)!r}, and this transcoder's is "
                f"{doc.get(key)!r}; write it to another folder"
            )
    for other, path in layers_in(folder).items():
        if other == layer:
            continue
        with safe_open(str(path), framework="pt") as f:
            width = f.get_slice("b_enc").get_shape()[0]
        if width != d_sae:
            raise SAEError(
                f"{folder} holds a circuit-tracer set of {width} latents per layer (layer {other}), and "
                f"circuit-tracer needs every layer's to be equal; this transcoder has {d_sae}"
            )


def _write(sae: SAE, folder: Path) -> None:
    cfg, w = sae.cfg, weights_of(sae)
    hook_in = _tl_hook(cfg.hookpoint)
    assert hook_in is not None
    layer, doc = hook_in[0], _set_config(cfg)
    _check_joins(folder, doc, layer, cfg.d_sae)
    tensors = {
        "W_enc": w.W_enc_DF.T.contiguous(),
        "W_dec": w.W_dec_FD,
        "b_enc": w.b_enc_F,
        "b_dec": w.b_dec_D,
    }
    if w.threshold is not None:  # saelab's latents are ReLU'd first: a threshold below 0 acts as 0
        tensors[_THRESHOLD] = w.threshold.expand(cfg.d_sae).clamp_min(0.0).contiguous()
    if w.W_skip_DO is not None:
        tensors["W_skip"] = w.W_skip_DO.T.contiguous()
    meta = {_META_KEY: json.dumps(cfg.to_json())}
    writers = {
        f"layer_{layer}.safetensors": lambda p: save_file(tensors, str(p), metadata=meta),
    }
    if not (folder / CONFIG).exists():
        writers[CONFIG] = lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False))
    write_files(folder, writers)


def _read(folder: Path) -> SAE:
    layers = layers_in(folder)
    if len(layers) != 1:
        names = ", ".join(p.name for p in layers.values()) or "no layer_{i}.safetensors"
        raise SAEError(
            f"the set holds {len(layers)} layers ({names}), and saelab reads one transcoder at a time: "
            "read_layer(folder, i) or read_set(folder) from saelab.sae.formats.circuit_tracer, or a folder of "
            f"{CONFIG} and one layer's file"
        )
    return read_layer(folder, next(iter(layers)))


def read_set(folder: Path | str) -> dict[int, SAE]:
    """Every layer of the circuit-tracer set in `folder`: layer index -> transcoder."""
    return {layer: read_layer(folder, layer) for layer in layers_in(Path(folder))}


def read_layer(folder: Path | str, layer: int) -> SAE:
    """Layer `layer` of the circuit-tracer set in `folder` as a float32 saelab transcoder in eval mode."""
    folder = Path(folder)
    config = _read_config(folder)
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise SAEError(f"model_kind={kind!r}: saelab reads circuit-tracer's per-layer sets (transcoder_set)")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str):
            raise SAEError(f"{CONFIG} names no {key}")
    path = folder / f"layer_{layer}.safetensors"
    if not path.exists():
        raise SAEError(f"{path.name} missing (the folder holds layers {list(layers_in(folder))})")
    state = read_safetensors(path)
    skip = "W_skip" in state
    expect_keys(state, {"W_enc", "W_dec", "b_enc", "b_dec"} | ({_THRESHOLD, "W_skip"} & set(state)))
    t = {k: v.float() for k, v in state.items()}
    threshold = t.get(_THRESHOLD)
    if threshold is not None and bool((threshold < 0).any()):
        raise SAEError(
            f"{path.name} has thresholds below 0: circuit-tracer's JumpReLU passes negative pre-activations "
            "above them, and saelab's (ReLU'd before the threshold test) cannot"
        )
    d_sae, d_model = t["W_enc"].shape
    derived = SAEConfig(
        "relu" if threshold is None else "jumprelu", d_model, d_sae,
        hookpoint=_hookpoint(layer, config["feature_input_hook"]), model=str(config.get("model_name") or ""),
        d_out=int(t["b_dec"].shape[0]), target_hookpoint=_hookpoint(layer, config["feature_output_hook"]),
        skip=skip, **({} if threshold is None else _JUMPRELU_DEFAULTS),
    )  # fmt: skip
    cfg = _saved_config(path, layer, derived, threshold)
    if threshold is not None and cfg.architecture != "jumprelu":
        threshold = threshold[0]  # batchtopk and matryoshka: one threshold, which every latent's equals
    skip_DO = t["W_skip"].T if skip else None
    return assemble(cfg, Weights(t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"], threshold, skip_DO))


def _saved_config(path: Path, layer: int, derived: SAEConfig, threshold_F: torch.Tensor | None) -> SAEConfig:
    """saelab's own config of the layer from the file's metadata, where it fits the tensors and the layer;
    `derived` (from the tensors and config.yaml) otherwise."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(_META_KEY)
    if not text:
        return derived
    try:
        saved = SAEConfig.from_json(json.loads(text))
    except (ValueError, TypeError):  # SAEError is a ValueError; so is bad JSON
        return derived
    if threshold_F is None:
        fits = saved.architecture == "relu"
    else:
        uniform = bool((threshold_F == threshold_F[0]).all())
        fits = saved.architecture == "jumprelu" or (saved.architecture in _THRESHOLD_ARCHS and uniform)
    hooks = [_tl_hook(saved.hookpoint), _tl_hook(saved.target_hookpoint)]
    same = (saved.d_in, saved.d_sae, saved.d_out, saved.skip) == (
        derived.d_in, derived.d_sae, derived.d_out, derived.skip,
    )  # fmt: skip
    in_layer = all(h is not None and h[0] == layer for h in hooks)
    return saved if fits and same and in_layer else derived


def _recognise(folder: Path) -> bool:
    return (folder / CONFIG).exists() and bool(layers_in(folder))


FORMAT = Format(
    "circuit_tracer",
    ("relu", "jumprelu", "batchtopk", "matryoshka"),
    (CONFIG,),
    _write,
    _read,
    _recognise,
    _refuse,
)
