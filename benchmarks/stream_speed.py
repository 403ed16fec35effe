"""On-the-fly TopK training against the bare forward, sparsify's own `Trainer` and SAELens's own runner, in one run.

    make peers   # once: .venv-peers/sparsify, .venv-peers/saelens
    .venv/bin/python benchmarks/stream_speed.py [--tokens 32768] [--batch 1024] [--repeats 2] \
        [--dtype float32|bfloat16] [--hookpoint layers.15] [--out benchmarks/results/stream_speed.json]

On the bundled SmolLM2-135M at `--hookpoint` (`layers.15` unless given) and the bundled Wikipedia corpus
(saelab's streamed windows, default `DataConfig`), each round measures, in turn (the order reversed every other
round, so a change of load shows):
- forward: the bare forward to the hookpoint (stopped after the hooked layer, `capture` + `forward_until`, no
  SAE) over the windows saelab's on-the-fly source reads, `collect.batch_size` (16) windows per forward;
- saelab: `train()` on a `StreamSource`, the code path of `saelab train --collect.format stream` (model forwards
  into the mixing buffer, statistics, every SAE step), `--tokens` kept rows;
- sparsify: its `Trainer.fit()` in `.venv-peers/sparsify` (`benchmarks/peers/sparsify_stream.py`), which hooks the
  model and runs its whole forward per step, on the same windows;
- saelens: its `LanguageModelSAETrainingRunner.run()` in `.venv-peers/saelens` (`benchmarks/peers/saelens_stream.py`):
  its `ActivationsStore` runs the LM (wrapped as a `HookedProxyLM`, stopped after the hooked layer) 32 windows at a
  time into its mixing buffer, on the first windows of the same stream, until it has trained on as many tokens as
  saelab (`--tokens`, whole batches), with saelab's schedule; it trains on every position (SAELens excludes nothing
  by default) and starts b_dec at zero.
Rates are model tokens per second (window tokens through the LM, the unit of the bare forward; for SAELens those of
the windows its forwards actually read, including tokens its buffer still held at the end) and trained tokens per
second. Every run uses the same SAE: TopK, `--expansion` x 576 latents, k `--k`, batch `--batch` tokens (sparsify:
`--batch` / 128 windows), Adam lr `--lr`, one pass. Each SAE's held-out explained variance, L0 and dead fraction come
from ONE forward and metric function (`peer_training.reconstruction_stats`) on the held-out windows' kept tokens
(positions 0-1 and special tokens excluded), after the shared forward has reproduced each library's own
reconstruction. Model loading is outside every clock (each peer's process loads its own copy). `--dtype` sets the
LM's dtype in every run and in the held-out forward (every library keeps its SAE in float32). The output JSON holds
every run, the medians and the ratios saelab / forward, saelab / sparsify and saelab / saelens (model and trained
tokens per second).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peer_training import (
    CACHE,
    PEERS,
    ROOT,
    PlainSAE,
    check_own_forward,
    machine,
    plain_forward,
    reconstruction_stats,
    self_test_metrics,
)
from safetensors.torch import save_file

from saelab.activations.onthefly import StreamSource
from saelab.config import DataConfig, TrainConfig
from saelab.data.stream import TrainStream
from saelab.data.windows import read_held_out
from saelab.models.loading import LoadedModel, capture, forward_until, load_model, resolve_hookpoint
from saelab.train.trainer import train

MODEL = "bundled:smollm2-135m-instruct"
PEER_RUNS = ("sparsify", "saelens")
FORWARD_WINDOWS = 16
"""`collect.batch_size`'s default: windows per forward of the on-the-fly source."""


