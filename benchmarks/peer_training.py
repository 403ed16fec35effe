"""TopK trainer speed and quality: saelab against SAELens, dictionary_learning and sparsify on the same activations.

    make peers   # once: .venv-peers/{saelens,sparsify,dictlearn}
    .venv/bin/python benchmarks/peer_training.py [--tokens 286720] [--repeats 2] \
        [--out benchmarks/results/peer_training.json]

What it does, in one invocation so every ratio comes from one run on one machine state:
1. Activations are collected once with saelab's own API (`build_windows` + `collect`) from the bundled SmolLM2-135M
   at the middle layer, positions excluded exactly as saelab's `DataConfig` excludes them (the first 2 of every
   window and special tokens: the massive activations). Training and held-out tokens come from disjoint documents
   (a seeded document split, each side concatenated and cut into windows as the data stage does). They are cached
   under `benchmarks/.cache/`, keyed by a hash of these settings, so reruns skip the ~6 minutes of collection.
2. Each trainer runs in its own virtual environment as a subprocess (`benchmarks/peers/<name>_train.py`; saelab's
   runs in `.venv`), with the same architecture and hyperparameters (TopK, width 4608 or `--expansion` x d_model, k 32 or `--k`, batch 4096, Adam lr
   4e-4, one pass over the same tokens, seed 0, 2 torch threads). Each times its own training loop (wall clock,
   data already in memory and the trainer built) and writes plain weights (`W_enc` [D, F], `b_enc`, `W_dec`
   [F, D], `b_dec`, `k`, with any normalisation folded in) plus its own reconstruction of a few held-out rows.
3. Every trainer's weights go through ONE TopK forward and ONE metric function (`reconstruction_stats`) on the
   held-out tokens: EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2, L0, dead fraction, MSE. Before that the
   shared forward must reproduce each library's own reconstruction of the check rows, so a weight-mapping error
   cannot pass silently.
Trainers run one after another, `--repeats` times in turn; the table reports medians.

Develop with `--tokens 40000 --repeats 1` (a prefix of the same cached tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
PEERS = ROOT / "benchmarks" / "peers"


# --- activations ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActsSpec:
    """What the cached activations depend on (the cache key hashes every field but `n_train`)."""

    model: str = "bundled:smollm2-135m-instruct"
    hookpoint: str = "auto"
    n_train: int = 286_720
    """Training tokens (70 batches of 4,096); a smaller request reads a prefix of a larger cached set."""
    n_eval: int = 50_000
    """Held-out tokens, from documents that no training token comes from."""
    eval_docs: int = 600
    """Documents held out (a seeded permutation of the corpus's documents)."""
    seed: int = 0
    collect_batch: int = 16

    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "n_train"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class Acts(NamedTuple):
    train_ND: torch.Tensor
    eval_ND: torch.Tensor
    meta: dict[str, Any]
    path: Path
    """The cache file (tensors `train`, `eval`); trainers read the first `n_train` rows of `train`."""


def load_or_collect(spec: ActsSpec) -> Acts:
    path = CACHE / f"acts-{spec.key()}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
        if meta["n_train"] >= spec.n_train:
            t = load_file(str(path))
            return Acts(t["train"][: spec.n_train], t["eval"], meta, path)
    CACHE.mkdir(parents=True, exist_ok=True)
    train_ND, eval_ND, meta = collect_split(spec)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"train": train_ND, "eval": eval_ND}, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.rename(path)
    return Acts(train_ND, eval_ND, meta, path)


