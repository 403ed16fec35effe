"""The bfloat16 choice of a TopK training step's entries (saelab/sae/selection.py) against the float32 matmul's
top-k, the recheck of rows its bound cannot confirm, whole training runs in both precisions, and the allocator
setting the training loop runs under (saelab/train/allocator.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support_train import planted

from saelab.config import TrainConfig
from saelab.models.precision import native_bf16, resolve_float
from saelab.sae import base as sae_lib
from saelab.sae.selection import EPS_F32, UNIT_ROUNDOFF_BF16, BF16Selector, rounding_bound
from saelab.train.trainer import train


def bound_of(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
    """(the bfloat16 approximation as the selector computes it, in float64; |x|, |w|, E from `rounding_bound`)."""
    xh = torch.cat([x, torch.ones(len(x), 1)], dim=1).bfloat16()
    wh = torch.cat([W, b[None]], dim=0).bfloat16()
    approx = torch.mm(xh, wh).double()
    return approx, *rounding_bound(x, xh, W, b, wh, torch.empty(wh.shape))


def float32_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, b_pre: torch.Tensor, k: int):
    return torch.addmm(b, x - b_pre, W).topk(k, dim=-1)


def same_sets(a_BK: torch.Tensor, b_BK: torch.Tensor) -> torch.Tensor:
    return (a_BK.sort(dim=1).values == b_BK.sort(dim=1).values).all(dim=1)


@pytest.mark.parametrize("F", [64, 1000])
def test_bf16_choice_equals_the_float32_topk(F: int) -> None:
    gen = torch.Generator().manual_seed(0)
    B, D, k = 300, 48, 8
    x = torch.randn(B, D, generator=gen) * 3 + 1
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) * 0.1
    b_pre = torch.randn(D, generator=gen)
    sel = BF16Selector()
    chosen = sel.topk(x, W, b, b_pre, k)
    ref = float32_topk(x, W, b, b_pre, k)
    assert bool(same_sets(chosen.idx_BK, ref.indices).all())
    torch.testing.assert_close(chosen.vals_BK.sort(dim=1).values, ref.values.sort(dim=1).values)
    assert chosen.vals_BK.dtype == torch.float32
    assert chosen.rechecked == sel.rechecked < B // 10  # the bound confirms nearly every row of such data


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_the_bound_holds_for_every_entry(scale: float) -> None:
    """What step 3 rests on, checked against float64 on every entry rather than through the choice: an entry's
    exact value is at most max(s~, 0) / (1 - u) + E (s~ its bfloat16 approximation), and its float32 value is
    within gamma |x| |w| of it. Inputs of mixed magnitudes, values below bfloat16's normal range among them."""
    gen = torch.Generator().manual_seed(2)
    B, D, F = 256, 64, 512
    x = torch.randn(B, D, generator=gen) * scale * torch.logspace(-3, 2, D)[torch.randperm(D, generator=gen)]
    W = torch.randn(D, F, generator=gen) / D**0.5
    W[:, :8] *= 1e-39  # subnormal in float32 and bfloat16
    b = torch.randn(F, generator=gen)
    approx, x_norm, w_norm, err_B = bound_of(x, W, b)
    exact = x.double() @ W.double() + b.double()
    above = approx.clamp_min(0) / (1 - UNIT_ROUNDOFF_BF16) + err_B.double()[:, None] + (D + 1) * 2.0**-126
    assert bool((exact <= above).all())
    gamma = (D + 1) * EPS_F32 / (1 - (D + 1) * EPS_F32)
    f32 = torch.addmm(b, x, W).double()
    assert bool(((f32 - exact).abs() <= gamma * (x_norm * w_norm).double()[:, None]).all())
    # and the bound is not vacuous: a small fraction of |x| |w|
    assert float((err_B / (x_norm * w_norm)).max()) < 0.01


