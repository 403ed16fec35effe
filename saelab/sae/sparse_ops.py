"""Sparse training kernels for the k-sparse SAEs (topk, batchtopk, matryoshka).

A training step of a k-sparse SAE needs the dense encoder matmul only to *choose* the active latents. Everything
after the choice touches just the N = B*k chosen (token, latent) entries, so this module does that part sparsely,
with hand-written backward passes:

- `entry_preacts`: the pre-activations of the chosen entries (their values come from the dense forward);
  backward gives W_enc, b_enc and b_dec gradients from the N entries alone (a sparse [F, B] @ [B, D] product)
  instead of a dense [D, B] @ [B, F] matmul over every latent;
- `decode_entries`: x_hat = sum of the chosen decoder rows weighted by their activations (`embedding_bag`);
  backward gives the activations' gradients by a sampled dense-dense product (only the N needed dot products)
  and W_dec's gradient by a sparse [F, B] @ [B, D] product.

Measured on 2 CPU cores (B=4096, d_in=576, F=4608, k=32): the dense step's five matmuls cost ~1.7 s, the
sparse step's one matmul plus these kernels ~0.7 s. `benchmarks/peer_training.py` measures whole training runs.

The entries of a batch are kept row-major in CSR form (`Entries`), so rows may hold different numbers of
latents (BatchTopK) and a row may hold none.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the caller's count."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # torch warns that its CSR support is "beta"; the operations used here are tested against dense
    # references (tests/test_sparse_ops.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


class Entries:
    """The active (row, latent) entries of a batch in CSR order, with the transposed order built on demand.

    `crow_B1[b]:crow_B1[b+1]` are row b's positions in `col_N`. Indices only: values travel separately so
    autograd can track them."""

    def __init__(self, crow_B1: torch.Tensor, col_N: torch.Tensor, n_cols: int) -> None:
        self.crow_B1, self.col_N, self.n_cols = crow_B1, col_N, n_cols
        self.n_rows = crow_B1.numel() - 1
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def rectangle(cls, idx_BK: torch.Tensor, n_cols: int) -> Entries:
        """K entries per row (TopK)."""
        B, K = idx_BK.shape
        crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
        return cls(crow, idx_BK.reshape(-1), n_cols)

    @classmethod
    def from_flat(cls, flat_N: torch.Tensor, n_rows: int, n_cols: int) -> tuple[Entries, torch.Tensor]:
        """Entries of flat indices into a [n_rows, n_cols] matrix (BatchTopK), and the order that sorts
        `flat_N` row-major (apply it to the values)."""
        order = torch.argsort(flat_N)
        flat = flat_N[order]
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        return cls(_crow(rows, n_rows), flat - rows * n_cols, n_cols), order

    @classmethod
    def stacked(cls, top: Entries, bottom: Entries) -> Entries:
        """The entries of `top`'s rows, then `bottom`'s as rows n_rows..: a pattern over [x_top; x_bottom]."""
        crow = torch.cat([top.crow_B1, bottom.crow_B1[1:] + top.crow_B1[-1]])
        return cls(crow, torch.cat([top.col_N, bottom.col_N]), top.n_cols)

    def rows_N(self) -> torch.Tensor:
        counts = self.crow_B1.diff()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=counts.device), counts)

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crow over latents [F+1], row of each entry in latent order, permutation from CSR order)."""
        if self._t is None:
            perm = torch.argsort(self.col_N, stable=True)
            self._t = (_crow(self.col_N[perm], self.n_cols), self.rows_N()[perm], perm)
        return self._t

    def matrix(self, vals_N: torch.Tensor) -> torch.Tensor:
        """The [B, F] sparse CSR matrix with these values."""
        return _csr(self.crow_B1, self.col_N, vals_N, (self.n_rows, self.n_cols))

    def matrix_t(self, vals_N: torch.Tensor) -> torch.Tensor:
        """The transposed [F, B] sparse CSR matrix with these values (given in CSR order)."""
        crow, rows, perm = self.transposed()
        return _csr(crow, rows, vals_N[perm], (self.n_cols, self.n_rows))

    def select(self, keep_N: torch.Tensor) -> tuple[Entries, torch.Tensor]:
        """The sub-pattern of entries where `keep_N`, and their positions (to index the values with)."""
        pos = keep_N.nonzero().flatten()
        return Entries(_crow(self.rows_N()[pos], self.n_rows), self.col_N[pos], self.n_cols), pos

    def dense(self, vals_N: torch.Tensor) -> torch.Tensor:
        """[B, F] dense matrix (for tests and small batches)."""
        out = vals_N.new_zeros(self.n_rows, self.n_cols)
        out[self.rows_N(), self.col_N] = vals_N
        return out