def collect_split(spec: ActsSpec) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Collect training and held-out activations from disjoint documents with saelab's data and collect stages."""
    from saelab.activations.store import collect
    from saelab.config import DataConfig
    from saelab.data.windows import BUNDLED_WIKIPEDIA, build_windows, iter_documents
    from saelab.models.loading import load_model, resolve_hookpoint

    lm = load_model(spec.model)
    hookpoint = resolve_hookpoint(lm.model, spec.hookpoint)
    docs = list(iter_documents(BUNDLED_WIKIPEDIA))
    order = np.random.default_rng(spec.seed).permutation(len(docs))
    splits = {
        "eval": (order[: spec.eval_docs], spec.n_eval),
        "train": (order[spec.eval_docs :], spec.n_train),
    }
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {**dataclasses.asdict(spec), "hookpoint": hookpoint, "data_config": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (idx, n_tokens) in splits.items():
            corpus = Path(tmp) / f"{name}.jsonl"
            corpus.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in idx))
            data_cfg = DataConfig(dataset=str(corpus))
            windows = build_windows(data_cfg, lm.tokenizer, spec.seed)
            # every window of this split's own corpus is used; the split is by document, above
            windows = dataclasses.replace(
                windows, eval_idx=np.empty(0, dtype=np.int64), train_idx=np.arange(len(windows.tokens))
            )
            acts = collect(lm, windows, hookpoint, n_tokens, spec.collect_batch)
            out[name] = acts.acts_ND[:n_tokens].contiguous()
            norms = out[name].norm(dim=1)
            meta[f"{name}_docs"] = len(idx)
            meta[f"{name}_kept_fraction_of_positions"] = round(float(windows.keep.mean()), 4)
            meta[f"{name}_norm_median"] = round(float(norms.median()), 2)
            meta[f"{name}_norm_max"] = round(float(norms.max()), 2)
            meta["data_config"] = {
                k: v for k, v in dataclasses.asdict(data_cfg).items() if k in ("ctx_len", "exclude_first")
            } | {"exclude_special": data_cfg.exclude_special}
    meta["collect_seconds"] = round(time.perf_counter() - start, 1)
    meta["model_weights_sha256"] = lm.weights_sha256
    return out["train"], out["eval"], meta


# --- one forward and one metric function for every trainer -------------------------------------------------------


class PlainSAE(NamedTuple):
    """The exchange format the trainer scripts write (see benchmarks/peers/common.py)."""

    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    k: int
    threshold_F: torch.Tensor | None
    """BatchTopK at inference: latents whose pre-activation exceeds it (per-token TopK when None)."""

    @classmethod
    def load(cls, path: Path) -> tuple[PlainSAE, torch.Tensor, torch.Tensor]:
        """(the SAE, the check rows, the library's own reconstruction of them)."""
        t = load_file(str(path))
        sae = cls(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], int(t["k"]), t.get("threshold"))
        return sae, t["check_x"], t["check_x_hat"]

    @property
    def d_sae(self) -> int:
        return self.W_enc_DF.shape[1]


Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""x [B, D] -> (x_hat [B, D], active values [B, K], their latent indices [B, K]); values <= 0 are padding."""


def plain_forward(sae: PlainSAE) -> Forward:
    """pre = ReLU((x - b_dec) W_enc + b_enc); the k largest per token (or pre > threshold); x_hat = z W_dec + b_dec."""

    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_BF = torch.relu((x_BD - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)
        if sae.threshold_F is None:
            acts_BK, idx_BK = pre_BF.topk(sae.k, dim=-1)
        else:
            z_BF = pre_BF * (pre_BF > sae.threshold_F)
            acts_BK, idx_BK = z_BF.topk(max(1, int((z_BF > 0).sum(dim=1).max())), dim=-1)
        z_BF = torch.zeros_like(pre_BF).scatter_(1, idx_BK, acts_BK)
        return z_BF @ sae.W_dec_FD + sae.b_dec_D, acts_BK, idx_BK

    return forward


@torch.no_grad()
def reconstruction_stats(
    x_ND: torch.Tensor, forward: Forward, d_sae: int, batch: int = 4096
) -> dict[str, float]:
    """EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2 (mean per dimension over all tokens), MSE = sum ||x -
    x_hat||^2 / n, L0 = mean active latents per token, dead = share of latents that never fire; sums in float64."""
    sq_err = 0.0
    l0 = 0
    fired_F = torch.zeros(d_sae, dtype=torch.bool)
    for x_BD in x_ND.split(batch):
        x_hat_BD, acts_BK, idx_BK = forward(x_BD)
        sq_err += float((x_BD - x_hat_BD).double().pow(2).sum())
        active = acts_BK > 0
        l0 += int(active.sum())
        fired_F[idx_BK[active]] = True
    x = x_ND.double()
    total_var = float((x - x.mean(dim=0)).pow(2).sum())
    n = x_ND.shape[0]
    return {
        "explained_variance": 1 - sq_err / total_var,
        "mse": sq_err / n,
        "l0": l0 / n,
        "dead_fraction": 1 - float(fired_F.float().mean()),
        "n_eval_tokens": n,
    }


def self_test_metrics(x_ND: torch.Tensor) -> None:
    """Anchors of `reconstruction_stats`: the per-dimension mean scores EV 0 (variance about the mean, not about
    zero), a perfect reconstruction EV 1, and L0 / dead count what the forward reports."""
    mean_D, n_dead = x_ND.mean(dim=0), 5

    def predict_mean(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx_BK = torch.arange(n_dead, 10).expand(x_BD.shape[0], -1)
        return mean_D.expand_as(x_BD), torch.ones(idx_BK.shape), idx_BK

    def identity(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x_BD, *predict_mean(x_BD)[1:]

    at_mean = reconstruction_stats(x_ND, predict_mean, 10)
    assert abs(at_mean["explained_variance"]) < 1e-6, at_mean
    assert at_mean["l0"] == 10 - n_dead and at_mean["dead_fraction"] == n_dead / 10, at_mean
    assert reconstruction_stats(x_ND, identity, 10)["explained_variance"] == 1.0


def check_own_forward(sae: PlainSAE, x_ND: torch.Tensor, x_hat_own_ND: torch.Tensor, name: str) -> float:
    """The shared forward must reproduce the library's own reconstruction of the check rows."""
    x_hat_ND = plain_forward(sae)(x_ND)[0]
    rel = float(((x_hat_ND - x_hat_own_ND).norm(dim=1) / x_hat_own_ND.norm(dim=1)).max())
    if rel > 1e-3:
        raise AssertionError(
            f"{name}: the shared TopK forward differs from the library's own reconstruction by {rel:.2e} (relative, "
            "worst check row); the weight export of its script is wrong"
        )
    return rel


