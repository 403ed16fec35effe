"""What the checkpoint formats share: `Format` (one layout: what it holds, its files, how to write, read and
recognise it), the SAE's tensors in saelab's convention (`Weights`), and careful file reading and writing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saelab.sae import base as sae_lib
from saelab.sae.base import SAE, SAEConfig, SAEError


@dataclass(frozen=True)
class Format:
    """One checkpoint layout: which architectures it can hold, its files, and how to write, read and recognise it."""

    name: str
    holds: tuple[str, ...] | None
    """The saelab architectures the format can hold; None: every registered one (saelab's own format)."""
    files: tuple[str, ...]
    """Files a checkpoint of this format has."""
    write: Callable[[SAE, Path], None]
    read: Callable[[Path], SAE]
    recognise: Callable[[Path], bool]
    """Whether a folder holds a checkpoint of this format (by its files)."""
    refuse: Callable[[SAEConfig], str | None] = lambda cfg: None
    """Why the format cannot hold an SAE of this config although it holds its architecture (a transcoder where
    the format has no transcoder layout, or one of a shape it lacks), in words that finish "cannot hold ...: ";
    None where it can."""

    @property
    def architectures(self) -> tuple[str, ...]:
        """The architectures the format can hold, now (saelab's: every registered one)."""
        return sae_lib.architecture_names() if self.holds is None else self.holds


@dataclass(frozen=True)
class Weights:
    """An SAE's tensors in saelab's convention: pre = (x - b_dec) @ W_enc + b_enc, x_hat = z @ W_dec + b_dec.

    A transcoder's in the convention both peers use for theirs: pre = x @ W_enc + b_enc (nothing subtracted: saelab's
    input centre is folded into b_enc), x_hat = z @ W_dec + b_dec + x @ W_skip, with W_dec [F, O], b_dec [O]."""

    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    threshold: torch.Tensor | None = None
    """batchtopk and matryoshka: the scalar inference threshold; jumprelu: per-latent thresholds [F]."""
    W_skip_DO: torch.Tensor | None = None
    """A skip transcoder's linear path [D, O]; None otherwise."""


def weights_of(sae: SAE) -> Weights:
    """Detached CPU copies of an SAE's tensors (thresholds as values, not logarithms)."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().clone(memory_format=torch.contiguous_format)

    values = sae.threshold_values()
    threshold = None if values is None else copy(values)
    b_enc_F = copy(sae.b_enc_F)
    if sae.b_in_D is not None:  # (x - b_in) W_enc + b_enc = x W_enc + (b_enc - b_in W_enc)
        b_enc_F = b_enc_F - copy(sae.b_in_D) @ copy(sae.W_enc_DF)
    skip = None if sae.W_skip_DO is None else copy(sae.W_skip_DO)
    return Weights(copy(sae.W_enc_DF), b_enc_F, copy(sae.W_dec_FD), copy(sae.b_dec_D), threshold, skip)


def assemble(cfg: SAEConfig, w: Weights) -> SAE:
    """Build an SAE of `cfg` holding `w` (cast to float32); a shape that does not fit is an SAEError. A
    transcoder's input centre stays 0 (`Weights` has it folded into b_enc)."""
    D, F, D_out = cfg.d_in, cfg.d_sae, cfg.out_width
    shapes = {
        "W_enc": (w.W_enc_DF, (D, F)),
        "b_enc": (w.b_enc_F, (F,)),
        "W_dec": (w.W_dec_FD, (F, D_out)),
        "b_dec": (w.b_dec_D, (D_out,)),
    }
    if cfg.skip:
        if w.W_skip_DO is None:
            raise SAEError("a skip transcoder needs W_skip; the checkpoint has none")
        shapes["W_skip"] = (w.W_skip_DO, (D, D_out))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            out = f", d_out={D_out}" if cfg.is_transcoder else ""
            raise SAEError(
                f"{name} has shape {tuple(t.shape)}, expected {shape} for d_in={D}, d_sae={F}{out}"
            )
    sae = sae_lib.build(cfg)
    with torch.no_grad():
        sae.W_enc_DF.copy_(w.W_enc_DF)
        sae.b_enc_F.copy_(w.b_enc_F)
        sae.W_dec_FD.copy_(w.W_dec_FD)
        sae.b_dec_D.copy_(w.b_dec_D)
        if sae.W_skip_DO is not None and w.W_skip_DO is not None:
            sae.W_skip_DO.copy_(w.W_skip_DO)
        if sae.has_threshold:
            if w.threshold is None:
                raise SAEError(f"a {cfg.architecture} SAE needs a threshold; the checkpoint has none")
            # Latents are ReLU'd before the threshold test, so a threshold below 0 acts as 0.
            sae.load_threshold_(w.threshold.float().clamp_min(0.0))
    return sae.eval()


def has_cfg_with(folder: Path, weights: str, architecture_key: bool) -> bool:
    """saelab and sparsify share file names; saelab's cfg.json names an architecture, sparsify's does not."""
    if not ((folder / weights).exists() and (folder / "cfg.json").exists()):
        return False
    return ("architecture" in read_json(folder / "cfg.json")) == architecture_key


def write_files(folder: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write each file beside its final name, then rename all into place: a kill never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        write(folder / f"{name}.tmp")
    for name in writers:
        (folder / f"{name}.tmp").replace(folder / name)


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SAEError(f"{path} is not readable JSON ({err})") from err
    if not isinstance(doc, dict):
        raise SAEError(f"{path} holds a JSON {type(doc).__name__}, not an object")
    return doc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a truncated file
        raise SAEError(f"{path} is not a readable safetensors file ({err})") from err


def expect_keys(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise SAEError(f"tensors do not fit: missing {missing}, unexpected {extra}")