def test_the_bound_holds_where_rounding_errors_add_up() -> None:
    """x = (v, -1, v, -1, ...) and w = (v, 1, v, 1, ...) with v just below bfloat16's halfway point above 1: the
    rounded product is exactly 0 (no slack from the output's rounding), while every pair's rounding errors add
    up to an exact value of about u D. The bound must cover that, and it does with less to spare than the
    error itself (halving E, or dropping either operand's rounding term, fails here)."""
    B, D, F = 4, 64, 8
    v = 1 + 0.99 * 2.0**-8
    assert float(torch.tensor(v).bfloat16()) == 1.0  # rounds down by almost u
    pair = torch.tensor([v, -1.0]).repeat(D // 2)
    x = pair.expand(B, D).clone()
    W = pair.abs()[:, None].expand(D, F).clone()
    approx, _, _, err_B = bound_of(x, W, torch.zeros(F))
    exact = x.double() @ W.double()
    assert bool((approx == 0).all()) and float(exact.min()) > 0.9 * UNIT_ROUNDOFF_BF16 * D
    above = approx.clamp_min(0) / (1 - UNIT_ROUNDOFF_BF16) + err_B.double()[:, None]
    assert bool((exact <= above).all())
    assert float((above - exact).max()) < float(exact.min())


def test_rows_the_bound_cannot_confirm_are_recomputed_in_float32() -> None:
    """Columns that differ by less than bfloat16 resolves: the 2k candidates cut through values that round
    alike, so the bound confirms no row and every row comes from the float32 matmul, with its answer."""
    gen = torch.Generator().manual_seed(1)
    B, D, F, k = 40, 32, 96, 4
    base = torch.randn(D, 1, generator=gen)
    W = base + 1e-5 * torch.randn(D, F, generator=gen)  # 96 nearly equal columns
    x = torch.randn(B, D, generator=gen).abs() * torch.sign(base.T)  # every pre-activation large and positive
    b, b_pre = torch.zeros(F), torch.zeros(D)
    sel = BF16Selector()
    chosen = sel.topk(x, W, b, b_pre, k)
    ref = float32_topk(x, W, b, b_pre, k)
    assert chosen.rechecked == B
    assert torch.equal(chosen.idx_BK.sort(dim=1).values, ref.indices.sort(dim=1).values)


def test_training_in_either_precision_learns_the_same_sae() -> None:
    """Same entries each step, so the same trajectory up to float32 rounding of the chosen values."""
    x = planted(n=4096, d=24, n_feat=48)
    cfg = TrainConfig(architecture="topk", expansion=4, k=4, batch_size=512, epochs=2, checkpoint_every=0)
    runs = {}
    for precision in ("float32", "bfloat16"):
        result = train(x, dataclasses.replace(cfg, selection_matmul=precision), seed=0)
        assert (result.sae.selector is not None) == (precision == "bfloat16")
        runs[precision] = result.sae.state_dict()
    for name, t in runs["float32"].items():
        torch.testing.assert_close(runs["bfloat16"][name], t, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("n_dead", [0, 5, 64])
def test_loss_and_gradients_equal_the_dense_reference(n_dead: int) -> None:
    """The sparse step with the bfloat16 choice (AuxK then computes the dead latents' pre-activations itself)
    against the dense reference path."""
    gen = torch.Generator().manual_seed(n_dead)
    x = torch.randn(32, 16, generator=gen) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=gen)[:n_dead]] = True
    inputs = sae_lib.LossInputs(dead, k_aux=8, auxk_coef=0.5)
    results = []
    for bf16 in (True, False):
        torch.manual_seed(0)
        sae = sae_lib.build(sae_lib.SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4)).train()
        sae.use_sparse_kernels(bf16)
        sae.use_selection("bfloat16" if bf16 else "float32")
        loss = sae.training_loss(x, inputs)
        loss.total.backward()
        results.append((loss, {n: p.grad for n, p in sae.named_parameters()}))
    (sp, sp_grads), (de, de_grads) = results
    for field in ("total", "mse", "aux", "l0", "count_F"):
        torch.testing.assert_close(getattr(sp, field), getattr(de, field), rtol=1e-4, atol=1e-5)
    assert (float(sp.aux) > 0) == (n_dead > 0)
    for name, g in sp_grads.items():
        torch.testing.assert_close(g, de_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_uses_bfloat16_only_where_it_is_native() -> None:
    cpu = torch.device("cpu")
    assert resolve_float("float32", cpu) == "float32"
    assert resolve_float("bfloat16", cpu) == "bfloat16"
    assert resolve_float("auto", cpu) == ("bfloat16" if native_bf16(cpu) else "float32")
    assert resolve_float("auto", torch.device("meta")) == "float32"


MALLOC_PROBE = """
from pathlib import Path
import torch
from saelab.train.allocator import reuse_freed_memory

def anonymous_mappings():
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) == 5)

def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

def new_mappings():
    before = anonymous_mappings()
    block = torch.empty(16 << 20)  # 64 MiB, over glibc's largest mmap threshold
    block.fill_(1.0)
    after = anonymous_mappings()
    del block
    return after - before

first = new_mappings()
base = rss_mib()
with reuse_freed_memory(torch.device("cpu")) as active:
    inside = new_mappings() + new_mappings()
    kept = rss_mib() - base
released = rss_mib() - base
with reuse_freed_memory(torch.device("meta")) as meta_active:
    pass
print(first, int(active), inside, round(kept), round(released), int(meta_active))
"""

OVERLAP_PROBE = (
    MALLOC_PROBE[: MALLOC_PROBE.index("first = ")]
    + """
torch.ones(1 << 22).fill_(2.0)  # torch's worker threads (their stacks are mappings too) start now, not below
base = rss_mib()
a, b = reuse_freed_memory(torch.device("cpu")), reuse_freed_memory(torch.device("cpu"))
a.__enter__()
b.__enter__()
a.__exit__(None, None, None)
after_first_ends = new_mappings()
kept = rss_mib() - base
b.__exit__(None, None, None)
print(after_first_ends, round(kept), round(rss_mib() - base))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_loop_keeps_freed_blocks_then_restores_malloc() -> None:
    """In a fresh process (malloc's state is the process's own). Before: a 64 MiB block is a mapping of its own,
    unmapped when freed. Inside: such blocks come from the heap and stay there when freed (no new mapping, the
    memory still held). After: the heap is trimmed, so the process holds no more than before."""
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, check=True)
    first, active, inside, kept_mib, released_mib, meta_active = (int(v) for v in out.stdout.split())
    assert active == 1 and meta_active == 0
    assert first >= 1
    assert inside <= 0 and kept_mib >= 60, (inside, kept_mib)
    assert released_mib < 16, released_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_overlapping_trainings_keep_the_setting_until_the_last_ends() -> None:
    """Two trainings in threads of one process (a fresh one, so no freed block is in its heap yet): when the first
    ends, the second still gets its large blocks from the heap and keeps them; when it ends, the memory goes
    back."""
    out = subprocess.run([sys.executable, "-c", OVERLAP_PROBE], capture_output=True, text=True, check=True)
    after_first_ends, kept_mib, released_mib = (int(v) for v in out.stdout.split())
    assert after_first_ends <= 0 and kept_mib >= 60, (after_first_ends, kept_mib)
    assert released_mib < 16, released_mib


def test_the_result_and_the_train_log_record_the_choice(tmp_path: Path) -> None:
    x = planted(n=2048, d=24, n_feat=48)
    cfg = TrainConfig(architecture="topk", expansion=4, k=4, batch_size=512, epochs=1, checkpoint_every=0)
    for precision in ("float32", "bfloat16"):
        log_path = tmp_path / f"{precision}.jsonl"
        result = train(
            x, dataclasses.replace(cfg, selection_matmul=precision, log_every=1), 0, log_path=log_path
        )
        assert result.selection == precision
        selector = result.sae.selector
        assert result.rows_rechecked == (selector.rechecked if selector is not None else 0)
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert records and all(
            ("selection_rows_rechecked" in r) == (precision == "bfloat16") for r in records
        )
