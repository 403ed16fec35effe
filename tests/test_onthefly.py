"""Training on activations generated on the fly (`collect.format stream`): the streamed training documents, the
mixing buffer's bound, several hookpoints from one forward, resuming a SIGKILLed run with no document repeated or
skipped, ranks reading disjoint documents, and the bad inputs of a streamed run."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import WORDS
from support_train import STREAM_DDP_CFG, stream_ddp_worker
from test_kill_resume import kill_when, saelab

from saelab.activations.onthefly import StreamSource, mixing_bound
from saelab.activations.sources import sample_ids
from saelab.activations.store import ActivationError
from saelab.cli import main
from saelab.config import DataConfig, TrainConfig
from saelab.data.stream import TrainStream
from saelab.data.windows import held_out
from saelab.models.loading import load_model
from saelab.train.distributed import free_port
from saelab.train.trainer import train_many


def long_documents(n_docs: int, seed: int = 0) -> str:
    """Documents of 150-400 words: each fills many 32-token windows, so unmixed batches come from one or two."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 400))) for _ in range(n_docs)]
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text(long_documents(160))
    return path


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


def data_cfg(corpus: Path) -> DataConfig:
    return DataConfig(dataset=str(corpus), ctx_len=32, eval_fraction=0.1)


def test_ranks_stream_disjoint_training_documents_and_a_position_resumes_exactly(
    lm, corpus_file: Path
) -> None:
    cfg = data_cfg(corpus_file)
    whole = TrainStream(cfg, lm.tokenizer, seed=3)
    tokens = []
    while len(w := whole.windows(5).tokens):
        tokens.append(w)
    assert whole.exhausted
    train_docs = {i for i in range(whole.position.documents) if not held_out(3, i, 0.1)}
    seen = []
    for rank in range(2):
        s = TrainStream(cfg, lm.tokenizer, seed=3, part=(rank, 2))
        got: set[int] = set()
        while len((w := s.windows(5)).tokens):
            got |= set(np.unique(w.docs).tolist())
        seen.append(got)
    assert not seen[0] & seen[1]  # no document on both ranks
    # every training document is on one rank, but for those of each rank's last partial window (dropped at the
    # corpus's end: under 32 tokens, at most two documents of 20-60 words each)
    assert len(train_docs - seen[0] - seen[1]) <= 4
    assert not (seen[0] | seen[1]) - train_docs  # no held-out document trained on

    # a stream started from a position continues with the windows the uninterrupted stream hands out
    first = TrainStream(cfg, lm.tokenizer, seed=3)
    head = first.windows(9)
    pos = first.position
    rest = TrainStream(cfg, lm.tokenizer, seed=3, start=pos).windows(11)
    straight = TrainStream(cfg, lm.tokenizer, seed=3).windows(20)
    assert np.array_equal(np.concatenate([head.tokens, rest.tokens]), straight.tokens)
    assert np.array_equal(np.concatenate([head.docs, rest.docs]), straight.docs)
    assert np.array_equal(np.concatenate(tokens)[:20], straight.tokens)


def test_every_batch_mixes_documents_within_the_derived_bound(lm, long_corpus: Path) -> None:
    """Each batch is a uniform draw of B rows from a block of R: a document holding m rows of the block puts at
    most B*m/R + sqrt(B/2 ln(R n / delta)) rows into any of n batches (`mixing_bound`); unmixed batches (the
    block's rows in order) break that bound, so the test can tell the two apart."""
    batch, buffer = 128, 4096
    source = StreamSource(lm, data_cfg(long_corpus), 0, ["model.layers.1"], 12_288, batch, buffer, 8)
    assert source.block_rows == 4096
    n_batches = source.steps_per_epoch
    worst, docs_per_batch, unmixed_worst = 0.0, [], 0.0
    block_docs: dict[int, np.ndarray] = {}
    for j, _ in enumerate(source.epoch(torch.Generator().manual_seed(0), batch)):
        b = j * batch // source.block_rows
        if b not in block_docs:
            block_docs[b] = source._current.docs.copy()  # the rows of the block this batch came from
        ids, counts = np.unique(block_docs[b], return_counts=True)
        in_block = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        got_ids, got = np.unique(source.batch_docs, return_counts=True)
        docs_per_batch.append(len(got_ids))
        for d, c in zip(got_ids.tolist(), got.tolist(), strict=True):
            worst = max(worst, c / mixing_bound(batch, source.block_rows, in_block[d], n_batches))
        k = j % (source.block_rows // batch)  # the same batch without mixing: consecutive rows of the block
        plain_ids, plain = np.unique(block_docs[b][k * batch : (k + 1) * batch], return_counts=True)
        for d, c in zip(plain_ids.tolist(), plain.tolist(), strict=True):
            unmixed_worst = max(
                unmixed_worst, c / mixing_bound(batch, source.block_rows, in_block[d], n_batches)
            )
    assert j + 1 == n_batches == 96
    assert worst <= 1.0, f"a batch held {worst:.2f}x the bound's rows of one document"
    assert unmixed_worst > 1.0  # consecutive rows come from one or two long documents
    assert min(docs_per_batch) >= 10


def test_two_hookpoints_from_one_forward_equal_two_streams_of_one(lm, corpus_file: Path) -> None:
    cfg = TrainConfig(expansion=2, k=4, batch_size=64, epochs=1, stream_buffer_rows=512, checkpoint_every=0)
    hps = ["model.layers.1", "model.layers.3"]

    def run(hookpoints: list[str]) -> list:
        src = StreamSource(lm, data_cfg(corpus_file), 0, hookpoints, 1024, 64, 512, 4)
        return train_many(src, [cfg] * len(hookpoints), 0, slots=list(range(len(hookpoints))))

    both = run(hps)
    alone = [run([hp])[0] for hp in hps]
    for a, b, hp in zip(both, alone, hps, strict=True):
        assert a.sae.cfg.hookpoint == hp
        for k, v in a.sae.state_dict().items():
            assert torch.equal(v, b.sae.state_dict()[k]), (hp, k)


def streamed_args(model: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "--collect.format", "stream", "--model.name", str(model), "--data.dataset", str(corpus), "--data.ctx-len", "32",
        "--collect.n-train-tokens", "6144", "--collect.batch-size", "4", "--train.batch-size", "128",
        "--train.stream-buffer-rows", "1024", "--train.epochs", "2", "--train.expansion", "2", "--train.k", "4",
        "--train.checkpoint-every", "3", "--train.log-every", "1", *extra,
    ]  # fmt: skip


def block_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "sae" / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "block"]


