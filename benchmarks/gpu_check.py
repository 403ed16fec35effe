"""GPU check of on-the-fly training: a wide TopK SAE trained from the live LM, against sparsify and the matmul floor.

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]   # a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny                           # the code path, on CPU

On a CUDA device (default shape): the bundled SmolLM2-135M in bfloat16 at `layers.15`, a TopK SAE of 65,536 latents,
k 64, batch 4,096 tokens, float32 master weights, trained on the fly (`StreamSource` + `train()`, the code path of
`saelab train --collect.format stream`) over `--tokens` kept tokens, twice: with the default kernels (dense on a
GPU) and with `--train.kernels sparse` (whose TopK selection runs in bfloat16 where the GPU has it natively,
confirmed in float32). Beside them, in the same run:
- the floor: the time of the dense matmuls one step needs alone (encoder x W_enc and decoder z W_dec forward, and
  the three of their backward: grad z, grad W_dec, grad W_enc), on random float32 tensors of the step's shapes;
- sparsify's own `Trainer` (`benchmarks/peers/sparsify_stream.py` in `.venv-peers/sparsify`, the LM in bfloat16
  on the same GPU) on the same windows and SAE settings (`--no-sparsify` leaves it out).
Without CUDA it prints one line saying why and exits 0. `--tiny` shrinks everything (1,152 latents, k 8, batch 256,
2,048 tokens) so the logic runs in seconds; `tests/test_gpu_check.py` runs `measure()` on CPU with the test model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bundled:smollm2-135m-instruct"
FORWARD_WINDOWS = 16


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_floor(
    d_in: int, d_sae: int, batch: int, k: int, device: str, repeats: int = 5
) -> dict[str, float]:
    """Seconds per step of the encoder and decoder matmuls alone (median of `repeats`), float32: forward (2) and
    forward + backward (5), and the tokens/s each allows."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen).to(device)
    w_enc = torch.randn(d_in, d_sae, generator=gen).to(device)
    w_dec = torch.randn(d_sae, d_in, generator=gen).to(device)
    z = torch.zeros(batch, d_sae, device=device)
    z.scatter_(1, torch.randint(d_sae, (batch, k), generator=gen).to(device), 1.0)
    g = torch.randn(batch, d_in, generator=gen).to(device)
    times: dict[str, list[float]] = {"forward": [], "forward_backward": []}
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        pre = x @ w_enc
        out = z @ w_dec
        _sync(device)
        t1 = time.perf_counter()
        grad_z = g @ w_dec.T
        grad_w_dec = z.T @ g
        grad_w_enc = x.T @ grad_z
        _sync(device)
        t2 = time.perf_counter()
        del pre, out, grad_w_dec, grad_w_enc
        times["forward"].append(t1 - t0)
        times["forward_backward"].append(t2 - t0)
    res: dict[str, float] = {}
    for name, ts in times.items():
        sec = float(np.median(ts[1:]))
        res[f"{name}_seconds"] = sec
        res[f"{name}_tokens_per_second"] = batch / sec
    return res


def saelab_on_the_fly(
    model: str,
    dataset: str,
    device: str,
    dtype: str,
    d_sae: int,
    k: int,
    batch: int,
    tokens: int,
    ctx_len: int,
    kernels: str = "auto",
) -> dict[str, Any]:
    """Train a TopK SAE of `d_sae` latents on the fly with `kernels` (`TrainConfig.kernels`); trained tokens/s
    (model loading outside the clock)."""
    from saelab.activations.onthefly import StreamSource
    from saelab.config import DataConfig, TrainConfig
    from saelab.models.loading import hookpoint_width, load_model, resolve_hookpoint
    from saelab.train.trainer import train

    lm = load_model(model, dtype=dtype, device=device)
    hookpoint = resolve_hookpoint(lm.model, "layers.15" if model == MODEL else "auto")
    d_in = hookpoint_width(lm, hookpoint)
    if d_sae % d_in:
        raise SystemExit(f"--latents {d_sae} is not a multiple of the hookpoint's width {d_in}")
    data = DataConfig(dataset=dataset, ctx_len=ctx_len) if dataset else DataConfig(ctx_len=ctx_len)
    cfg = TrainConfig(
        architecture="topk",
        expansion=d_sae // d_in,
        k=k,
        batch_size=batch,
        epochs=1,
        checkpoint_every=0,
        kernels=kernels,  # type: ignore[arg-type]  # a Literal, checked by TrainConfig
    )
    _sync(device)
    t0 = time.perf_counter()
    source: Any = StreamSource(
        lm, data, 0, [hookpoint], tokens, batch, cfg.stream_buffer_rows, FORWARD_WINDOWS
    )
    result = train(source, cfg, 0, hookpoint=hookpoint)
    _sync(device)
    wall = time.perf_counter() - t0
    sae = result.sae
    return {
        "hookpoint": hookpoint,
        "kernels": kernels,
        "selection": result.selection,
        "rows_rechecked": result.rows_rechecked,
        "d_in": d_in,
        "d_sae": sae.cfg.d_sae,
        "steps": result.steps,
        "trained_tokens": result.steps * batch,
        "seconds": wall,
        "trained_tokens_per_second": result.steps * batch / wall,
        "sae_dtype": str(sae.W_enc_DF.dtype),
        "lm_dtype": str(next(lm.model.parameters()).dtype),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }


