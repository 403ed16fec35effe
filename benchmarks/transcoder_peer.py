"""TopK transcoder training speed and FVU at matched L0: saelab against sparsify's transcoder on the same tokens.

    make .venv-peers/sparsify/.installed   # once
    .venv/bin/python benchmarks/transcoder_peer.py [--tokens 40960] [--repeats 1] \
        [--out benchmarks/results/transcoder_peer.json]

What it does, in one invocation so every ratio comes from one run on one machine state:
1. Pairs are collected once with saelab's API from the bundled SmolLM2-135M at layer 15: the MLP's input (the output
   of `model.layers.15.post_attention_layernorm`) and its output (`model.layers.15.mlp`) at the same positions,
   positions excluded as saelab's `DataConfig` excludes them (the first 2 of every window and special tokens), from
   disjoint training and held-out documents. Cached under `benchmarks/.cache/` (keyed by these settings).
2. Each trainer runs in its own environment as a subprocess (`benchmarks/peers/saelab_transcoder_train.py` in
   .venv, `benchmarks/peers/sparsify_transcoder_train.py` in .venv-peers/sparsify), plain and with the skip path
   (`--variant skip`), with the same hyperparameters (TopK, `--expansion` x 576 latents, k `--k`, batch, Adam lr,
   one pass over the same tokens in the same order, seed 0, 2 torch threads), and times its own training loop.
3. Every trainer's weights go through ONE forward (`pre = ReLU(x W_enc + b_enc)`, the k largest, `y_hat = z W_dec +
   b_dec (+ x W_skip)`) and ONE metric on the held-out pairs: FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (mean
   per dimension, float64 sums), L0 (k for both: TopK matches L0 exactly) and dead latents. First the shared forward
   must reproduce each library's own prediction of 64 held-out rows (relative 1e-3), so a mapping error cannot pass.
Trainers run one after another, `--repeats` times in turn; the table reports medians and saelab's speed ÷ sparsify's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import machine_facts  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """What the cached pairs depend on (the cache key hashes every field but `n_train`)."""

    model: str = "bundled:smollm2-135m-instruct"
    input_hookpoint: str = "model.layers.15.post_attention_layernorm"
    target_hookpoint: str = "model.layers.15.mlp"
    n_train: int = 40_960
    n_eval: int = 8_192
    eval_docs: int = 300
    seed: int = 0
    collect_batch: int = 16

    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "n_train"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_or_collect(spec: PairSpec) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    path = CACHE / f"tc-pairs-{spec.key()}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
        if meta["n_train"] >= spec.n_train:
            return path, load_file(str(path)), meta
    CACHE.mkdir(parents=True, exist_ok=True)
    tensors, meta = collect_pairs(spec)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.rename(path)
    return path, tensors, meta


def collect_pairs(spec: PairSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The MLP's input and output at the kept positions of training and held-out documents (one forward per batch
    of windows, stopped after the MLP)."""
    from saelab.config import DataConfig
    from saelab.data.windows import BUNDLED_WIKIPEDIA, build_windows, iter_documents
    from saelab.models.loading import capture, forward_until, load_model

    lm = load_model(spec.model)
    hps = [spec.input_hookpoint, spec.target_hookpoint]
    docs = list(iter_documents(BUNDLED_WIKIPEDIA))
    order = np.random.default_rng(spec.seed).permutation(len(docs))
    splits = {
        "eval": (order[: spec.eval_docs], spec.n_eval),
        "train": (order[spec.eval_docs :], spec.n_train),
    }
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = dataclasses.asdict(spec)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (idx, n_tokens) in splits.items():
            corpus = Path(tmp) / f"{name}.jsonl"
            corpus.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in idx))
            windows = build_windows(DataConfig(dataset=str(corpus)), lm.tokenizer, spec.seed, n_tokens)
            rows = np.concatenate([windows.train_idx, windows.eval_idx])  # the split is by document, above
            xs, ys, n = [], [], 0
            for s in range(0, len(rows), spec.collect_batch):
                batch = rows[s : s + spec.collect_batch]
                ids = torch.as_tensor(windows.tokens[batch], dtype=torch.long, device=lm.device)
                with torch.inference_mode(), capture(lm.model, hps) as store:
                    forward_until(lm.model, ids)
                keep = torch.as_tensor(windows.keep[batch])
                xs.append(store[hps[0]][keep].float().cpu())
                ys.append(store[hps[1]][keep].float().cpu())
                n += int(keep.sum())
                if n >= n_tokens:
                    break
            if n < n_tokens:
                raise SystemExit(f"{name}: the documents hold {n} kept positions, fewer than {n_tokens}")
            out[f"x_{name}"] = torch.cat(xs)[:n_tokens].contiguous()
            out[f"y_{name}"] = torch.cat(ys)[:n_tokens].contiguous()
    meta["collect_seconds"] = round(time.perf_counter() - start, 1)
    meta["model_weights_sha256"] = lm.weights_sha256
    return out, meta


# --- one forward and one metric for every trainer ----------------------------------------------------------------


def plain_forward(t: dict[str, torch.Tensor]) -> Any:
    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_BF = torch.relu(x_BD @ t["W_enc"] + t["b_enc"])
        acts_BK, idx_BK = pre_BF.topk(int(t["k"]), dim=-1)
        z_BF = torch.zeros_like(pre_BF).scatter_(1, idx_BK, acts_BK)
        y_hat_BO = z_BF @ t["W_dec"] + t["b_dec"]
        if "W_skip" in t:
            y_hat_BO = y_hat_BO + x_BD @ t["W_skip"]
        return y_hat_BO, acts_BK, idx_BK

    return forward