@pytest.mark.resume
def test_sigkilled_streamed_training_resumes_with_no_document_repeated_or_skipped(
    tmp_path: Path, tiny_model_dir: Path, long_corpus: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = streamed_args(tiny_model_dir, long_corpus)
    assert saelab(straight, "train", *args).wait() == 0
    proc = saelab(killed, "train", *args)
    ckpts = killed / "sae" / ".train.tmp" / "checkpoints"
    kill_when(
        proc, lambda: any(int(p.name[5:]) >= 15 for p in ckpts.glob("step-*")), "a checkpoint at step 15"
    )
    last = max(ckpts.glob("step-*"))  # a kill between a checkpoint's rename and the removal leaves two
    stopped = json.loads((last / "meta.json").read_text())["step"]
    assert 15 <= stopped < 96  # stopped within the second epoch's blocks, or before
    assert saelab(killed, "train", *args, "--train.resume").wait() == 0  # the same command, resumed

    a, b = block_records(straight), block_records(killed)
    assert len(a) == 2 * 6  # 6,144 tokens of 128-row batches in blocks of 1,024 rows, two epochs
    assert a == b  # the same blocks from the same documents, each once
    rows = [r["rows"] for r in a]
    assert sum(rows) == 2 * 6144
    first = [(r["first_document"], r["last_document"]) for r in a[:6]]
    assert all(x[1] <= y[0] for x, y in itertools.pairwise(first))  # consecutive documents, block by block
    assert (straight / "sae" / "sae.safetensors").read_bytes() == (
        killed / "sae" / "sae.safetensors"
    ).read_bytes()
    record = json.loads((killed / "manifest.json").read_text())["stages"]["train"]
    assert record["resumed_from"] == stopped and record["source"] == "stream"


def test_the_streamed_run_trains_the_configured_variants_at_every_hookpoint(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    run = tmp_path / "r"
    args = streamed_args(tiny_model_dir, corpus_file, "--collect.extra-hookpoints", "model.layers.3")
    args[args.index("6144")] = "2048"
    assert main(["train", "--run-dir", str(run), *args, "--train.variants", "k=8"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["collect"]["format"] == "stream"
    assert not (run / "activations").exists()  # nothing stored
    folders = ["sae", "sae-variants/1-k-8", "sae-hookpoints/model.layers.3/sae",
               "sae-hookpoints/model.layers.3/sae-variants/1-k-8"]  # fmt: skip
    for f in folders:
        cfg = json.loads((run / f / "cfg.json").read_text())
        assert cfg["hookpoint"] == ("model.layers.3" if "hookpoints" in f else "model.layers.2")
        assert cfg["k"] == (8 if "variants" in f else 4)
    # a collected run refuses flags that would only start a new one, rather than ignore them
    with pytest.raises(SystemExit, match="other --data"):
        main(["train", "--run-dir", str(run), "--data.ctx-len", "64", "--force"])


@pytest.mark.bad_input
def test_a_corpus_that_runs_out_mid_training_says_how_much_it_held(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    args = streamed_args(tiny_model_dir, corpus_file)
    args[args.index("6144")] = "10000000"
    assert main(["train", "--run-dir", str(run), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"saelab: ActivationError: dataset .* ran out after 120 documents: its training documents gave (\d+) "
        r"kept tokens, fewer than the 10000000 .*; lower --collect.n-train-tokens to at most \1, or use a "
        r"larger corpus",
        err,
    ), err
    assert not (run / "sae" / "sae.safetensors").exists()
    assert (run / "data" / "windows.npz").exists()  # the held-out windows collect kept are still there


def test_a_bfloat16_model_feeds_float32_rows_to_a_float32_sae(
    tiny_model_dir: Path, corpus_file: Path
) -> None:
    lm16 = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    source = StreamSource(lm16, data_cfg(corpus_file), 0, ["model.layers.1"], 1024, 128, 512, 4)
    assert source.head(8).dtype == torch.float32
    cfg = TrainConfig(expansion=2, k=4, batch_size=128, epochs=1, stream_buffer_rows=512, checkpoint_every=0)
    result = train_many(source, [cfg], 0)[0]
    assert all(p.dtype == torch.float32 for p in result.sae.parameters())
    assert result.steps == 8 and np.isfinite(result.final_loss)


@pytest.mark.bad_input
def test_stream_source_refuses_a_buffer_smaller_than_a_batch(lm, corpus_file: Path) -> None:
    with pytest.raises(ActivationError, match="stream_buffer_rows 100 is smaller than one batch of 128"):
        StreamSource(lm, data_cfg(corpus_file), 0, ["model.layers.1"], 1024, 128, 100, 4)


def test_resuming_a_streamed_block_needs_its_checkpoint(lm, corpus_file: Path) -> None:
    source = StreamSource(lm, data_cfg(corpus_file), 0, ["model.layers.1"], 2048, 128, 512, 4)
    with pytest.raises(ActivationError, match="without the checkpoint that records where it begins"):
        next(source.epoch(torch.Generator(), 128, start=5))


class Replay:
    """The batches two ranks trained on, joined into the global batches one process trains on; its statistics
    are rank 0's first block's (the ranks start from rank 0's)."""

    def __init__(self, first: torch.Tensor, batches: list[torch.Tensor], n_rows: int) -> None:
        self.first, self.batches, self.n_rows = first, batches, n_rows
        self.d_in, self.device = first.shape[1], first.device
        self.epochs = 0

    def head(self, n: int) -> torch.Tensor:
        return self.first[:n]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.first[sample_ids(len(self.first), n, gen)]

    def epoch(self, gen: torch.Generator, batch_size: int, start: int = 0, part: tuple[int, int] = (0, 1)):
        torch.randint(2**62, (1,), generator=gen)  # as StreamSource draws
        per = self.n_rows // batch_size
        yield from self.batches[self.epochs * per : (self.epochs + 1) * per]
        self.epochs += 1


def test_ddp_ranks_stream_disjoint_documents_and_match_one_process(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """Two gloo ranks, each streaming its own documents: no document on both; the ranks' SAEs agree exactly;
    one process trained on the same global batches (the ranks' halves joined) gives the same SAE up to float
    summation order."""
    mp.spawn(
        stream_ddp_worker,
        args=(2, free_port(), str(tmp_path), str(tiny_model_dir), str(corpus_file)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    docs = [set(torch.cat(r["docs"]).tolist()) for r in ranks]
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    for name, value in ranks[0]["sae"].items():
        assert torch.equal(value, ranks[1]["sae"][name]), name
    joined = [torch.cat(pair) for pair in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)]
    assert len(joined) == 2 * (2048 // 128)
    torch.set_num_threads(1)
    single = train_many(Replay(ranks[0]["first"], joined, 2048), [STREAM_DDP_CFG], 0)[0].sae.state_dict()
    for name, value in single.items():
        torch.testing.assert_close(ranks[0]["sae"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.bad_input
def test_streamed_runs_refuse_a_glob_matching_nothing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--collect.format", "stream", "--model.name", str(tiny_model_dir)]
    args += ["--data.dataset", str(tmp_path / "shards" / "*.parquet")]
    assert main(["train", "--run-dir", str(tmp_path / "r"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("saelab: DataError: glob ") and "matches no files" in err, err


@pytest.mark.bad_input
def test_ids_beyond_the_vocabulary_deep_in_a_streamed_corpus_stop_training_naming_the_rows(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The held-out windows come from the corpus's first rows; the bad id is met by the training stream, after
    steps were taken: one line naming the file and rows, and no SAE saved."""
    ids = np.random.default_rng(0).integers(3, 40, size=(6000, 16))
    ids[4100, 5] = 10**6
    np.save(tmp_path / "ids.npy", ids)
    args = streamed_args(tiny_model_dir, tmp_path / "ids.npy")
    args[args.index("6144")] = "80000"
    args[args.index("1024")] = "4096"
    args[args.index("--train.batch-size") + 1] = "512"
    assert main(["train", "--run-dir", str(tmp_path / "r"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"saelab: DataError: .*ids\.npy \(rows 4096-5999\).*1000000.*", err), err
    log = (tmp_path / "r" / "sae" / ".train.tmp" / "train_log.jsonl").read_text().splitlines()
    assert len(log) > 10  # training had gone on before the stream met the row
    assert not (tmp_path / "r" / "sae" / "sae.safetensors").exists()


@pytest.mark.bad_input
def test_train_in_a_folder_holding_no_run_streams_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --run-dir is an error naming both ways to start a run, not a new streamed run."""
    assert main(["train", "--run-dir", str(tmp_path / "typo")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "manifest.json not found" in err and "--collect.format stream" in err, err
    assert not (tmp_path / "typo").exists()
