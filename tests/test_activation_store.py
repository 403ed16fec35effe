"""The sharded activation store: written shard by shard, streamed through a bounded shuffle buffer that uses every
row once per epoch, resumable mid-epoch without reading what it skips, and equal to in-memory training where the
order is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support_train import planted, same_state

from saelab.activations.sources import StoreSource
from saelab.activations.store import (
    ActivationError,
    Activations,
    ActivationStore,
    ActivationStoreWriter,
    collect,
    collect_to_store,
)
from saelab.config import DataConfig, TrainConfig
from saelab.data.windows import build_windows
from saelab.eval.core import reconstruction_metrics
from saelab.models.loading import load_model, resolve_hookpoint
from saelab.train.trainer import train


def numbered_store(folder: Path, n: int, shard_rows: int, d: int = 3) -> ActivationStore:
    """Row i holds i in every column, so batches show which rows they hold."""
    acts = torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()
    ids = torch.arange(n, dtype=torch.int32)
    return Activations(acts, ids, ids % 7).to_store(folder, shard_rows)


def rows_of(batches: list[torch.Tensor]) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def test_writer_cuts_shards_across_appends_and_renames_when_complete(tmp_path: Path) -> None:
    x = torch.randn(1000, 4)
    win, pos = torch.arange(1000, dtype=torch.int32), torch.arange(1000, dtype=torch.int32) % 30
    writer = ActivationStoreWriter(tmp_path / "s", shard_rows=300)
    for start in range(0, 1000, 170):  # appends that do not line up with shards
        writer.append(x[start : start + 170], win[start : start + 170], pos[start : start + 170])
    assert not (
        tmp_path / "s"
    ).exists()  # a killed collect leaves only s.tmp, never a store that looks complete
    store = writer.close()
    assert store.shard_rows == [300, 300, 300, 100] and store.n_rows == 1000 and store.d_in == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    back = store.load()
    assert torch.equal(back.acts_ND, x) and torch.equal(back.window_N, win) and torch.equal(back.pos_N, pos)
    ids = torch.tensor([999, 0, 301, 300, 5])
    assert torch.equal(store.rows(ids), x[ids]) and torch.equal(store.head(650), x[:650])
    with pytest.raises(ActivationError, match="not a complete activation store"):
        ActivationStore(tmp_path / "missing")


@pytest.mark.bad_input
def test_nan_rows_are_refused_when_written(tmp_path: Path) -> None:
    x = torch.randn(10, 4)
    x[3, 1] = float("inf")
    writer = ActivationStoreWriter(tmp_path / "s", shard_rows=4)
    with pytest.raises(ActivationError, match="NaN/inf"):
        writer.append(x, torch.zeros(10, dtype=torch.int32), torch.zeros(10, dtype=torch.int32))


@pytest.mark.parametrize(("n", "batch"), [(2000, 50), (2030, 50)])
def test_every_row_once_per_epoch_in_bounded_memory(tmp_path: Path, n: int, batch: int) -> None:
    """20 shards of 100 rows through a 350-row buffer: memory never holds more than the buffer and one shard,
    each shard is read once per epoch, and each row is used once (but for the < batch rows left at the end)."""
    src = StoreSource(numbered_store(tmp_path / "s", n, 100), buffer_rows=350)
    gen = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        reads = src.shard_reads
        batches = list(src.epoch(gen, batch))
        seen = rows_of(batches)
        assert all(b.shape == (batch, 3) for b in batches)
        assert len(seen) == len(set(seen)) == (n // batch) * batch
        assert src.shard_reads - reads == len(src.store.files)
        orders.append(seen)
    assert src.peak_rows <= 350 + 100
    assert orders[0] != orders[1]  # a new order each epoch
    mixed = {r // 100 for r in orders[0][:batch]}
    assert len(mixed) >= 2  # a batch mixes shards


@pytest.mark.bad_input
def test_buffer_too_small_for_a_shard_is_a_clear_error(tmp_path: Path) -> None:
    src = StoreSource(numbered_store(tmp_path / "s", 500, 200), buffer_rows=220)
    with pytest.raises(ActivationError, match="stream-buffer-rows to >= 249"):
        next(src.epoch(torch.Generator(), 50))


def test_starting_mid_epoch_yields_the_tail_and_skips_reading_what_it_skips(tmp_path: Path) -> None:
    store = numbered_store(tmp_path / "s", 2000, 100)
    full = list(StoreSource(store, 350).epoch(torch.Generator().manual_seed(1), 64))
    for start in (0, 5, 17, 30, len(full)):
        src = StoreSource(store, 350)
        gen = torch.Generator().manual_seed(1)
        tail = list(src.epoch(gen, 64, start=start))
        assert rows_of(tail) == rows_of(full[start:])
        if start >= 17:
            assert src.shard_reads < 20  # groups already done were not read
        # the generator ends where a full epoch leaves it, so the next epoch's order is the same
        assert torch.equal(gen.get_state(), _after_full_epoch(store, 1))


def _after_full_epoch(store: ActivationStore, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    for _ in StoreSource(store, 350).epoch(gen, 64):
        pass
    return gen.get_state()


def test_ranks_take_disjoint_slices_of_each_store_batch(tmp_path: Path) -> None:
    store = numbered_store(tmp_path / "s", 1000, 100)
    whole = list(StoreSource(store, 400).epoch(torch.Generator().manual_seed(2), 100))
    parts = [
        list(StoreSource(store, 400).epoch(torch.Generator().manual_seed(2), 100, part=(r, 2)))
        for r in (0, 1)
    ]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b], parts[1][b]]), batch)


def test_one_shard_store_trains_exactly_like_memory(tmp_path: Path) -> None:
    """One shard in a buffer that holds it: the store's order is the in-memory order, so training is identical."""
    x = planted(n=3000)
    store = Activations(
        x, torch.zeros(3000, dtype=torch.int32), torch.zeros(3000, dtype=torch.int32)
    ).to_store(tmp_path / "s", shard_rows=3000)
    cfg = TrainConfig(expansion=4, k=4, lr=3e-3, batch_size=256, epochs=3, stream_buffer_rows=4000)
    assert same_state(train(x, cfg, seed=0).sae, train(store, cfg, seed=0).sae)


