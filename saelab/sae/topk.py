"""The k-sparse architectures: a fixed budget of k active latents per token (topk) or per token on average over
a batch (batchtopk, matryoshka), with AuxK for dead latents and sparse training kernels (`sparse_ops.py`).

- `topk`: z = TopK(ReLU(pre)) per token, unit-norm decoder rows, AuxK for dead latents (Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders").
- `batchtopk`: training keeps the k*B largest ReLU(pre) of the whole batch, so rows get varying numbers of
  latents; inference replaces the batch by one learned threshold, the running mean of the smallest kept
  activation (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").
- `matryoshka`: BatchTopK whose nested dictionary prefixes each reconstruct x on their own; ONE global BatchTopK
  selection is shared by all prefixes (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
  Sparse Autoencoders"; Nabeshima 2024).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from saelab.sae.base import (
    SAE,
    LossInputs,
    SAEConfig,
    SAEError,
    SparseCode,
    TrainLoss,
    auxk_error,
    check_input_finite,
    register,
    sparse_code,
    sq_err,
)
from saelab.sae.selection import BF16Selector
from saelab.sae.sparse_ops import Entries, decode_entries, entry_preacts, torch_threads

if TYPE_CHECKING:
    from saelab.config import TrainConfig


DENSE_AUXK_RATIO = 4
"""AuxK runs as dense products over the dead latents' columns (`_auxk_dense`) while at most this many times
k_aux latents are dead, else through the sparse kernels over its B * k_aux entries. Measured at 18,432 latents,
B 4,096, k_aux 288 on 2 CPU cores, added to a step: 300 dead 0.07 s dense against 0.23 s sparse, 1,000 dead 0.19
against 0.23, 3,000 dead 0.51 against 0.33."""


def _check_k(cfg: SAEConfig) -> None:
    if not 0 < cfg.k < cfg.d_sae:
        raise SAEError(
            f"k must be in (0, d_sae={cfg.d_sae}) for a {cfg.architecture} SAE, got {cfg.k}; "
            "lower k or widen the SAE"
        )


class KSparseSAE(SAE):
    """The training path shared by the k-sparse architectures (topk, batchtopk, matryoshka).

    The dense encoder matmul runs without autograd and only chooses the active entries (`train_entries`); the
    loss is then built from those entries with the kernels of `sparse_ops`, whose backward passes touch the
    B*k entries instead of all B*F latents. `sparse_training = False` takes the dense reference path
    (`SAE.training_loss` on `train_latents`), which computes the same loss and gradients; tests compare the
    two."""

    params: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.sparse_training = True
        self._preacts_BF: torch.Tensor | None = None
        """The training step's dense pre-activations, kept between steps (`selection_preacts`)."""
        self._matmul_threads = 0
        """Threads for the dense selection matmul when the rest of the step runs on one (`step_threads`)."""
        self.selector: BF16Selector | None = None
        """The bfloat16 choice of the entries checked in float32 (`selection.py`), where an architecture has one
        and `use_selection` asked for it; None: the float32 matmul."""

    def use_selection(self, precision: str) -> None:
        """Choose the training entries from a `precision` matmul (`float32`, or `bfloat16` checked in float32 where
        the architecture supports it: topk). Either choice keeps the same entries."""
        self.selector = BF16Selector() if precision == "bfloat16" and self.bf16_selection else None

    bf16_selection: ClassVar[bool] = False
    """Whether `choose_entries` can take its entries from `BF16Selector` (per-row TopK)."""

    def step_threads(self, threads: int, mode: str = "all") -> int:
        """With `mode` "one-after-matmul", one thread for a CPU step with the sparse kernels, all `threads` kept
        for the dense selection matmul. Everything after that matmul is many short operations (top-k, CSR
        products, gathers, Adam) that gain little from a second thread and lose much when a busy core stalls
        their barriers: at 18,432 latents on 2 cores (load ~10) a step took 2.2 CPU s with 2 threads throughout and
        1.2-1.3 with 1 thread after the matmul, at half the wall time, same loss (`benchmarks/step_profile.py`).
        Where cores are free it loses (the post-matmul work holds one), so "all" is the default."""
        if (
            mode != "one-after-matmul"
            or not self.sparse_training
            or self.W_enc_DF.device.type != "cpu"
            or threads <= 1
        ):
            self._matmul_threads = 0
            return threads
        self._matmul_threads = threads
        return 1

    def train(self, mode: bool = True) -> Self:
        if not mode:
            self._preacts_BF = None  # an SAE put to use holds no training buffer
            if self.selector is not None:
                self.selector.release()
        return super().train(mode)

    @torch.no_grad()
    def selection_preacts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """`linear(x)` for choosing the entries, written into a [B, F] buffer kept from the last step. A fresh
        [B, F] tensor each step is a fresh mapping of B*F*4 bytes (300 MB at 4,096 x 18,432) whose pages the
        kernel faults in and zeroes on first touch: ~15% of the encoder matmul's CPU time measured at that
        width. Valid until the next call."""
        if x_BD.dim() != 2:
            return self.linear(x_BD)
        self._check_width(x_BD)
        shape = (x_BD.shape[0], self.cfg.d_sae)
        buf = self._preacts_BF
        if buf is None or buf.shape != shape or buf.dtype != x_BD.dtype or buf.device != x_BD.device:
            buf = self._preacts_BF = x_BD.new_empty(shape)
        with torch_threads(self._matmul_threads or torch.get_num_threads()):
            return torch.addmm(self.b_enc_F, x_BD - self.b_pre_D, self.W_enc_DF, out=buf)

    @classmethod
    def params_from(cls, train: TrainConfig) -> dict[str, Any]:
        return {"k": train.k}

    def use_sparse_kernels(self, on: bool) -> None:
        self.sparse_training = on

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        _check_k(cfg)

    def train_entries(self, raw_BF: torch.Tensor) -> tuple[Entries, torch.Tensor]:
        """The entries the training objective keeps, from raw pre-activations (no autograd), and their raw
        values in CSR order. Entries whose value is <= 0 stay in the pattern and add nothing after the ReLU."""
        raise NotImplementedError

    def train_latents(self, raw_BF: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            entries, _ = self.train_entries(raw_BF)
        rows, cols = entries.rows_N(), entries.col_N
        return torch.zeros_like(raw_BF).index_put((rows, cols), raw_BF[rows, cols].relu())

    def entry_reconstruction_loss(
        self, x_BD: torch.Tensor, vals_N: torch.Tensor, entries: Entries
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`reconstruction_loss` from the active entries."""
        x_hat_BD = decode_entries(vals_N, self.W_dec_FD, entries) + self.b_dec_D
        return sq_err(x_BD, x_hat_BD), x_hat_BD

    def training_loss(self, x_BD: torch.Tensor, inputs: LossInputs) -> TrainLoss:
        if not self.sparse_training:
            return super().training_loss(x_BD, inputs)
        entries, pre_N, raw_BF = self.choose_entries(x_BD)
        # AuxK's latents: the dead ones, found once (one device sync), none when AuxK is off
        dead_idx = (
            inputs.dead_F.nonzero().flatten()
            if inputs.auxk_coef > 0
            else inputs.dead_F.new_zeros(0, dtype=torch.long)
        )
        dense_aux = 0 < dead_idx.numel() <= DENSE_AUXK_RATIO * inputs.k_aux
        aux_sel = None if dense_aux else self._auxk_entries(x_BD, raw_BF, dead_idx, inputs.k_aux)
        vals_N, aux_vals_N = self._entry_acts(x_BD, pre_N, entries, aux_sel)
        y_BD = self.recon_target(x_BD, inputs)  # x, or a transcoder's target (saelab.sae.base)
        recon, x_hat_BD = self.entry_reconstruction_loss(y_BD, vals_N, entries)
        resid_BD = (y_BD - x_hat_BD).detach()
        aux = recon.new_zeros(())
        if dense_aux:
            aux = self._auxk_dense(x_BD, resid_BD, dead_idx, inputs)
        elif aux_sel is not None:
            # `auxk_loss` over the dead latents' columns only.
            aux_BD = decode_entries(aux_vals_N, self.W_dec_FD, aux_sel[0])
            aux = auxk_error(aux_BD, resid_BD, inputs.sum_ranks)
        vals_N = vals_N.detach()
        zeros_F = vals_N.new_zeros(self.cfg.d_sae)
        count_F = zeros_F.index_add(0, entries.col_N, (vals_N > 0).to(vals_N.dtype))
        return TrainLoss(
            total=recon + inputs.auxk_coef * aux,
            mse=resid_BD.pow(2).sum(dim=-1).mean(),
            aux=aux.detach(),
            sparsity=recon.new_zeros(()),
            l0=count_F.sum() / x_BD.shape[0],
            count_F=count_F,
            act_sum_F=zeros_F.index_add(0, entries.col_N, vals_N),
        )

    def choose_entries(self, x_BD: torch.Tensor) -> tuple[Entries, torch.Tensor, torch.Tensor | None]:
        """The training entries, their float32 pre-activations in CSR order, and the dense pre-activations they
        were chosen from (None when `selector` chose them without float32 ones)."""
        raw_BF = self.selection_preacts(x_BD)
        entries, pre_N = self.train_entries(raw_BF)
        return entries, pre_N, raw_BF

    def _entry_acts(
        self,
        x_BD: torch.Tensor,
        pre_N: torch.Tensor,
        entries: Entries,
        aux: tuple[Entries, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU'd differentiable values of the entries, and of the AuxK entries `aux` (empty without). Both go
        through ONE `entry_preacts` (the AuxK entries as rows B..2B-1 of a stacked pattern over [x; x]), so the
        encoder's gradient from both losses is one sparse product instead of two products, two [F, D] results
        and their sum."""
        if aux is None:
            acts_N = entry_preacts(pre_N, x_BD, self.W_enc_DF, self.b_enc_F, self.b_pre_D, entries).relu()
            return acts_N, acts_N[:0]
        aux_entries, aux_pre_N = aux
        both = Entries.stacked(entries, aux_entries)
        x2_BD = torch.cat([x_BD, x_BD])
        pre2_N = torch.cat([pre_N, aux_pre_N])
        acts_N = entry_preacts(pre2_N, x2_BD, self.W_enc_DF, self.b_enc_F, self.b_pre_D, both).relu()
        return acts_N[: pre_N.numel()], acts_N[pre_N.numel() :]

    def _auxk_dense(
        self, x_BD: torch.Tensor, resid_BD: torch.Tensor, dead_idx: torch.Tensor, inputs: LossInputs
    ) -> torch.Tensor:
        """`auxk_loss` as dense, differentiable products over the dead latents' columns `dead_idx` only:
        [B, D] @ [D, dead], top-`k_aux` per row, [B, dead] @ [dead, D]."""
        pre_BX = self._columns_preacts(x_BD, dead_idx)
        vals, j = pre_BX.topk(min(inputs.k_aux, dead_idx.numel()), dim=-1, sorted=False)
        z_BX = torch.zeros_like(pre_BX).scatter(1, j, vals.relu())
        aux_BD = z_BX @ self.W_dec_FD.index_select(0, dead_idx)
        return auxk_error(aux_BD, resid_BD, inputs.sum_ranks)

    def _columns_preacts(self, x_BD: torch.Tensor, idx_X: torch.Tensor) -> torch.Tensor:
        """[B, X] float32 pre-activations of latents `idx_X` only (differentiable where autograd is on)."""
        W_DX = self.W_enc_DF.index_select(1, idx_X)
        return torch.addmm(self.b_enc_F.index_select(0, idx_X), x_BD - self.b_pre_D, W_DX)

    def _auxk_entries(
        self, x_BD: torch.Tensor, raw_BF: torch.Tensor | None, dead_idx: torch.Tensor, k_aux: int
    ) -> tuple[Entries, torch.Tensor] | None:
        """AuxK's entries (Gao et al. 2024, Appendix A.2): each row's top-`k_aux` raw pre-activations among the
        dead latents `dead_idx`, and their values; None when there are none (no latent dead, or AuxK off). Without
        `raw_BF` the dead latents' pre-activations are computed in float32 (a [B, D] @ [D, dead] matmul)."""
        if dead_idx.numel() == 0:
            return None
        if raw_BF is None:
            with torch.no_grad():
                dead_BF = self._columns_preacts(x_BD, dead_idx)
        else:
            dead_BF = raw_BF.index_select(1, dead_idx)
        pre, j = dead_BF.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
        return Entries.rectangle(dead_idx[j], self.cfg.d_sae), pre.reshape(-1)


@register
class TopKSAE(KSparseSAE):
    """TopK sparse autoencoder with unit-norm decoder rows."""

    architecture = "topk"
    bf16_selection = True

    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        acts, idx = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return SparseCode(acts, idx)

    def encode(self, x_BD: torch.Tensor) -> SparseCode:
        # TopK of the raw pre-activations, then ReLU on the K kept values: the code of TopK(ReLU(pre)) (a kept
        # value below 0 is an inactive 0 either way) without a ReLU pass over all F latents.
        check_input_finite(x_BD)
        acts, idx = self.linear(x_BD).topk(self.cfg.k, dim=-1, sorted=False)
        return SparseCode(acts.relu(), idx)

    def choose_entries(self, x_BD: torch.Tensor) -> tuple[Entries, torch.Tensor, torch.Tensor | None]:
        if self.selector is None or x_BD.dim() != 2:
            return super().choose_entries(x_BD)
        self._check_width(x_BD)
        with torch_threads(self._matmul_threads or torch.get_num_threads()):
            chosen = self.selector.topk(x_BD, self.W_enc_DF, self.b_enc_F, self.b_pre_D, self.cfg.k)
        return Entries.rectangle(chosen.idx_BK, self.cfg.d_sae), chosen.vals_BK.reshape(-1), None

    def train_entries(self, raw_BF: torch.Tensor) -> tuple[Entries, torch.Tensor]:
        # TopK of the raw values equals TopK after the ReLU wherever the kept values are positive.
        vals, idx = raw_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return Entries.rectangle(idx, self.cfg.d_sae), vals.reshape(-1)


def batch_topk(x_BF: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest values of x and their flat indices, like `x.flatten().topk(n)`, without a top-n over all
    B*F values: a threshold below the n-th value is estimated from an evenly spread sample, the values above it
    are gathered in one pass, and the exact top-n runs on those. Exact: when fewer than n values clear the
    threshold (a misjudged sample, ties), the full flat top-n runs instead. Measured on 2 busy CPU cores (4096 x
    4608, n = 32 per row): ~4x faster than the flat top-n."""
    flat = x_BF.flatten()
    N = flat.numel()
    if n * 20 > N:  # a large share of the values: nothing to gain
        return flat.topk(n, sorted=False)
    stride = max(1, N // 65536)
    while math.gcd(stride, x_BF.shape[-1]) != 1:  # a stride sharing a factor with F would sample few columns
        stride += 1
    sample = flat[::stride]
    keep = min(1.0, 1.5 * n / N + 64 / sample.numel())  # a margin above the expected share
    threshold = sample.kthvalue(max(1, sample.numel() - math.ceil(keep * sample.numel()))).values
    cand = (flat > threshold).nonzero().squeeze(1)
    if cand.numel() < n:
        return flat.topk(n, sorted=False)
    vals, pos = flat[cand].topk(n, sorted=False)
    return vals, cand[pos]


@register
class BatchTopKSAE(KSparseSAE):
    """BatchTopK in training; a single learned threshold at inference (Bussmann et al. 2024)."""

    architecture = "batchtopk"
    threshold_decay: ClassVar[float] = 0.9
    """Exponential moving average of the smallest kept activation per training step."""
    threshold: torch.Tensor
    """Inference threshold (a buffer, saved with the weights)."""
    has_threshold = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # 0 until the first training step: every positive pre-activation is active.
        self.register_buffer("threshold", torch.zeros(()))

    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        return sparse_code(pre_BF * (pre_BF > self.threshold))

    def train_entries(self, raw_BF: torch.Tensor) -> tuple[Entries, torch.Tensor]:
        """The k*B largest pre-activations of the batch; updates the running inference threshold."""
        vals, flat = batch_topk(raw_BF, self.cfg.k * raw_BF.shape[0])
        self._update_threshold(vals.relu())
        entries, order = Entries.from_flat(flat, raw_BF.shape[0], self.cfg.d_sae)
        return entries, vals[order]

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        smallest = kept.masked_fill(kept <= 0, math.inf).min()
        t = self.threshold
        ema = torch.where(t > 0, self.threshold_decay * t + (1 - self.threshold_decay) * smallest, smallest)
        t.copy_(torch.where(torch.isfinite(smallest), ema, t))

    def threshold_values(self) -> torch.Tensor:
        return self.threshold

    @torch.no_grad()
    def load_threshold_(self, threshold: torch.Tensor) -> None:
        self.threshold.copy_(threshold)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)


@register
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: every nested prefix of the dictionary reconstructs x on its own."""

    architecture = "matryoshka"
    params: ClassVar[tuple[str, ...]] = ("k", "matryoshka_prefix_fractions")

    @classmethod
    def params_from(cls, train: TrainConfig) -> dict[str, Any]:
        return {
            **super().params_from(train),
            "matryoshka_prefix_fractions": train.matryoshka.prefix_fractions,
        }

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        fr = cfg.matryoshka_prefix_fractions
        sizes = prefix_sizes(fr, cfg.d_sae)
        if not fr or fr[-1] != 1.0 or sizes[0] < 1 or any(a >= b for a, b in itertools.pairwise(sizes)):
            raise SAEError(
                f"matryoshka_prefix_fractions {fr} must be increasing fractions of d_sae={cfg.d_sae} ending "
                f"at 1.0, giving distinct non-empty prefixes (got sizes {sizes})"
            )

    def reconstruction_loss(
        self, x_BD: torch.Tensor, z_BF: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over prefixes m of ||x - (z[:, :m] W_dec[:m] + b_dec)||^2, built up group by group so the whole
        costs one decoder matmul; the last prefix is the whole dictionary."""
        x_hat_BD = self.b_dec_D.expand_as(x_BD)
        total, start = x_BD.new_zeros(()), 0
        for end in prefix_sizes(self.cfg.matryoshka_prefix_fractions, self.cfg.d_sae):
            x_hat_BD = x_hat_BD + z_BF[:, start:end] @ self.W_dec_FD[start:end]
            total = total + sq_err(x_BD, x_hat_BD)
            start = end
        return total, x_hat_BD

    def entry_reconstruction_loss(
        self, x_BD: torch.Tensor, vals_N: torch.Tensor, entries: Entries
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `reconstruction_loss`, each group decoding only its own entries."""
        x_hat_BD = self.b_dec_D.expand_as(x_BD)
        total, start = x_BD.new_zeros(()), 0
        for end in prefix_sizes(self.cfg.matryoshka_prefix_fractions, self.cfg.d_sae):
            group, pos = entries.select((entries.col_N >= start) & (entries.col_N < end))
            x_hat_BD = x_hat_BD + decode_entries(vals_N[pos], self.W_dec_FD, group)
            total = total + sq_err(x_BD, x_hat_BD)
            start = end
        return total, x_hat_BD


def prefix_sizes(fractions: tuple[float, ...], d_sae: int) -> list[int]:
    """Matryoshka prefix lengths: round(fraction * d_sae)."""
    return [round(f * d_sae) for f in fractions]
