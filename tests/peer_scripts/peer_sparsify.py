"""sparsify side of the format parity tests (see peer_io.py for the job protocol).

load: `SparseCoder.load_from_disk(folder)`. save kinds: `topk`, `transcode` and `transcode_skip` (a transcoder,
and one with `skip_connection`), and `groupmax` and `skip_sae` (a skip connection without transcode), which saelab
cannot read. The reconstruction is the coder's forward output (for a transcoder: its prediction of the target,
the skip path included); `skip` is the skip path x @ W_skip.T alone. Triton is off (CPU).
"""

from __future__ import annotations

import os

os.environ["SPARSIFY_DISABLE_TRITON"] = "1"

import torch
from peer_io import Job, dense, randomise, run
from sparsify import SparseCoder, SparseCoderConfig


def outputs(sae: SparseCoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    top_acts, top_idx, _ = sae.encode(x)
    out = {"latents": dense(top_acts, top_idx, sae.num_latents), "x_hat": sae(x).sae_out}
    if sae.W_skip is not None:
        out["skip"] = x @ sae.W_skip.mT
    return out


def load(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    return outputs(SparseCoder.load_from_disk(job["folder"]), x)


def save(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    kind = job["kind"]
    if kind not in ("topk", "groupmax", "transcode", "transcode_skip", "skip_sae"):
        raise ValueError(f"unknown sparsify kind {kind!r}")
    cfg = SparseCoderConfig(
        num_latents=d_sae,
        k=4,
        activation="groupmax" if kind == "groupmax" else "topk",
        transcode=kind.startswith("transcode"),
        skip_connection=kind in ("transcode_skip", "skip_sae"),
    )
    sae = SparseCoder(x.shape[1], cfg)
    randomise(dict(sae.named_parameters()))
    sae.save_to_disk(job["folder"])
    return outputs(sae, x)


if __name__ == "__main__":
    run(load, save)
