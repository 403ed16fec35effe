"""circuit-tracer side of the format parity tests (see peer_io.py for the job protocol).

load kinds: `layer` reads `folder`/layer_{job["layer"]}.safetensors with circuit-tracer's per-layer loader
(`load_relu_transcoder`, eager); `set` reads the whole folder as a set with circuit-tracer's cache loader
(`load_transcoders_from_cache`, which reads config.yaml and every layer_{i}.safetensors; nothing is downloaded) and
writes each layer's outputs with the suffix `_{i}`, and the set's hooks to `out`.json. save kinds: `relu`,
`jumprelu`, `relu_skip`, `jumprelu_skip`: a `SingleLayerTranscoder` at layer `job["layer"]` with random weights,
saved with its own `to_safetensors`; `set`: a `TranscoderSet` of `job["n_layers"]` layers of `job["set_kind"]`,
saved with the set's `to_safetensors` (outputs suffixed `_{i}`); either beside a config.yaml of the form
circuit-tracer's cache writes (circuit-tracer writes that file only while caching a set from the hub). Outputs: `latents` (encode), `x_hat` (forward: decode,
skip path included) and `skip` (compute_skip) alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import (
    SingleLayerTranscoder,
    TranscoderSet,
    load_relu_transcoder,
)
from circuit_tracer.utils.caching import load_transcoders_from_cache
from peer_io import Job, randomise, run

CPU = torch.device("cpu")


def outputs(tc: SingleLayerTranscoder, x: torch.Tensor, suffix: str = "") -> dict[str, torch.Tensor]:
    out = {f"latents{suffix}": tc.encode(x), f"x_hat{suffix}": tc(x)}
    if tc.W_skip is not None:
        out[f"skip{suffix}"] = tc.compute_skip(x)
    return out


def load(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    folder = Path(job["folder"])
    if job["kind"] == "layer":
        path = folder / f"layer_{job['layer']}.safetensors"
        tc = load_relu_transcoder(str(path), job["layer"], device=CPU, lazy_encoder=False, lazy_decoder=False)
        return outputs(tc, x)
    tcs, config = load_transcoders_from_cache(
        folder.name, cache_dir=folder.parent, device=CPU, lazy_encoder=False, lazy_decoder=False
    )
    hooks = {"feature_input_hook": tcs.feature_input_hook, "feature_output_hook": tcs.feature_output_hook}
    Path(job["out"] + ".json").write_text(json.dumps({**hooks, "n_layers": len(tcs), "config": config}))
    return {k: v for i, tc in enumerate(tcs) for k, v in outputs(tc, x, f"_{i}").items()}


def _transcoder(kind: str, layer: int, d_model: int, d_sae: int) -> SingleLayerTranscoder:
    if kind not in ("relu", "jumprelu", "relu_skip", "jumprelu_skip"):
        raise ValueError(f"unknown circuit-tracer kind {kind!r}")
    act = JumpReLU(torch.zeros(d_sae), 0.1) if kind.startswith("jumprelu") else F.relu
    tc = SingleLayerTranscoder(
        d_model, d_sae, act, layer, skip_connection=kind.endswith("_skip"), device=CPU, dtype=torch.float32
    )
    randomise(dict(tc.named_parameters()), ("activation_function.threshold",))
    return tc


def save(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_kind": "transcoder_set", "model_name": job["model"]} | job["hooks"]
    (folder / "config.yaml").write_text(yaml.dump(config))
    if job["kind"] == "set":  # layers 0..n-1 of `set_kind`, saved by the set's own to_safetensors
        tcs = {i: _transcoder(job["set_kind"], i, x.shape[1], d_sae) for i in range(job["n_layers"])}
        TranscoderSet(tcs, **job["hooks"]).to_safetensors(str(folder))
        return {k: v for i, tc in tcs.items() for k, v in outputs(tc, x, f"_{i}").items()}
    tc = _transcoder(job["kind"], job["layer"], x.shape[1], d_sae)
    tc.to_safetensors(str(folder / f"layer_{job['layer']}.safetensors"))
    return outputs(tc, x)


if __name__ == "__main__":
    run(load, save)