@torch.no_grad()
def fvu_stats(
    x_ND: torch.Tensor, y_NO: torch.Tensor, forward: Any, d_sae: int, batch: int = 4096
) -> dict[str, float]:
    """FVU = sum ||y - y_hat||^2 / sum ||y - mean||^2 (per-dimension mean over all tokens), L0, dead fraction."""
    sq_err, l0 = 0.0, 0
    fired_F = torch.zeros(d_sae, dtype=torch.bool)
    for x_BD, y_BO in zip(x_ND.split(batch), y_NO.split(batch), strict=True):
        y_hat_BO, acts_BK, idx_BK = forward(x_BD)
        sq_err += float((y_BO - y_hat_BO).double().pow(2).sum())
        active = acts_BK > 0
        l0 += int(active.sum())
        fired_F[idx_BK[active]] = True
    y = y_NO.double()
    total = float((y - y.mean(dim=0)).pow(2).sum())
    return {"fvu": sq_err / total, "l0": l0 / len(x_ND), "dead_fraction": 1 - float(fired_F.float().mean())}


def self_test(y_NO: torch.Tensor) -> None:
    """Predicting the per-dimension mean scores FVU 1 (variance about the mean, not about zero)."""
    mean = y_NO.mean(dim=0)

    def at_mean(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            mean.expand(len(x_BD), -1),
            torch.ones(len(x_BD), 1),
            torch.zeros(len(x_BD), 1, dtype=torch.long),
        )

    fvu = fvu_stats(y_NO, y_NO, at_mean, 1)["fvu"]
    assert abs(fvu - 1) < 1e-9, fvu


def run_trainer(
    name: str, python: Path, script: str, variant: str, pairs: Path, args: argparse.Namespace
) -> dict:
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make .venv-peers/sparsify/.installed` first")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TQDM_DISABLE": "1",
           "SPARSIFY_DISABLE_TRITON": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(python), str(PEERS / script), "--acts", str(pairs), "--tokens", str(args.tokens), "--out", tmp,
               "--expansion", str(args.expansion), "--k", str(args.k), "--batch", str(args.batch),
               "--lr", str(args.lr), "--variant", variant]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        t = load_file(str(Path(tmp) / "sae.safetensors"))
    own, shared = t["check_x_hat"], plain_forward(t)(t["check_x"])[0]
    rel = float(((shared - own).norm(dim=1) / own.norm(dim=1)).max())
    if rel > 1e-3:
        raise AssertionError(
            f"{name} {variant}: the shared forward differs from the library's own by {rel:.2e}"
        )
    if variant == "skip" and "W_skip" not in t:
        raise AssertionError(f"{name} skip: no W_skip in its weights")
    return {**result, "check_max_rel_diff": rel, "weights": t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=40_960, help="training pairs")
    p.add_argument("--eval-tokens", type=int, default=8_192, help="held-out pairs")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "transcoder_peer.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    pairs, t, meta = load_or_collect(PairSpec(n_train=args.tokens, n_eval=args.eval_tokens))
    x_eval, y_eval = t["x_eval"][: args.eval_tokens], t["y_eval"][: args.eval_tokens]
    self_test(y_eval)
    trainers = [
        ("saelab", ROOT / ".venv" / "bin" / "python", "saelab_transcoder_train.py"),
        ("sparsify", ROOT / ".venv-peers" / "sparsify" / "bin" / "python", "sparsify_transcoder_train.py"),
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for variant in ("plain", "skip"):
            for name, python, script in trainers:
                r = run_trainer(name, python, script, variant, pairs, args)
                w = r.pop("weights")
                r.update(fvu_stats(x_eval, y_eval, plain_forward(w), w["W_enc"].shape[1]))
                runs.setdefault(f"{name} {variant}", []).append(r)
                print(f"{name} {variant}: {r['tokens_per_second']:,.0f} tok/s, FVU {r['fvu']:.4f}, "
                      f"L0 {r['l0']:.1f}, dead {r['dead_fraction']:.3f}", flush=True)  # fmt: skip
    keys = ("tokens_per_second", "train_seconds", "cpu_seconds", "fvu", "l0", "dead_fraction")
    summary = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    for variant in ("plain", "skip"):
        ours, theirs = summary[f"saelab {variant}"], summary[f"sparsify {variant}"]
        ours["speed_ratio_vs_sparsify"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
        # CPU time is the steadier measure on a shared machine (wall time also counts waiting for a busy core)
        ours["cpu_ratio_vs_sparsify"] = theirs["cpu_seconds"] / ours["cpu_seconds"]
    doc = {"args": vars(args) | {"out": str(args.out)}, "pairs": meta, "summary": summary, "runs": runs,
           "machine": machine_facts(2, load_before)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    print(
        "| trainer | tok/s (wall) | saelab ÷ sparsify, wall | CPU s | saelab ÷ sparsify, CPU | FVU | L0 | dead |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        wall = f"{s['speed_ratio_vs_sparsify']:.2f}×" if "speed_ratio_vs_sparsify" in s else ""
        cpu = f"{s['cpu_ratio_vs_sparsify']:.2f}×" if "cpu_ratio_vs_sparsify" in s else ""
        print(f"| {name} | {s['tokens_per_second']:,.0f} | {wall} | {s['cpu_seconds']:.1f} | {cpu} | "
              f"{s['fvu']:.4f} | {s['l0']:.1f} | {s['dead_fraction']:.3f} |")  # fmt: skip
    print(f"load average before {load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