def sparsify_on_the_fly(device: str, d_sae: int, k: int, batch: int, tokens: int) -> dict[str, Any]:
    """sparsify's `Trainer` in its own environment on the windows saelab's stream reads (bundled model only)."""
    from saelab.config import DataConfig
    from saelab.data.stream import TrainStream
    from saelab.models.loading import _bundled_cache, load_tokenizer

    python = ROOT / ".venv-peers" / "sparsify" / "bin" / "python"
    if not python.exists():
        return {"skipped": f"{python} is missing: run `make peers`"}
    tok = load_tokenizer(MODEL)
    stream = TrainStream(DataConfig(), tok, 0)
    windows = stream.windows(-(-tokens // 126))  # about `tokens` kept rows (126 of 128 positions are kept)
    stream.close()
    bw = batch // 128
    n = (len(windows.tokens) // bw) * bw
    with tempfile.TemporaryDirectory() as tmp:
        w, check, out = Path(tmp) / "w.npy", Path(tmp) / "c.st", Path(tmp) / "out"
        np.save(w, windows.tokens[:n])
        from safetensors.torch import save_file

        save_file({"x": torch.randn(8, 576)}, str(check))
        cmd = [
            str(python), str(ROOT / "benchmarks" / "peers" / "sparsify_stream.py"),
            "--model-dir", str(_bundled_cache(MODEL)), "--windows", str(w), "--check", str(check),
            "--out", str(out), "--batch-windows", str(bw), "--expansion", str(d_sae // 576), "--k", str(k),
            "--device", device, "--dtype", "bfloat16" if device.startswith("cuda") else "float32",
        ]  # fmt: skip
        env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            return {"failed": proc.stderr[-2000:]}
        r: dict[str, Any] = json.loads((out / "result.json").read_text())
    r["trained_tokens_per_second"] = r["trained_tokens"] / r["train_seconds"]
    return r


def measure(
    model: str,
    dataset: str,
    device: str,
    d_sae: int,
    k: int,
    batch: int,
    tokens: int,
    ctx_len: int,
    peer: bool,
) -> dict[str, Any]:
    """The whole check: saelab on the fly with its default kernels (`saelab`: dense on a GPU) and with the sparse
    kernels and `auto` selection (`saelab_sparse`: the bfloat16 selection where native), the matmul floor, and
    (with `peer`) sparsify; ratios of their rates."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    load_before = os.getloadavg()
    saelab = saelab_on_the_fly(model, dataset, device, dtype, d_sae, k, batch, tokens, ctx_len)
    sparse = saelab_on_the_fly(model, dataset, device, dtype, d_sae, k, batch, tokens, ctx_len, "sparse")
    floor = matmul_floor(saelab["d_in"], d_sae, batch, k, device)
    out: dict[str, Any] = {"device": device, "saelab": saelab, "saelab_sparse": sparse, "matmul_floor": floor}
    for name in ("saelab", "saelab_sparse"):
        out[f"{name}_over_matmul_floor"] = (
            out[name]["trained_tokens_per_second"] / floor["forward_backward_tokens_per_second"]
        )
    if peer:
        sp = sparsify_on_the_fly(device, d_sae, k, batch, tokens)
        out["sparsify"] = sp
        if "trained_tokens_per_second" in sp:
            for name in ("saelab", "saelab_sparse"):
                out[f"{name}_over_sparsify"] = (
                    out[name]["trained_tokens_per_second"] / sp["trained_tokens_per_second"]
                )
    out["load_avg"] = {"before": load_before, "after": os.getloadavg()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="1,152 latents, k 8, batch 256, 2,048 tokens")
    p.add_argument("--latents", type=int, default=65_536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096 * 200)
    p.add_argument("--no-sparsify", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() False)"
        )
        return
    if args.tiny:
        args.latents, args.k, args.batch, args.tokens = 1152, 8, 256, 2048
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.latents % 576:
        raise SystemExit("--latents must be a multiple of 576 (the bundled model's width)")
    res = measure(
        MODEL, "", args.device, args.latents, args.k, args.batch, args.tokens, 128, not args.no_sparsify
    )
    res["command"] = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
