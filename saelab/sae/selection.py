"""The training step's choice of each row's k largest pre-activations, from a bfloat16 matmul checked in float32.

Exact TopK computes all B*F pre-activations only to choose k per row, and that float32 matmul is most of a sparse
training step on a CPU (`sparse_ops.py`). Where the hardware multiplies bfloat16 natively (AVX512-BF16 or AMX CPUs,
CUDA GPUs from compute capability 8.0) the same matmul runs 2.5-4x faster in bfloat16 (measured on 2 AVX512-BF16
cores, 4,096 x 576 @ 576 x 18,432: 111 ms against 416 ms). `BF16Selector.topk` uses it without changing the choice:

1. approximate pre-activations s~ = bf16(x~ . w~), the bias folded in as an extra input column of ones, x~ and w~
   the inputs and weights rounded to bfloat16 (products exact, sums in float32, result rounded to bfloat16);
2. each row's 2k largest approximate values are its candidates; their float32 pre-activations are computed
   exactly as the float32 path would (a sampled matmul over the 2Bk candidates only);
3. a row is accepted when its k-th largest float32 candidate beats a rigorous upper bound on every other latent's
   pre-activation: with u = 2^-8 (bfloat16's unit roundoff) and the row's threshold t (its smallest candidate),
   any non-candidate has exact value <= max(t, 0) / (1 - u) + E, where E bounds the rounding of the operands
   (|x.w - x~.w~| <= |x~| |w - w~| + |x - x~| |w~| + |x - x~| |w - w~| by Cauchy-Schwarz, over the largest column
   norms) and of float32 accumulation (D * 2^-24 |x~| |w~|);
4. rows that fail (5 to 21 of 110,592 at 18,432 and 36,864 latents on the bundled model's activations;
   `rechecked` counts them) are recomputed with the float32 matmul.

So the entries kept are the float32 top-k's, up to two pre-activations equal at float32 rounding, and their values
are float32. `saelab.models.precision.resolve_float` says where the bfloat16 path runs
(`TrainConfig.selection_matmul`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

UNIT_ROUNDOFF_BF16 = 2.0**-8
EPS_F32 = 2.0**-24


class Chosen(NamedTuple):
    vals_BK: torch.Tensor
    """float32 pre-activations of the chosen latents (unsorted within a row)."""
    idx_BK: torch.Tensor
    rechecked: int
    """Rows whose choice the bound could not confirm, recomputed with the float32 matmul."""


class BF16Selector:
    """The choice with its buffers kept between steps (a fresh [B, F] output each step costs page faults)."""

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None
        self._w: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None
        """float32 [D + 1, F] for the weights' norms."""
        self._w_t: torch.Tensor | None = None
        """float32 [F, D]: the encoder's columns as rows, for the sampled dot products."""
        self.rechecked = 0
        """Rows recomputed in float32 so far (see the module docstring)."""
        self.last_rechecked = 0
        """Rows recomputed in float32 by the last call (a step's count: the same in a resumed run)."""

    def release(self) -> None:
        """Drop the buffers (an SAE put to use holds no training buffer); they are made again when needed."""
        self._x = self._w = self._out = self._scratch = self._w_t = None

    def _buffer(
        self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """A buffer kept between steps (a fresh large tensor each step costs page faults where the allocator
        returns freed memory to the system)."""
        buf: torch.Tensor | None = getattr(self, name)
        if buf is None or buf.shape != shape or buf.device != like.device:
            buf = torch.empty(shape, dtype=dtype, device=like.device)
            setattr(self, name, buf)
        return buf

    @torch.no_grad()
    def topk(
        self, x_BD: torch.Tensor, W_DF: torch.Tensor, b_F: torch.Tensor, b_pre_D: torch.Tensor, k: int
    ) -> Chosen:
        """The k largest float32 pre-activations `(x - b_pre) @ W + b` of each row and their latents."""
        (B, D), F = x_BD.shape, W_DF.shape[1]
        xc_BD = x_BD - b_pre_D
        # The bias as an input column of ones: rounded and bounded like the weights, no [B, F] pass to add it.
        xh = self._buffer("_x", (B, D + 1), x_BD)
        xh[:, :D].copy_(xc_BD)
        xh[:, D] = 1.0
        wh = self._buffer("_w", (D + 1, F), x_BD)
        wh[:D].copy_(W_DF)
        wh[D].copy_(b_F)
        approx_BF = self._buffer("_out", (B, F), x_BD)
        with _full_precision_sums(x_BD.device):
            torch.mm(xh, wh, out=approx_BF)
        n_cand = min(2 * k, F)
        approx_BC, cand_BC = approx_BF.topk(n_cand, dim=-1, sorted=False)
        w_FD = self._buffer("_w_t", (F, D), x_BD, torch.float32)
        w_FD.copy_(W_DF.t())
        exact_BC = _sampled_preacts(xc_BD, w_FD, b_F, cand_BC)
        vals_BK, j_BK = exact_BC.topk(k, dim=-1, sorted=False)
        idx_BK = cand_BC.gather(1, j_BK)
        if n_cand < F:
            scratch = self._buffer("_scratch", (D + 1, F), x_BD, torch.float32)
            bad_B = ~_confirmed(xc_BD, xh, W_DF, b_F, wh, approx_BC, vals_BK, scratch)
            if bool(bad_B.any()):
                rows = bad_B.nonzero().flatten()
                full = torch.addmm(b_F, xc_BD[rows], W_DF).topk(k, dim=-1, sorted=False)
                vals_BK[rows], idx_BK[rows] = full.values, full.indices
                self.rechecked += rows.numel()
                self.last_rechecked = rows.numel()
                return Chosen(vals_BK, idx_BK, rows.numel())
        self.last_rechecked = 0
        return Chosen(vals_BK, idx_BK, 0)


def _confirmed(
    xc_BD: torch.Tensor,
    xh_BD1: torch.Tensor,
    W_DF: torch.Tensor,
    b_F: torch.Tensor,
    wh_D1F: torch.Tensor,
    approx_BC: torch.Tensor,
    vals_BK: torch.Tensor,
    scratch_D1F: torch.Tensor,
) -> torch.Tensor:
    """Rows whose k-th float32 candidate beats the bound on every non-candidate (module docstring, step 3).
    `scratch_D1F` is overwritten."""
    D1 = xh_BD1.shape[1]
    x_norm, w_norm, err_B = rounding_bound(xc_BD, xh_BD1, W_DF, b_F, wh_D1F, scratch_D1F)
    t_B = approx_BC.min(dim=1).values.float()
    # no non-candidate's exact value exceeds this
    above_B = t_B.clamp_min(0) / (1 - UNIT_ROUNDOFF_BF16) + err_B
    kth_B = vals_BK.min(dim=1).values - _gamma(D1) * x_norm * w_norm  # the float32 candidates' own rounding
    # The absolute term covers products flushed to zero below float32's normal range (bfloat16 dot instructions).
    return kth_B > above_B * (1 + 1e-3) + D1 * 2.0**-126


def _gamma(n: int) -> float:
    """Relative error bound of a float32 sum of n products, in any order."""
    return n * EPS_F32 / (1 - n * EPS_F32)


def rounding_bound(
    xc_BD: torch.Tensor,
    xh_BD1: torch.Tensor,
    W_DF: torch.Tensor,
    b_F: torch.Tensor,
    wh_D1F: torch.Tensor,
    scratch_D1F: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|x| per row, the largest |w|, E per row), x a row with its column of ones and w a column of the weights
    with its bias; `xh_BD1` and `wh_D1F` are their bfloat16 roundings x~ and w~. E bounds |x.w - acc(x~.w~)| for
    every latent, acc being the float32 accumulation: |x~| |w - w~| + |x - x~| |w~| + |x - x~| |w - w~|
    (Cauchy-Schwarz, with the rounding errors' exact norms) + gamma |x~| |w~|. `scratch_D1F` is overwritten.

    The exact norms matter: the elementwise bound |a - a~| <= u |a| holds too, but typical rounding errors are well
    below it, and with it the bound failed on most rows of a Gaussian batch at 18,432 latents."""
    D1 = xh_BD1.shape[1]
    D = D1 - 1
    x_norm = (xc_BD.pow(2).sum(dim=1) + 1).sqrt()  # the input with its column of ones
    xh_norm = xh_BD1.float().norm(dim=1)
    xlo_norm = (xc_BD - xh_BD1[:, :D].float()).norm(dim=1)  # exact: a float32 minus its rounding
    # Column norms of the weights (bias row included) and of their rounding errors, in place in the scratch.
    torch.mul(W_DF, W_DF, out=scratch_D1F[:D])
    torch.mul(b_F, b_F, out=scratch_D1F[D])
    w_norm = scratch_D1F.sum(dim=0).max().sqrt()
    scratch_D1F.copy_(wh_D1F)
    scratch_D1F[:D].sub_(W_DF)
    scratch_D1F[D].sub_(b_F)
    scratch_D1F.mul_(scratch_D1F)
    wlo_norm = scratch_D1F.sum(dim=0).max().sqrt()
    wh_norm = w_norm + wlo_norm  # |w~| <= |w| + |w - w~|
    # Norms are float32 sums themselves: a relative slack far above their rounding.
    xh_norm, xlo_norm, wh_norm, wlo_norm = (v * (1 + 1e-4) for v in (xh_norm, xlo_norm, wh_norm, wlo_norm))
    err_B = xh_norm * wlo_norm + xlo_norm * wh_norm + xlo_norm * wlo_norm + _gamma(D1) * xh_norm * wh_norm
    return x_norm, w_norm, err_B


def _sampled_preacts(
    xc_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, idx_BC: torch.Tensor
) -> torch.Tensor:
    """float32 `xc[b] . W_FD[idx[b, c]] + b[idx[b, c]]` for every (b, c): the C needed dot products per row
    (`W_FD`: the encoder's columns as contiguous rows, which the sampled product reads far faster than strided
    columns)."""
    B, C = idx_BC.shape
    crow = torch.arange(0, B * C + 1, C, device=idx_BC.device)
    with warnings.catch_warnings():  # torch calls its CSR support beta; tests compare with the dense matmul
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, idx_BC.reshape(-1), xc_BD.new_zeros(B * C), (B, W_FD.shape[0]), check_invariants=False
        )
    dots = torch.sparse.sampled_addmm(pattern, xc_BD, W_FD.t(), beta=0.0).values()
    return dots.view(B, C) + b_F[idx_BC]


class _full_precision_sums:
    """cuBLAS may sum bfloat16 products in reduced precision unless told not to; the bound assumes float32 sums."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self.old = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.old