def test_training_streamed_from_many_shards_learns(tmp_path: Path) -> None:
    x = planted()
    store = Activations(x[:5000], torch.zeros(5000, dtype=torch.int32), torch.zeros(5000, dtype=torch.int32))
    cfg = TrainConfig(expansion=4, k=4, lr=3e-3, batch_size=256, epochs=8, stream_buffer_rows=1200)
    source = StoreSource(store.to_store(tmp_path / "s", shard_rows=250), cfg.stream_buffer_rows)
    result = train(source, cfg, seed=0)
    m = reconstruction_metrics(result.sae, [x[5000:]], 0.1)
    assert m["explained_variance"] > 0.85 and m["l0"] <= 4
    assert source.peak_rows <= 1200 + 250
    memory = reconstruction_metrics(train(x[:5000], cfg, seed=0).sae, [x[5000:]], 0.1)
    assert m["explained_variance"] == pytest.approx(memory["explained_variance"], abs=0.03)


def test_collect_to_store_equals_collect(tmp_path: Path, tiny_model_dir: Path, corpus_file: Path) -> None:
    lm = load_model(str(tiny_model_dir), "float32", "cpu")
    windows = build_windows(DataConfig(dataset=str(corpus_file), ctx_len=32), lm.tokenizer, seed=0)
    hookpoint = resolve_hookpoint(lm.model, "auto")
    memory = collect(lm, windows, hookpoint, 700, 8)
    store = collect_to_store(lm, windows, hookpoint, 700, 8, tmp_path / "acts", shard_rows=128)
    back = store.load()
    assert store.shard_rows[:-1] == [128] * (len(store.shard_rows) - 1)
    for a, b in zip(
        (back.acts_ND, back.window_N, back.pos_N), (memory.acts_ND, memory.window_N, memory.pos_N)
    ):
        assert torch.equal(a, b)


@pytest.mark.bad_input
def test_finite_check_sees_opposite_infinities_and_passes_huge_finite_values() -> None:
    """The fast path sums the rows: +inf and -inf must not cancel into a pass, nor a sum that overflows to inf
    refuse finite data."""
    from saelab.activations.store import ActivationError, check_finite

    x = torch.zeros(64, 8)
    x[0, 0], x[1, 0] = 3e38, 3e38  # finite, but their float32 sum is inf
    check_finite(x, "acts")
    x[2, 1], x[3, 2] = float("inf"), float("-inf")
    with pytest.raises(ActivationError, match="2 NaN/inf values in 2 rows"):
        check_finite(x, "acts")
