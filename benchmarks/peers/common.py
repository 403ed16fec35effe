"""What every trainer script under benchmarks/peers/ shares: arguments, the training tokens, the timer, the output.

Each `<name>_train.py` runs in its library's own virtual environment (started by `benchmarks/peer_training.py`), so
this module imports nothing but torch and safetensors. A script builds its trainer, then `run_timed` times its loop,
then `write_result` saves plain weights that a shared TopK forward reads:

    pre = ReLU((x - b_dec) @ W_enc + b_enc),  z = the k largest of pre (or pre * (pre > threshold)),
    x_hat = z @ W_dec + b_dec

with W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], k, and an optional per-latent `threshold` [F]; any
normalisation or decoder-norm scaling is folded in by the script. Beside them go the check rows (held-out tokens)
and the library's own reconstruction of them, which the harness compares with the shared forward's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

N_CHECK_ROWS = 64


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--acts", type=Path, required=True, help="activation cache (tensors `train`, `eval`)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens: the first N rows of `train`")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--arch", choices=("topk", "batchtopk"), default="topk")
    p.add_argument("--variant", default="default", help="a script-specific recipe variant")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def stream_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every on-the-fly peer script (`*_stream.py`, started by `benchmarks/stream_speed.py`) takes;
    each adds its own hookpoint naming and schedule."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--windows", type=Path, required=True, help="token windows [n, ctx] (.npy)")
    p.add_argument(
        "--check", type=Path, required=True, help="safetensors with `x` [n, D]: held-out check rows"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the LM's dtype (the SAE is float32)")
    return p


def load_tokens(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens in the shared seeded order, check rows from the held-out tokens)."""
    with safe_open(str(args.acts), framework="pt") as f:
        train_ND = f.get_slice("train")[: args.tokens].contiguous()
        check_ND = f.get_slice("eval")[:N_CHECK_ROWS].contiguous()
    order = torch.randperm(train_ND.shape[0], generator=torch.Generator().manual_seed(args.seed))
    return train_ND[order], check_ND


def batches(train_ND: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """One pass in order; the rows after the last whole batch are dropped (as every trainer here does)."""
    n = train_ND.shape[0] // batch_size
    return list(train_ND[: n * batch_size].split(batch_size))


def lr_factor(step: int, total: int) -> float:
    """The shared schedule where a peer lets its loop set one: 5% linear warm-up, linear decay to 0 over the last
    20% of steps (saelab's; SAELens and dictionary_learning are given the same through their own options)."""
    warmup = max(1, int(0.05 * total))
    decay_start = int(0.8 * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def schedule_steps(total: int) -> tuple[int, int]:
    """(warm-up steps, first decay step) of `lr_factor`."""
    return max(1, int(0.05 * total)), int(0.8 * total)


def warm_up(d_in: int, d_sae: int, batch_size: int) -> None:
    """A few matmuls of the training shapes before the clock starts (thread pool and allocator warm-up)."""
    a, w = torch.randn(batch_size, d_in), torch.randn(d_in, d_sae)
    for _ in range(3):
        (a @ w).relu_().topk(8, dim=-1)


def run_timed(loop: Callable[[], Any], steps: int, tokens: int) -> tuple[Any, dict[str, float]]:
    """Run the training loop `loop()`; its result, and wall clock and this process's CPU time for the whole loop."""
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = loop()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return out, {
        "train_seconds": wall,
        "cpu_seconds": cpu,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_second": tokens / wall,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
    }


def run_steps(step: Callable[[int, torch.Tensor], Any], data: list[torch.Tensor]) -> dict[str, float]:
    """`run_timed` over a loop that calls `step(i, batch)` for every batch."""

    def loop() -> None:
        for i, x_BD in enumerate(data):
            step(i, x_BD)

    return run_timed(loop, len(data), sum(x.shape[0] for x in data))[1]


def write_result(
    args: argparse.Namespace,
    weights: dict[str, torch.Tensor],
    check_x_ND: torch.Tensor,
    check_x_hat_ND: torch.Tensor,
    timing: dict[str, float],
    library: str,
    version: str,
    recipe: dict[str, Any],
) -> None:
    """`sae.safetensors` (plain weights + check rows) and `result.json` in `args.out`."""
    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous() for name, t in weights.items()}
    tensors["k"] = torch.tensor(args.k)
    tensors["check_x"] = check_x_ND.contiguous()
    tensors["check_x_hat"] = check_x_hat_ND.detach().float().contiguous()
    save_file(tensors, str(args.out / "sae.safetensors"))
    result = {
        "library": library,
        "version": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "variant": args.variant,
        "width": weights["W_enc"].shape[1],
        "k": args.k,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "recipe": recipe,
        **timing,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