# --- trainers ------------------------------------------------------------------------------------------------------


class Trainer(NamedTuple):
    name: str
    python: Path
    script: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables set for this trainer only."""


def trainers(batchtopk: bool) -> list[Trainer]:
    peers = ROOT / ".venv-peers"
    out = [
        Trainer("saelab", ROOT / ".venv" / "bin" / "python", "saelab_train.py"),
        Trainer(
            "saelab, one thread after matmul",
            ROOT / ".venv" / "bin" / "python",
            "saelab_train.py",
            ("--variant", "one-after-matmul"),
        ),
        Trainer(
            "saelab, float32 selection",
            ROOT / ".venv" / "bin" / "python",
            "saelab_train.py",
            ("--variant", "float32-selection"),
        ),
        Trainer("SAELens", peers / "saelens" / "bin" / "python", "saelens_train.py"),
        Trainer(
            "SAELens, b_dec at median",
            peers / "saelens" / "bin" / "python",
            "saelens_train.py",
            ("--variant", "bdec-median"),
        ),
        Trainer("dictionary_learning", peers / "dictlearn" / "bin" / "python", "dictlearn_train.py"),
        Trainer("sparsify", peers / "sparsify" / "bin" / "python", "sparsify_train.py"),
        # What saelab's training loop does for itself (saelab/train/allocator.py), given to sparsify from outside:
        # glibc keeps freed blocks over 32 MiB in the heap instead of mapping fresh pages each step.
        Trainer(
            "sparsify, freed memory kept",
            peers / "sparsify" / "bin" / "python",
            "sparsify_train.py",
            env=(("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", str(1 << 30))),
        ),
    ]
    if batchtopk:
        out += [
            Trainer(f"{t.name} BatchTopK", t.python, t.script, ("--arch", "batchtopk"))
            for t in out
            if (t.script in ("saelab_train.py", "dictlearn_train.py") and not t.args)
            or t.args == ("--variant", "bdec-median")
        ]
    return out


def run_trainer(
    t: Trainer, acts: Acts, tokens: int, out: Path, saelab_src: Path, shape: tuple[str, ...]
) -> dict[str, Any]:
    """Run one trainer script in its environment (saelab imported from `saelab_src`) with the SAE's `shape` flags
    (`--expansion E --k K`, the same for every trainer); its result.json plus metrics from the shared function."""
    if not t.python.exists():
        raise SystemExit(f"{t.python} is missing: run `make peers` first")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "TQDM_DISABLE": "1",
        "SPARSIFY_DISABLE_TRITON": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(saelab_src),
        **dict(t.env),
    }
    cmd = [str(t.python), str(PEERS / t.script), "--acts", str(acts.path), "--tokens", str(tokens)]
    cmd += ["--out", str(out), *shape, *t.args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{t.name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    imported = result["recipe"].get("imported_from")
    if imported is not None and not imported.startswith(str(saelab_src)):
        raise SystemExit(f"{t.name} imported saelab from {imported}, not the snapshot {saelab_src}")
    sae, check_x, check_x_hat = PlainSAE.load(out / "sae.safetensors")
    result["check_max_rel_diff"] = check_own_forward(sae, check_x, check_x_hat, t.name)
    result.update(reconstruction_stats(acts.eval_ND, plain_forward(sae), sae.d_sae))
    result["process_seconds"] = time.perf_counter() - start
    return result


# --- the run -------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch_saelab_env": torch.__version__,
        "saelab_git": git,
    }


def snapshot_saelab() -> tuple[Path, str]:
    """Copy the saelab package as it is now to `CACHE/saelab-src/<hash>/saelab` and return (that parent folder, the
    hash). Trainers import saelab from it (PYTHONPATH), so one invocation trains with one version of the code even
    while the working tree changes, and the hash names that version."""
    src = CACHE / "saelab-src"
    tmp = src / f"tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ROOT / "saelab", tmp / "saelab", ignore=shutil.ignore_patterns("__pycache__"))
    h = hashlib.sha256()
    for path in sorted((tmp / "saelab").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes())
    digest = h.hexdigest()[:16]
    if (src / digest).exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(src / digest)
    return src / digest, digest


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median over repeats of each trainer's speed and metrics; speed ratio saelab / trainer from the medians."""
    keys = (
        "tokens_per_second",
        "train_seconds",
        "cpu_seconds",
        "explained_variance",
        "mse",
        "l0",
        "dead_fraction",
    )
    out = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    for name, s in out.items():
        arch = "BatchTopK" if name.endswith("BatchTopK") else ""
        ref = out.get(f"saelab {arch}".strip())
        s["saelab_speedup"] = ref["tokens_per_second"] / s["tokens_per_second"] if ref else None
    return out


