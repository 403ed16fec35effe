"""The sparse training kernels against dense references: the kernels alone, then whole training losses of the
k-sparse architectures (values and every parameter's gradient), with and without dead latents."""

from __future__ import annotations

import pytest
import torch

from saelab.sae import base as sae_lib
from saelab.sae.sparse_ops import Entries, decode_entries, entry_preacts
from saelab.sae.topk import KSparseSAE, batch_topk

TOL = {"rtol": 1e-4, "atol": 1e-5}


def random_entries(B: int, F: int, gen: torch.Generator) -> tuple[Entries, torch.Tensor]:
    """Rows with 0 to 5 distinct latents each (some empty), and the flat positions they came from."""
    mask = torch.rand(B, F, generator=gen) < torch.rand(B, 1, generator=gen) * 5 / F
    mask[0] = False  # an empty row
    flat = mask.flatten().nonzero().flatten()
    perm = torch.randperm(flat.numel(), generator=gen)  # from_flat must sort them
    entries, order = Entries.from_flat(flat[perm], B, F)
    return entries, flat[perm][order]


def test_entries_from_flat_round_trip_and_transpose() -> None:
    gen = torch.Generator().manual_seed(0)
    entries, flat = random_entries(12, 10, gen)
    assert torch.equal(entries.rows_N() * 10 + entries.col_N, flat)
    assert int(entries.crow_B1[1]) == 0  # row 0 is empty
    vals = torch.randn(flat.numel(), generator=gen)
    dense = entries.dense(vals)
    torch.testing.assert_close(entries.matrix(vals).to_dense(), dense)
    torch.testing.assert_close(entries.matrix_t(vals).to_dense(), dense.T)
    keep = entries.col_N < 4
    sub, pos = entries.select(keep)
    torch.testing.assert_close(sub.dense(vals[pos]), dense * (torch.arange(10) < 4))


@pytest.mark.parametrize("need_x_grad", [False, True])
def test_kernels_match_dense_autograd(need_x_grad: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    B, D, F = 12, 6, 10
    entries, _ = random_entries(B, F, gen)
    rows, cols = entries.rows_N(), entries.col_N

    def params() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        shapes = [(B, D), (D, F), (F,), (D,), (F, D)]
        return [
            torch.randn(s, generator=g).requires_grad_(i > 0 or need_x_grad) for i, s in enumerate(shapes)
        ]

    x, W_enc, b_enc, b_dec, W_dec = params()
    pre = (x - b_dec) @ W_enc + b_enc
    z = torch.zeros(B, F).index_put((rows, cols), pre[rows, cols].relu())
    ref = ((z @ W_dec + b_dec - 1.0) ** 2).sum()
    ref_grads = torch.autograd.grad(ref, [p for p in (x, W_enc, b_enc, b_dec, W_dec) if p.requires_grad])

    x, W_enc, b_enc, b_dec, W_dec = params()
    with torch.no_grad():
        vals = ((x - b_dec) @ W_enc + b_enc)[rows, cols]
    acts = entry_preacts(vals, x, W_enc, b_enc, b_dec, entries).relu()
    got = ((decode_entries(acts, W_dec, entries) + b_dec - 1.0) ** 2).sum()
    got_grads = torch.autograd.grad(got, [p for p in (x, W_enc, b_enc, b_dec, W_dec) if p.requires_grad])

    torch.testing.assert_close(got, ref, **TOL)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL)


def make(arch: str) -> KSparseSAE:
    extra = {"matryoshka_prefix_fractions": (0.25, 0.5, 1.0)} if arch == "matryoshka" else {}
    torch.manual_seed(3)
    sae = sae_lib.build(sae_lib.SAEConfig(arch, d_in=16, d_sae=64, k=4, **extra))
    assert isinstance(sae, KSparseSAE)
    with torch.no_grad():
        sae.b_enc_F.normal_(0, 0.3)
        sae.b_dec_D.normal_(0, 0.3)
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 5, 64])
def test_sparse_training_loss_equals_the_dense_reference(arch: str, n_dead: int) -> None:
    x = torch.randn(32, 16) * 2
    x[:4] *= 5  # uneven rows: BatchTopK then gives rows different numbers of latents
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(4))[:n_dead]] = True
    inputs = sae_lib.LossInputs(dead, k_aux=8, auxk_coef=0.5)
    results = []
    for sparse in (True, False):
        sae = make(arch)
        sae.sparse_training = sparse
        loss = sae.training_loss(x, inputs)
        loss.total.backward()
        grads = {n: p.grad for n, p in sae.named_parameters()}
        results.append((loss, grads, getattr(sae, "threshold", None)))
    (sp, sp_grads, sp_thr), (de, de_grads, de_thr) = results
    for field in ("total", "mse", "aux", "l0", "count_F", "act_sum_F"):
        torch.testing.assert_close(getattr(sp, field), getattr(de, field), **TOL)
    if n_dead:
        assert float(sp.aux) > 0
    assert sp_grads.keys() == de_grads.keys()
    for name, g in sp_grads.items():
        torch.testing.assert_close(g, de_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    if sp_thr is not None:
        torch.testing.assert_close(sp_thr, de_thr)


@pytest.mark.parametrize("case", ["even", "skewed row", "ties", "few positive"])
def test_batch_topk_finds_the_flat_top_n(case: str) -> None:
    """The sampled threshold gives the flat top-n; when it cannot (ties at the threshold, fewer candidates than n)
    the full top-n runs and still gives it."""
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(5))
    if case == "skewed row":
        x[3] *= 100
    if case == "ties":
        x = x.round()
    if case == "few positive":
        x = torch.where(x > 2.5, x, torch.zeros(()))
    n = 64 * 4
    vals, flat = batch_topk(x, n)
    want_vals, _ = x.flatten().topk(n)
    assert flat.unique().numel() == n
    torch.testing.assert_close(x.flatten()[flat], vals)
    torch.testing.assert_close(vals.sort().values, want_vals.sort().values)
