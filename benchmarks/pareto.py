"""Explained variance against L0 for saelab's five architectures, trained on the same tokens.

    TQDM_DISABLE=1 .venv/bin/python benchmarks/pareto.py [--quick] [--out benchmarks/results/pareto.json]

Uses the activations `benchmarks/peer_training.py` collects and caches (bundled SmolLM2-135M, middle layer, massive-
activation positions excluded, training and held-out tokens from disjoint documents). Every SAE has the same width
and sees the same training tokens once; sparsity is set per architecture: k for topk, batchtopk and matryoshka
(batchtopk and matryoshka reach it on average, and at inference through their learned threshold), the L1 coefficient
for relu, and for jumprelu the threshold's starting value (see GRID). The training recipe is the peer benchmark's
(batch 4,096, Adam lr 4e-4, one pass: 70 steps), so its TopK k=32 point is the saelab row of that table. Each SAE is then scored on the held-out tokens by the same
`reconstruction_stats` as the peer benchmark, through its own inference forward. Writes a JSON file and a PNG
(x = L0, log scale; y = EV). `--quick` is a smoke run (fewer tokens, a narrow SAE, two points per architecture)
that writes under benchmarks/.cache/ so it never replaces the real results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from peer_training import (
    CACHE,
    ROOT,
    ActsSpec,
    Forward,
    load_or_collect,
    machine,
    reconstruction_stats,
    snapshot_saelab,
)

if TYPE_CHECKING:
    from saelab.config import TrainConfig
    from saelab.sae.base import SAE


class Point(NamedTuple):
    architecture: str
    label: str
    """The sparsity setting, as shown beside the point."""
    overrides: dict[str, Any]
    """Settings as `train.variants` names them (`jumprelu.init_threshold`)."""


GRID: list[Point] = [
    *(Point("topk", f"k={k}", {"k": k}) for k in (16, 32, 64)),
    *(Point("batchtopk", f"k={k}", {"k": k}) for k in (16, 32, 64)),
    *(Point("matryoshka", f"k={k}", {"k": k}) for k in (16, 32, 64)),
    *(Point("relu", f"l1={c:g}", {"l1_coef": c}) for c in (1.0, 3.0, 10.0)),
    # In 70 steps at lr 4e-4 the threshold's log moves by at most ~0.03, so jumprelu's L0 is set by where the
    # threshold starts, not by l0_coef (0.03 and 0.3 gave the same L0 in a smoke run): the points vary the start.
    *(
        Point("jumprelu", f"θ0={t:g}", {"jumprelu.init_threshold": t, "l0_coef": 0.1})
        for t in (1.0, 1.3, 1.6)
    ),
]
QUICK_GRID = [p for p in GRID if p.label in ("k=16", "k=64", "l1=1", "l1=10", "θ0=1", "θ0=1.6")]
STYLE = {
    "topk": ("tab:blue", "o"),
    "batchtopk": ("tab:orange", "s"),
    "matryoshka": ("tab:green", "^"),
    "relu": ("tab:red", "D"),
    "jumprelu": ("tab:purple", "v"),
}


def saelab_forward(sae: SAE) -> Forward:
    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = sae(x_BD)
        return out.x_hat_BD, out.code.top_acts_BK, out.code.top_idx_BK

    return forward


def run_point(p: Point, base: TrainConfig, train_ND: torch.Tensor, eval_ND: torch.Tensor) -> dict[str, Any]:
    from saelab.train.trainer import train

    cfg = base.with_overrides(
        " ".join(f"{k}={v}" for k, v in {"architecture": p.architecture, **p.overrides}.items())
    )
    start = time.perf_counter()
    result = train(train_ND, cfg, seed=0)
    seconds = time.perf_counter() - start
    sae = result.sae.eval()
    with torch.no_grad():
        stats = reconstruction_stats(eval_ND, saelab_forward(sae), sae.cfg.d_sae)
    return {
        "architecture": p.architecture,
        "label": p.label,
        **p.overrides,
        **stats,
        "train_seconds": seconds,
        "steps": result.steps,
        "train_dead_fraction": result.dead_fraction,
        "load_1min_after": os.getloadavg()[0],
    }


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for arch, (colour, marker) in STYLE.items():
        pts = sorted((p for p in points if p["architecture"] == arch), key=lambda p: p["l0"])
        if not pts:
            continue
        xs, ys = [p["l0"] for p in pts], [p["explained_variance"] for p in pts]
        ax.plot(xs, ys, color=colour, marker=marker, label=arch, linewidth=1.5, markersize=7)
        for p in pts:
            ax.annotate(p["label"], (p["l0"], p["explained_variance"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7, color=colour)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per held-out token, log scale)")
    ax.set_ylabel("explained variance (held-out tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| architecture | setting | L0 | EV | MSE | dead | train s |", "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['architecture']} | {p['label']} | {p['l0']:.1f} | {p['explained_variance']:.3f} | "
            f"{p['mse']:.1f} | {p['dead_fraction']:.3f} | {p['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 40,960 tokens, width 1,152, 2 points each"
    )
    p.add_argument("--tokens", type=int, default=286_720)
    p.add_argument("--expansion", type=int, default=8, help="width = expansion * 576")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/pareto.json")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.expansion = 40_960, 2
    out = args.out or (CACHE / "pareto-quick.json" if args.quick else ROOT / "benchmarks/results/pareto.json")
    torch.set_num_threads(2)
    saelab_src, saelab_hash = snapshot_saelab()
    sys.path.insert(
        0, str(saelab_src)
    )  # one version of saelab for the whole run, whatever the working tree does
    from saelab.config import TrainConfig

    assert Path(sys.modules["saelab"].__file__ or "").is_relative_to(saelab_src)

    acts = load_or_collect(ActsSpec(n_train=args.tokens))
    base = TrainConfig(
        expansion=args.expansion, lr=args.lr, batch_size=args.batch, epochs=1, checkpoint_every=0
    )
    load_before = os.getloadavg()
    start = time.perf_counter()
    points = []
    for pt in QUICK_GRID if args.quick else GRID:
        points.append(run_point(pt, base, acts.train_ND, acts.eval_ND))
        r = points[-1]
        print(
            f"{r['architecture']} {r['label']}: L0 {r['l0']:.1f}, EV {r['explained_variance']:.3f}, "
            f"dead {r['dead_fraction']:.3f}, {r['train_seconds']:.0f} s",
            flush=True,
        )
    width = 576 * args.expansion
    result = {
        "command": "python benchmarks/pareto.py " + " ".join(sys.argv[1:]),
        "machine": {
            **machine(),
            "saelab_sources_sha256": saelab_hash,
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "settings": {
            "width": width,
            "train_tokens": args.tokens,
            "epochs": 1,
            "batch": args.batch,
            "lr": args.lr,
            "seed": 0,
            "threads": 2,
            "other": "TrainConfig defaults",
        },
        "wall_seconds": time.perf_counter() - start,
        "activations": acts.meta,
        "points": points,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    title = (
        f"saelab architectures, width {width}, {args.tokens:,} training tokens (one pass), "
        f"{acts.eval_ND.shape[0]:,} held-out tokens"
    )
    plot(points, out.with_suffix(".png"), title)
    print(markdown(points))


if __name__ == "__main__":
    main()