def markdown(summary: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| trainer | tok/s (median) | saelab ÷ this | EV | L0 | dead | CPU s / wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        version = runs[name][0]["version"]
        ratio = f"{s['saelab_speedup']:.2f}×" if s["saelab_speedup"] else ""
        lines.append(
            f"| {name} ({version}) | {s['tokens_per_second']:,.0f} | {ratio} | {s['explained_variance']:.3f} "
            f"| {s['l0']:.1f} | {s['dead_fraction']:.3f} | {s['cpu_seconds'] / s['train_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=286_720, help="training tokens (70 batches of 4,096)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each trainer (the table reports medians)")
    p.add_argument(
        "--batchtopk", action="store_true", help="also BatchTopK (saelab, SAELens, dictionary_learning)"
    )
    p.add_argument("--only", nargs="*", help="run only trainers whose name starts with one of these")
    p.add_argument(
        "--skip", nargs="*", default=[], help="leave out trainers whose name starts with one of these"
    )
    p.add_argument(
        "--expansion",
        type=int,
        default=8,
        help="latents per input dimension, for every trainer (8: 4,608 latents)",
    )
    p.add_argument("--k", type=int, default=32, help="active latents per token, for every trainer")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer_training.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    spec = ActsSpec(n_train=args.tokens)
    acts = load_or_collect(spec)
    self_test_metrics(acts.eval_ND)
    todo = [
        t
        for t in trainers(args.batchtopk)
        if (not args.only or t.name.startswith(tuple(args.only))) and not t.name.startswith(tuple(args.skip))
    ]
    facts = machine()
    saelab_src, facts["saelab_sources_sha256"] = snapshot_saelab()
    load_before = os.getloadavg()
    shape = ("--expansion", str(args.expansion), "--k", str(args.k))
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in todo}
    for rep in range(args.repeats):
        for t in todo:
            out = CACHE / "runs" / f"{t.name.replace(' ', '_').replace(',', '')}-x{args.expansion}-{rep}"
            r = run_trainer(t, acts, args.tokens, out, saelab_src, shape)
            if (r["width"], r["k"]) != (acts.train_ND.shape[1] * args.expansion, args.k):
                raise SystemExit(f"{t.name} trained width {r['width']}, k {r['k']}: not the shape asked for")
            runs[t.name].append(r)
            print(
                f"[{rep}] {t.name}: {r['tokens_per_second']:,.0f} tok/s, EV {r['explained_variance']:.3f}, "
                f"L0 {r['l0']:.1f}, dead {r['dead_fraction']:.3f}, load {r['load_1min_before']:.2f}"
                f"->{r['load_1min_after']:.2f}",
                flush=True,
            )
    summary = summarise(runs)
    result = {
        "command": "python benchmarks/peer_training.py " + " ".join(sys.argv[1:]),
        "machine": {**facts, "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
        "settings": {
            "architecture": "topk",
            "width": acts.train_ND.shape[1] * args.expansion,
            "expansion": args.expansion,
            "k": args.k,
            "batch": 4096,
            "lr": 4e-4,
            "epochs": 1,
            "seed": 0,
            "threads": 2,
            "train_tokens": args.tokens,
            "repeats": args.repeats,
        },
        "activations": acts.meta,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(summary, runs))


if __name__ == "__main__":
    main()