def stream_windows(
    lm: LoadedModel, data: DataConfig, seed: int, rows: int, min_windows: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, keep) of the training windows saelab's stream reads to fill `rows` kept rows, in whole forwards (and
    at least `min_windows` windows)."""
    stream = TrainStream(data, lm.tokenizer, seed)
    tokens: list[np.ndarray] = []
    keep: list[np.ndarray] = []
    have = 0
    while have < rows or sum(len(t) for t in tokens) < min_windows:
        block = stream.windows(FORWARD_WINDOWS)
        if len(block.tokens) == 0:
            raise SystemExit(
                f"the corpus holds fewer than {rows} kept training tokens or {min_windows} windows"
            )
        tokens.append(block.tokens)
        keep.append(block.keep)
        have += int(block.keep.sum())
    stream.close()
    return np.concatenate(tokens), np.concatenate(keep)


def held_out_acts(lm: LoadedModel, data: DataConfig, seed: int, hookpoint: str) -> torch.Tensor:
    windows = read_held_out(data, lm.tokenizer, seed).windows
    idx = windows.eval_idx
    out = []
    for lo in range(0, len(idx), FORWARD_WINDOWS):
        sel = idx[lo : lo + FORWARD_WINDOWS]
        ids = torch.as_tensor(windows.tokens[sel], dtype=torch.long)
        with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, ids)
        out.append(store[hookpoint][torch.as_tensor(windows.keep[sel])].float())
    return torch.cat(out)


def run_forward(lm: LoadedModel, hookpoint: str, tokens: np.ndarray) -> dict[str, Any]:
    load = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for lo in range(0, len(tokens), FORWARD_WINDOWS):
        ids = torch.as_tensor(tokens[lo : lo + FORWARD_WINDOWS], dtype=torch.long)
        with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, ids)
        store[hookpoint].float()
    wall = time.perf_counter() - t0
    return {
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu0,
        "model_tokens": tokens.size,
        "model_tokens_per_second": tokens.size / wall,
        "load_1min_before": load,
        "load_1min_after": os.getloadavg()[0],
    }


def run_saelab(
    lm: LoadedModel, hookpoint: str, data: DataConfig, args: argparse.Namespace, model_tokens: int
) -> tuple[dict[str, Any], PlainSAE]:
    cfg = TrainConfig(
        architecture="topk",
        expansion=args.expansion,
        k=args.k,
        lr=args.lr,
        batch_size=args.batch,
        epochs=1,
        checkpoint_every=0,
    )
    load = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    source: Any = StreamSource(
        lm, data, args.seed, [hookpoint], args.tokens, args.batch, cfg.stream_buffer_rows, FORWARD_WINDOWS
    )
    result = train(source, cfg, args.seed, hookpoint=hookpoint)
    wall = time.perf_counter() - t0
    sae = result.sae.eval()
    plain = PlainSAE(sae.W_enc_DF.detach(), sae.b_enc_F.detach(), sae.W_dec_FD.detach(), sae.b_dec_D.detach(),
                     args.k, None)  # fmt: skip
    trained = result.steps * args.batch
    return {
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu0,
        "steps": result.steps,
        "model_tokens": model_tokens,
        "trained_tokens": trained,
        "model_tokens_per_second": model_tokens / wall,
        "trained_tokens_per_second": trained / wall,
        "load_1min_before": load,
        "load_1min_after": os.getloadavg()[0],
        "recipe": {"auxk_coef": cfg.auxk_coef, "stream_buffer_rows": cfg.stream_buffer_rows},
    }, plain


PEER_ENV = {
    "OMP_NUM_THREADS": "2",
    "TQDM_DISABLE": "1",
    "SPARSIFY_DISABLE_TRITON": "1",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def run_peer(
    name: str, script: str, args: list[str], out: Path
) -> tuple[dict[str, Any], PlainSAE, torch.Tensor, torch.Tensor]:
    """Run `benchmarks/peers/<script>` in `.venv-peers/<name>`: its result.json with rates, its SAE and check rows."""
    python = ROOT / ".venv-peers" / name / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make peers` first")
    cmd = [str(python), str(PEERS / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, **PEER_ENV}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    r = json.loads((out / "result.json").read_text())
    r["seconds"] = r["train_seconds"]
    r["model_tokens_per_second"] = r["model_tokens"] / r["train_seconds"]
    r["trained_tokens_per_second"] = r["trained_tokens"] / r["train_seconds"]
    sae, check_x, check_x_hat = PlainSAE.load(out / "sae.safetensors")
    return r, sae, check_x, check_x_hat


def run_sparsify(
    files: dict[str, Path], hookpoint: str, args: argparse.Namespace, n_windows: int, out: Path
) -> tuple[dict[str, Any], PlainSAE, torch.Tensor, torch.Tensor]:
    batch_windows = args.batch // 128
    steps = n_windows // batch_windows
    cmd = [
        "--model-dir", str(files["model"]), "--windows", str(files["windows"]), "--check", str(files["check"]),
        "--hookpoint", hookpoint.removeprefix("model."),
        "--batch-windows", str(batch_windows), "--expansion", str(args.expansion), "--k", str(args.k),
        "--lr", str(args.lr), "--warmup", str(max(1, int(0.05 * steps))), "--seed", str(args.seed),
        "--dtype", args.dtype,
    ]  # fmt: skip
    return run_peer("sparsify", "sparsify_stream.py", cmd, out)


def run_saelens(
    files: dict[str, Path], hookpoint: str, args: argparse.Namespace, out: Path
) -> tuple[dict[str, Any], PlainSAE, torch.Tensor, torch.Tensor]:
    """SAELens's runner on the first `saelens_windows` windows of the same stream, told to train on as many tokens
    as saelab does (`--tokens`, whole batches), with saelab's schedule (5% warm-up, linear decay over the last 20%)."""
    steps = args.tokens // args.batch
    cmd = [
        "--model-dir", str(files["model"]), "--windows", str(files["saelens_windows"]),
        "--check", str(files["check"]), "--hookpoint", hookpoint, "--training-tokens", str(steps * args.batch),
        "--batch", str(args.batch), "--expansion", str(args.expansion), "--k", str(args.k), "--lr", str(args.lr),
        "--warmup", str(max(1, int(0.05 * steps))), "--decay", str(steps - int(0.8 * steps)),
        "--seed", str(args.seed), "--dtype", args.dtype,
    ]  # fmt: skip
    return run_peer("saelens", "saelens_stream.py", cmd, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32_768, help="kept training tokens saelab trains on")
    p.add_argument("--batch", type=int, default=1024, help="tokens per SAE step (a multiple of 128)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--hookpoint",
        default="layers.15",
        help="a residual-stream layer output, `layers.N` (the model has 30)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the LM's dtype in every run (saelab's `--model.dtype`); each SAE trains in float32",
    )
    p.add_argument("--only", nargs="*", choices=("forward", "saelab", *PEER_RUNS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_speed.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    load_start = os.getloadavg()
    todo = args.only or ["forward", "saelab", *PEER_RUNS]
    data = DataConfig()
    lm = load_model(MODEL, dtype=args.dtype)
    hookpoint = resolve_hookpoint(lm.model, args.hookpoint)
    eval_ND = held_out_acts(lm, data, args.seed, hookpoint)
    self_test_metrics(eval_ND)
    tokens, keep = stream_windows(lm, data, args.seed, args.tokens)
    from saelab.models.loading import _bundled_cache

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in todo}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "model": _bundled_cache(MODEL),
            "windows": Path(tmp) / "w.npy",
            "saelens_windows": Path(tmp) / "saelens_w.npy",
            "check": Path(tmp) / "c.st",
        }
        needed = (
            int(np.searchsorted(np.cumsum(keep.sum(1)), args.tokens)) + 1
        )  # windows holding the kept rows
        n_windows = math.ceil(needed / (args.batch // 128)) * (args.batch // 128)
        np.save(files["windows"], tokens[:n_windows])
        # SAELens reads 32 windows per forward and its mixing buffer holds tokens back (10 windows by default), and
        # it would reuse windows once they run out: give it the same stream's first windows with a margin.
        saelens_windows = math.ceil(args.tokens / 128) + 64 + args.batch // 128
        if "saelens" in todo:
            np.save(files["saelens_windows"], stream_windows(lm, data, args.seed, 0, saelens_windows)[0])
        save_file({"x": eval_ND[:64].contiguous()}, str(files["check"]))
        for rep in range(args.repeats):
            for name in todo if rep % 2 == 0 else todo[::-1]:
                if name == "forward":
                    r = run_forward(lm, hookpoint, tokens)
                else:
                    if name == "saelab":
                        r, sae = run_saelab(lm, hookpoint, data, args, tokens.size)
                        own = plain_forward(sae)(eval_ND[:64])[0]  # its own forward is the folded one
                        check_x, check_x_hat = eval_ND[:64], own
                    elif name == "sparsify":
                        r, sae, check_x, check_x_hat = run_sparsify(
                            files, hookpoint, args, n_windows, CACHE / "stream_speed" / f"sparsify-{rep}"
                        )
                    else:
                        r, sae, check_x, check_x_hat = run_saelens(
                            files, hookpoint, args, CACHE / "stream_speed" / f"saelens-{rep}"
                        )
                    r["check_max_rel_diff"] = check_own_forward(sae, check_x, check_x_hat, name)
                    r.update(reconstruction_stats(eval_ND, plain_forward(sae), sae.d_sae))
                runs[name].append(r)
                ev = f", EV {r['explained_variance']:.3f}, L0 {r['l0']:.1f}" if "l0" in r else ""
                print(
                    f"[{rep}] {name}: {r['model_tokens_per_second']:,.0f} model tok/s in {r['seconds']:.1f} s"
                    f"{ev}, load {r['load_1min_before']:.2f}->{r['load_1min_after']:.2f}",
                    flush=True,
                )
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("model_tokens_per_second", "seconds")}
           for n, rs in runs.items()}  # fmt: skip
    for name in ("saelab", *PEER_RUNS):
        if name in runs:
            for key in ("explained_variance", "l0", "dead_fraction", "trained_tokens_per_second"):
                med[name][key] = statistics.median(r[key] for r in runs[name])
    ratios = {}
    if "saelab" in med and "forward" in med:
        ratios["saelab_over_forward"] = (
            med["saelab"]["model_tokens_per_second"] / med["forward"]["model_tokens_per_second"]
        )
    for peer in PEER_RUNS:
        if "saelab" in med and peer in med:
            ratios[f"saelab_over_{peer}"] = (
                med["saelab"]["model_tokens_per_second"] / med[peer]["model_tokens_per_second"]
            )
            ratios[f"saelab_over_{peer}_trained"] = (
                med["saelab"]["trained_tokens_per_second"] / med[peer]["trained_tokens_per_second"]
            )
    result = {
        "command": "python benchmarks/stream_speed.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "settings": {
            **vars(args),
            "out": str(args.out),
            "hookpoint": hookpoint,
            "model": MODEL,
            "forward_windows": FORWARD_WINDOWS,
            "forward_windows_total": len(tokens),
            "sparsify_windows": n_windows,
            "saelens_windows_given": saelens_windows,
            "eval_tokens": eval_ND.shape[0],
        },
        "medians": med,
        "ratios": ratios,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"medians": med, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
