"""Sparse autoencoders: the interface every architecture shares, and save/load (`cfg.json` + `sae.safetensors`);
its typed results are in `values.py`.

Every architecture shares the affine encoder and decoder
    pre = W_enc (x - b_dec) + b_enc,        x_hat = W_dec z + b_dec,
and differs only in how the latents z are chosen from the pre-activations, in its training objective, and in the
architecture-specific state the trainer, the resampler and the checkpoint formats ask it about (methods of `SAE`).
The built-in architectures, one module each, registered by name in `registry.REGISTRY`:

- `topk.py`: `topk`, `batchtopk`, `matryoshka` (the k-sparse family, with sparse training kernels);
- `relu.py`: `relu`, an L1 penalty and an unconstrained decoder;
- `jumprelu.py`: `jumprelu`, learned per-latent thresholds and an L0 penalty.

Interface (`SAE`): `encode(x) -> SparseCode`, `decode(code) -> x_hat`, `reconstruct(x) -> (x_hat, code)` and
`forward(x) -> ForwardOutput` (inference; `forward(x).x_hat_BD == decode(encode(x))`, forward also returns every
latent's pre-activation), and `training_loss(x, inputs) -> TrainLoss`, the objective `saelab.train.trainer`
minimises. Shapes carry suffixes: B batch, D d_in, F d_sae (latents), K active-latent slots, O d_out.

Transcoders. Every architecture also trains as a transcoder (`SAEConfig.d_out` > 0): it reads one hookpoint (an
MLP's input, after its norm) and reconstructs another's output (that MLP's output), so the decoder writes
`d_out`-wide rows and the loss compares with the target (`LossInputs.target_BD`); encoder, sparsity and the
rest of the objective are the architecture's own. Since b_dec lives in the output space, the encoder subtracts
a fixed centre of the input instead (`b_pre_D`: b_dec for an SAE, the buffer `b_in_D` for a transcoder,
sparsify's transcoders subtract nothing). A skip transcoder adds a learned linear path, x_hat = decode(z) +
x W_skip, W_skip starting at zero (Paulo, Shabalin & Belrose 2025, "Transcoders beat sparse autoencoders for
interpretability"); every architecture's reconstruction loss then reconstructs y - x W_skip, which is the same
objective with the skip's gradient flowing through the target.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.functional import embedding_bag

from saelab.run import atomic
from saelab.sae.registry import ARCH_PARAMS, DEFAULTS, SAEConfig, SAEError, architecture_class

# Re-exported, so that `from saelab.sae import base as sae_lib` reaches the whole SAE API (sae_lib.REGISTRY, ...).
from saelab.sae.registry import REGISTRY as REGISTRY
from saelab.sae.registry import architecture_names as architecture_names
from saelab.sae.registry import register as register
from saelab.sae.values import ForwardOutput, LossInputs, SparseCode, TrainLoss
from saelab.sae.values import auxk_error as auxk_error
from saelab.sae.values import sparse_code as sparse_code

if TYPE_CHECKING:
    from saelab.config import TrainConfig


def sq_err(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared reconstruction error."""
    return (x_BD - x_hat_BD).pow(2).sum(dim=-1).mean()


