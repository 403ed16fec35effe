"""SAELens side of the format parity tests (see peer_io.py for the job protocol).

load: `SAE.load_from_disk(folder)`, whatever architecture the folder holds. save kinds: `standard` (with
apply_b_dec_to_input=False, so the importer must fold b_dec into b_enc), `topk` (rescale_acts_by_decoder_norm=True,
folded on import), `jumprelu`, `gated` (no saelab equivalent), and the training-only `batchtopk` and
`matryoshka_batchtopk`, saved the way SAELens's trainer does (`save_inference_model`, an inference jumprelu);
their outputs come from that saved inference SAE, since the training SAE selects per batch. Transcoder kinds
(SAELens loads them, it does not train them): `transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
`jumprelu_skip_transcoder`, of the job's `d_out`, with the output hookpoint in `metadata.hook_name_out`. A
transcoder's reconstruction is its forward output (skip path included); `skip` is x @ W_skip.T alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peer_io import Job, randomise, run
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata

TRANSCODERS = {
    "transcoder": (Transcoder, TranscoderConfig),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
}


def outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    latents = sae.encode(x)
    if not isinstance(sae, Transcoder):
        return {"latents": latents, "x_hat": sae.decode(latents)}
    out = {"latents": latents, "x_hat": sae(x)}
    if isinstance(sae, SkipTranscoder):
        out["skip"] = x @ sae.W_skip.T
    return out


def load(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    return outputs(SAE.load_from_disk(job["folder"]), x)


def save(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    kind, folder = job["kind"], Path(job["folder"])
    common = {
        "d_in": x.shape[1],
        "d_sae": d_sae,
        "metadata": SAEMetadata(hook_name=job["hookpoint"], model_name=job["model"]),
    }
    sae: SAE
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(apply_b_dec_to_input=False, **common))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(k=4, rescale_acts_by_decoder_norm=True, **common))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif kind == "gated":
        sae = GatedSAE(GatedSAEConfig(**common))
    elif kind in TRANSCODERS:
        cls, cfg_cls = TRANSCODERS[kind]
        meta = SAEMetadata(
            hook_name=job["hookpoint"], hook_name_out=job["target_hookpoint"], model_name=job["model"]
        )
        sae = cls(cfg_cls(**{**common, "metadata": meta}, d_out=job["d_out"], apply_b_dec_to_input=False))
    else:
        return save_trained(kind, folder, x, common)
    randomise(dict(sae.named_parameters()), thresholds=("threshold",))
    sae.save_model(folder)
    return outputs(sae, x)


def save_trained(kind: str, folder: Path, x: torch.Tensor, common: dict) -> dict[str, torch.Tensor]:
    if kind == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=4, **common))
    elif kind == "matryoshka_batchtopk":
        widths = [common["d_sae"] // 4, common["d_sae"] // 2, common["d_sae"]]
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(k=4, matryoshka_widths=widths, **common)
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        raise ValueError(f"unknown SAELens kind {kind!r}")
    randomise(dict(sae.named_parameters()))
    sae.topk_threshold = torch.tensor(1.5, dtype=torch.double)  # as if learned
    sae.save_inference_model(folder)
    return outputs(SAE.load_from_disk(folder), x)


if __name__ == "__main__":
    run(load, save)