def _crow(sorted_rows_N: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.zeros(n_rows, dtype=torch.long, device=sorted_rows_N.device)
    counts.index_add_(0, sorted_rows_N, torch.ones_like(sorted_rows_N))
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class _EntryPreacts(torch.autograd.Function):
    """Forward: the given pre-activation values of the entries (computed by the dense selection matmul).
    Backward: gradients of pre[b, f] = (x_b - b_dec) . W_enc[:, f] + b_enc[f] over the entries only."""

    @staticmethod
    def forward(
        ctx: Any,
        vals_N: torch.Tensor,
        x_BD: torch.Tensor,
        W_enc_DF: torch.Tensor,
        b_enc_F: torch.Tensor,
        b_dec_D: torch.Tensor,
        entries: Entries,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_BD, W_enc_DF, b_dec_D)
        ctx.entries = entries
        return vals_N.clone()

    @staticmethod
    def backward(ctx: Any, grad_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_BD, W_enc_DF, b_dec_D = ctx.saved_tensors
        e: Entries = ctx.entries
        grad_N = grad_N.contiguous()
        g_x = g_W = g_benc = g_bdec = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_benc = torch.zeros(e.n_cols, dtype=grad_N.dtype, device=grad_N.device).index_add_(
                0, e.col_N, grad_N
            )
        if ctx.needs_input_grad[2]:
            g_W = (e.matrix_t(grad_N) @ (x_BD - b_dec_D)).T
        if ctx.needs_input_grad[4]:
            assert g_benc is not None
            g_bdec = -(W_enc_DF @ g_benc)
        if ctx.needs_input_grad[1]:
            g_x = e.matrix(grad_N) @ W_enc_DF.T.contiguous()
        return None, g_x, g_W, g_benc if ctx.needs_input_grad[3] else None, g_bdec, None


class _DecodeEntries(torch.autograd.Function):
    """x_hat[b] = sum over row b's entries of vals * W_dec[latent] (no bias)."""

    @staticmethod
    def forward(ctx: Any, vals_N: torch.Tensor, W_dec_FD: torch.Tensor, entries: Entries) -> torch.Tensor:
        ctx.save_for_backward(W_dec_FD, vals_N)
        ctx.entries = entries
        return F.embedding_bag(
            entries.col_N, W_dec_FD, entries.crow_B1[:-1], mode="sum", per_sample_weights=vals_N
        )

    @staticmethod
    def backward(ctx: Any, grad_BD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        W_dec_FD, vals_N = ctx.saved_tensors
        e: Entries = ctx.entries
        grad_BD = grad_BD.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            # The N needed dot products grad[b] . W_dec[f] only (a sampled dense-dense matmul).
            pattern = e.matrix(torch.zeros_like(vals_N))
            g_vals = torch.sparse.sampled_addmm(pattern, grad_BD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            g_W = e.matrix_t(vals_N) @ grad_BD
        return g_vals, g_W, None


def entry_preacts(
    vals_N: torch.Tensor,
    x_BD: torch.Tensor,
    W_enc_DF: torch.Tensor,
    b_enc_F: torch.Tensor,
    b_dec_D: torch.Tensor,
    entries: Entries,
) -> torch.Tensor:
    """`vals_N` (pre-activations of the entries, computed without autograd) made differentiable in the
    encoder's parameters, with a backward pass over the entries only."""
    out: torch.Tensor = _EntryPreacts.apply(vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D, entries)
    return out


def decode_entries(vals_N: torch.Tensor, W_dec_FD: torch.Tensor, entries: Entries) -> torch.Tensor:
    """[B, D] weighted sums of the entries' decoder rows (no decoder bias)."""
    out: torch.Tensor = _DecodeEntries.apply(vals_N, W_dec_FD, entries)
    return out