def auxk_loss(
    sae: SAE,
    pre_BF: torch.Tensor,
    resid_BD: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int,
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, Appendix A.2): the detached residual reconstructed from the top-`k_aux`
    pre-activations of dead latents, normalised by the residual's variance. `pre_BF` may be raw or ReLU'd."""
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return pre_BF.new_zeros(())
    masked_BF = pre_BF.masked_fill(~dead_F, 0.0)
    acts, idx = masked_BF.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    resid_hat_BD = sae.decode(SparseCode(acts.relu(), idx)) - sae.b_dec_D
    return auxk_error(resid_hat_BD, resid_BD, sum_ranks)


class SAE(nn.Module):
    """Shared encoder/decoder and the inference and training templates; subclasses choose the latents and answer
    for their own state: which `SAEConfig` parameters they take (`params`, `params_from`), Adam's parameter groups,
    what resetting a latent touches, whether they train with sparse kernels, and their inference threshold (what
    a checkpoint format must hold)."""

    architecture: ClassVar[str] = ""
    """The registry name (`registry.register`), also `--train.architecture`."""
    params: ClassVar[tuple[str, ...]] = ()
    """`SAEConfig` fields this architecture takes (the keys of `params_from`)."""
    uses_auxk: ClassVar[bool] = True
    unit_norm_decoder: ClassVar[bool] = True
    decoder_init_norm: ClassVar[float] = 1.0
    resample_encoder_scale: ClassVar[float] = 1.0
    """Resampling's norm of a re-initialised encoder column relative to the kept latents' mean, when
    `TrainConfig` leaves it at 0 (auto): 1.0 where a latent must win a top-k slot or clear a threshold to fire."""
    has_threshold: ClassVar[bool] = False
    """Inference compares latents with a learned threshold (`threshold_values`, `load_threshold_`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise SAEError(f"a {cfg.architecture} config cannot build a {self.architecture} SAE")
        self.cfg = cfg
        D, F, D_out = cfg.d_in, cfg.d_sae, cfg.out_width
        W_dec_FD = torch.randn(F, D_out)
        W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        # Encoder starts as the decoder's transpose (Gao et al. 2024, sec. 2.4: tied init); a transcoder's
        # decoder lives in another space, so its encoder columns are drawn on their own, at the same norm.
        W_enc_FD = W_dec_FD
        if cfg.is_transcoder:
            W_enc_FD = torch.randn(F, D)
            W_enc_FD = W_enc_FD / W_enc_FD.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_enc_DF = nn.Parameter(W_enc_FD.T.contiguous())  # row-major, as a loaded checkpoint's
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.b_dec_D = nn.Parameter(torch.zeros(D_out))
        self.b_in_D: torch.Tensor | None
        self.W_skip_DO: nn.Parameter | None
        if cfg.is_transcoder:
            # The input's centre, set from the data before training (fixed: the encoder bias absorbs the rest).
            self.register_buffer("b_in_D", torch.zeros(D))
        else:
            self.b_in_D = None
        # Paulo et al. 2025 start the skip at zero.
        self.W_skip_DO = nn.Parameter(torch.zeros(D, D_out)) if cfg.skip else None

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse parameters of other architectures (a mislabelled cfg.json); subclasses check their own."""
        for name in ARCH_PARAMS:
            if name not in cls.params and getattr(cfg, name) != DEFAULTS[name]:
                raise SAEError(
                    f"{name}={getattr(cfg, name)!r} is not a parameter of a {cls.architecture} SAE; "
                    "was this config written for another architecture?"
                )

    @classmethod
    def params_from(cls, train: TrainConfig) -> dict[str, Any]:
        """This architecture's `SAEConfig` parameters (the names in `params`) from the training config."""
        return {}

    # --- inference -------------------------------------------------------------------------------------------
    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        """Active latents at inference from ReLU'd pre-activations."""
        raise NotImplementedError

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        check_input_finite(x_BD)
        return torch.relu(self.linear(x_BD))

    @property
    def b_pre_D(self) -> torch.Tensor:
        """What the encoder subtracts from its input: b_dec for an SAE, the input's centre for a transcoder."""
        return self.b_dec_D if self.b_in_D is None else self.b_in_D

    def linear(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Raw pre-activations W_enc (x - b_pre) + b_enc. Checks the width only: the trainer checks all its
        activations for NaN/inf once, `pre_acts` (inference) checks every batch."""
        self._check_width(x_BD)
        if x_BD.dim() == 2:
            return torch.addmm(self.b_enc_F, x_BD - self.b_pre_D, self.W_enc_DF)  # fused bias: ~10% faster
        return (x_BD - self.b_pre_D) @ self.W_enc_DF + self.b_enc_F

    def skip_out(self, x_BD: torch.Tensor) -> torch.Tensor | None:
        """A skip transcoder's linear path x W_skip [B, O]; None without one."""
        return None if self.W_skip_DO is None else x_BD @ self.W_skip_DO

    def recon_target(self, x_BD: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
        """What the decoder is trained to reconstruct: x for an SAE; a transcoder's target, less the skip path's
        share for a skip transcoder (so each architecture's reconstruction loss, Matryoshka's prefixes
        included, is the loss of decode(z) + skip against the target)."""
        if not self.cfg.is_transcoder:
            return x_BD
        if inputs.target_BD is None:
            raise SAEError("a transcoder trains on (input, target) pairs: the step was given no target")
        skip = self.skip_out(x_BD)
        return inputs.target_BD if skip is None else inputs.target_BD - skip

    def encode(self, x_BD: torch.Tensor) -> SparseCode:
        return self.select(self.pre_acts(x_BD))

    def decode(self, code: SparseCode) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.W_dec_FD.requires_grad):
            # Inference: a weighted sum of the K decoder rows of each token (embedding_bag), K/F of the dense
            # product's work (evaluation, caching, splicing into the model).
            x_hat_BD = embedding_bag(
                code.top_idx_BK, self.W_dec_FD, per_sample_weights=code.top_acts_BK.to(self.W_dec_FD.dtype),
                mode="sum",
            )  # fmt: skip
            return x_hat_BD + self.b_dec_D
        # Training: scatter into a dense code and multiply. Measured on 2 CPU cores (B=1024, F=2304, K=48), a
        # training step with this dense decoder takes 109 ms against 355 ms for gathering the K rows (the gather's
        # backward is a slow index_add into W_dec).
        z_BF = torch.zeros(
            code.top_acts_BK.shape[0],
            self.cfg.d_sae,
            dtype=code.top_acts_BK.dtype,
            device=code.top_acts_BK.device,
        ).scatter(1, code.top_idx_BK, code.top_acts_BK)
        return self.decode_dense(z_BF)

    def decode_dense(self, z_BF: torch.Tensor) -> torch.Tensor:
        return z_BF @ self.W_dec_FD + self.b_dec_D

    def reconstruct(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """(x_hat, code) at inference, `decode(encode(x))`: what evaluation and splicing use. Unlike `forward` it
        does not keep the pre-activations of all F latents (an architecture's `encode` may skip them)."""
        code = self.encode(x_BD)
        return self._with_skip(self.decode(code), x_BD), code

    def forward(self, x_BD: torch.Tensor) -> ForwardOutput:
        pre_BF = self.pre_acts(x_BD)
        code = self.select(pre_BF)
        return ForwardOutput(self._with_skip(self.decode(code), x_BD), code, pre_BF)

    def _with_skip(self, x_hat_BO: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        skip = self.skip_out(x_BD)
        return x_hat_BO if skip is None else x_hat_BO + skip

    def dense_latents(self, x_BD: torch.Tensor) -> torch.Tensor:
        """[B, F] latent activations with zeros for the inactive ones."""
        code = self.encode(x_BD)
        out = torch.zeros(x_BD.shape[0], self.cfg.d_sae, dtype=code.top_acts_BK.dtype, device=x_BD.device)
        return out.scatter_(1, code.top_idx_BK, code.top_acts_BK)

    # --- training ---------------------------------------------------------------------------------------------
    def param_groups(self, train: TrainConfig) -> list[dict[str, Any]]:
        """Adam's parameter groups, each with the `base_lr` the trainer's schedule scales."""
        return [{"params": list(self.parameters()), "base_lr": train.lr}]

    def step_threads(self, threads: int, mode: str = "all") -> int:
        """Intra-op threads for a training step given `threads` and `TrainConfig.cpu_step_threads` (all of them;
        `KSparseSAE` differs)."""
        return threads

    def use_sparse_kernels(self, on: bool) -> None:
        """Train with the sparse kernels of `sparse_ops` where this architecture has them (no-op otherwise)."""

    def use_selection(self, precision: str) -> None:
        """Choose the training step's active latents from a `precision` matmul where this architecture can
        (`saelab.sae.selection`; no-op otherwise)."""

    def train_latents(self, raw_BF: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, F] the training objective sees, from raw pre-activations (differentiable)."""
        raise NotImplementedError

    def reconstruction_loss(
        self, x_BD: torch.Tensor, z_BF: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction term of the loss, x_hat with the whole dictionary)."""
        x_hat_BD = self.decode_dense(z_BF)
        return sq_err(x_BD, x_hat_BD), x_hat_BD

    def sparsity_penalty(self, raw_BF: torch.Tensor, z_BF: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
        """Weighted sparsity term; none for the k-sparse architectures."""
        return z_BF.new_zeros(())

    def training_loss(self, x_BD: torch.Tensor, inputs: LossInputs) -> TrainLoss:
        raw_BF = self.linear(x_BD)
        z_BF = self.train_latents(raw_BF)
        y_BD = self.recon_target(x_BD, inputs)
        recon, x_hat_BD = self.reconstruction_loss(y_BD, z_BF)
        resid_BD = (y_BD - x_hat_BD).detach()
        aux = z_BF.new_zeros(())
        if self.uses_auxk and inputs.auxk_coef > 0:
            aux = auxk_loss(self, raw_BF, resid_BD, inputs.dead_F, inputs.k_aux, inputs.sum_ranks)
        sparsity = self.sparsity_penalty(raw_BF, z_BF, inputs)
        z_BF = z_BF.detach()
        count_F = (z_BF > 0).sum(dim=0).to(z_BF.dtype)
        return TrainLoss(
            total=recon + inputs.auxk_coef * aux + sparsity,
            mse=resid_BD.pow(2).sum(dim=-1).mean(),
            aux=aux.detach(),
            sparsity=sparsity.detach(),
            l0=count_F.sum() / x_BD.shape[0],
            count_F=count_F,
            act_sum_F=z_BF.sum(dim=0),
        )

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm (no-op for an unconstrained decoder)."""
        if self.unit_norm_decoder:
            self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (keeps the norm constraint)."""
        g = self.W_dec_FD.grad
        if self.unit_norm_decoder and g is not None:
            g -= (g * self.W_dec_FD).sum(dim=1, keepdim=True) * self.W_dec_FD

    @torch.no_grad()
    def reset_latents_(self, idx_K: torch.Tensor, W_dec_KD: torch.Tensor, W_enc_DK: torch.Tensor) -> None:
        """Give latents `idx_K` new decoder rows and encoder columns and restart the rest of their state (encoder
        bias 0; subclasses: thresholds): what resampling a latent touches (`saelab.train.resample`)."""
        self.W_dec_FD[idx_K] = W_dec_KD
        self.W_enc_DF[:, idx_K] = W_enc_DK
        self.b_enc_F[idx_K] = 0.0

    # --- inference threshold (what a checkpoint format must hold beside the weights) --------------------------
    def threshold_values(self) -> torch.Tensor | None:
        """The inference threshold as values: a scalar or one per latent [F]; None without one."""
        return None

    @torch.no_grad()
    def load_threshold_(self, threshold: torch.Tensor) -> None:
        """Set the inference threshold from values (non-negative: latents are ReLU'd before the test)."""
        raise SAEError(f"a {self.architecture} SAE has no threshold to load")

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on `x * scale` take raw x: pre-activations, latents and x_hat all shrink by `scale`,
        so biases (and thresholds, in subclasses) are divided by it; weights stay."""
        self.b_dec_D.div_(scale)
        self.b_enc_F.div_(scale)

    @torch.no_grad()
    def fold_scales(self, input_scale: float, target_scale: float) -> None:
        """Make a transcoder trained on (x * input_scale, y * target_scale) take raw x and give raw y (an SAE:
        both scales equal, `fold_input_scale`). For the positively homogeneous latents of every architecture,
        latents, biases and thresholds shrink by target_scale (`fold_input_scale`), and encoder and skip weights
        grow by input_scale / target_scale; the input's centre shrinks by input_scale."""
        self.fold_input_scale(target_scale)
        if self.b_in_D is not None:
            self.b_in_D.div_(input_scale)
        ratio = input_scale / target_scale
        if ratio != 1.0:
            self.W_enc_DF.mul_(ratio)
            if self.W_skip_DO is not None:
                self.W_skip_DO.mul_(ratio)

    def _check_width(self, x_BD: torch.Tensor) -> None:
        if x_BD.shape[-1] != self.cfg.d_in:
            if self.cfg.is_transcoder:
                raise SAEError(
                    f"input has width {x_BD.shape[-1]} but the transcoder reads d_in={self.cfg.d_in} (from "
                    f"{self.cfg.hookpoint or 'its input hookpoint'}); give it its input hookpoint's activations"
                )
            raise SAEError(
                f"input has d_in={x_BD.shape[-1]} but the SAE expects {self.cfg.d_in} "
                f"(trained on {self.cfg.hookpoint or 'another hookpoint'}); use the SAE's own hookpoint"
            )


def check_input_finite(x_BD: torch.Tensor) -> None:
    if not bool(torch.isfinite(x_BD).all()):
        raise SAEError(
            "input contains NaN/inf activations; check the model dtype (try --model.dtype float32)"
        )


def build(cfg: SAEConfig) -> SAE:
    return architecture_class(cfg.architecture)(cfg)


def save(sae: SAE, folder: Path) -> None:
    """Write `cfg.json` and `sae.safetensors` (whose metadata names the architecture too); files are renamed into
    place, so a kill never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    with atomic.atomic_path(folder / "sae.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"architecture": sae.architecture})
    atomic.write_json(folder / "cfg.json", sae.cfg.to_json())


def load(folder: Path, device: str | torch.device = "cpu", architecture: str | None = None) -> SAE:
    """Load an SAE saved by `save`; a missing or corrupt checkpoint, or one of another architecture than
    `architecture` (when given), is an error, never untrained weights. Returned in eval mode."""
    cfg_path, weights_path = folder / "cfg.json", folder / "sae.safetensors"
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise SAEError(f"{p} is missing; train the SAE first (`saelab train`) or point to its folder")
    try:
        cfg = SAEConfig.from_json(json.loads(cfg_path.read_text()))
        state = load_file(str(weights_path), device=str(device))
        with safe_open(str(weights_path), framework="pt") as f:
            saved_arch = (f.metadata() or {}).get("architecture", cfg.architecture)
    except (json.JSONDecodeError, TypeError, OSError) as err:
        raise SAEError(f"checkpoint in {folder} is corrupt ({err}); retrain with `saelab train`") from err
    except SAEError:
        raise
    except Exception as err:  # safetensors raises its own error type for truncated files
        raise SAEError(f"checkpoint in {folder} is corrupt ({err}); retrain with `saelab train`") from err
    if saved_arch != cfg.architecture:
        raise SAEError(
            f"checkpoint in {folder}: cfg.json says {cfg.architecture} but its weights were saved by a "
            f"{saved_arch} SAE; restore the original cfg.json or retrain"
        )
    if architecture is not None and architecture != cfg.architecture:
        raise SAEError(
            f"checkpoint in {folder} is a {cfg.architecture} SAE, not {architecture}; load it as "
            f"{cfg.architecture} or train a {architecture} SAE"
        )
    sae = build(cfg)
    _check_state_shapes(sae, state, folder)
    sae.load_state_dict(state)
    return sae.to(device).eval()


def _check_state_shapes(sae: SAE, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise SAEError(
            f"checkpoint in {folder} does not match a {sae.architecture} SAE of cfg.json's shape "
            f"(expected {expected}, found {found}); was it written by another architecture?"
        )


def file_sha256(folder: Path) -> str:
    """Hash of an SAE's weight file, for provenance."""
    return hashlib.sha256((folder / "sae.safetensors").read_bytes()).hexdigest()


def check_width(sae: SAE, width: int, where: str) -> None:
    """Raise SAEError unless `sae` is an SAE reading activations of `width` (the output width of `where`, a
    hookpoint); a transcoder, even of that width, would be scored against its own input: silently wrong."""
    if (cfg := sae.cfg).is_transcoder:
        raise SAEError(f"a transcoder ({cfg.hookpoint} -> {cfg.target_hookpoint}) was given where an SAE of "
                       f"{where} is expected; `saelab eval` evaluates it at its own hookpoints")  # fmt: skip
    if sae.cfg.d_in != width:
        raise SAEError(
            f"SAE d_in={sae.cfg.d_in} does not match the width {width} of {where}; "
            "evaluate it with the model and hookpoint it was trained on"
        )


def params_sha256(sae: SAE) -> str:
    """Hash of an SAE's config and parameters (any dtype), in a fixed order: the same for an SAE whatever file format
    it was loaded from, so results on SAEs from SAELens, sparsify or dictionary_learning folders carry one too."""
    h = hashlib.sha256(json.dumps(sae.cfg.to_json(), sort_keys=True).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
"""The two files of an SAE folder written by `save`."""


def saved_files(folder: Path) -> list[Path]:
    """The files `save` writes into `folder` (for a stage's manifest record)."""
    return [folder / CFG_FILE, folder / WEIGHTS_FILE]
