"""sparsify's own `Trainer` on the fly: it hooks the language model and runs the whole forward per step; run in
.venv-peers/sparsify with SPARSIFY_DISABLE_TRITON=1 (started by `benchmarks/stream_speed.py`).

    .venv-peers/sparsify/bin/python benchmarks/peers/sparsify_stream.py --model-dir DIR --windows W.npy \
        --check CHECK.safetensors --hookpoint layers.15 --out DIR

`--windows` holds the token windows [n, ctx] that saelab's stream trained on (the same documents, packed the same
way); they are shuffled by window with the seed (sparsify's loader does not shuffle, its docs ask the caller to) and
given to `Trainer` as its dataset, `--batch-windows` sequences per step. SAE: TopK, `--expansion` x d_in latents,
`--k`; Adam at `--lr` with sparsify's linear warm-up (`--warmup` steps) and decay; loss FVU; AuxK off (its
default). sparsify excludes tokens by id (`exclude_tokens`: the special tokens here), not by position, so the first
positions of every window (the massive activations) are in its training data. The timed call is `Trainer.fit()`.
Writes `sae.safetensors` in the exchange format of `benchmarks/peers/common.py` and `result.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from importlib.metadata import version

import common
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sparsify import SaeConfig, TrainConfig, Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = common.stream_parser(__doc__)
    p.add_argument("--hookpoint", default="layers.15", help="module name under model.base_model")
    p.add_argument("--batch-windows", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), local_files_only=True
    ).to(args.device)
    load_seconds = time.perf_counter() - t_load
    windows = np.load(args.windows)
    order = np.random.default_rng(args.seed).permutation(len(windows))
    dataset = [{"input_ids": torch.as_tensor(windows[i], dtype=torch.long)} for i in order]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            SaeConfig(expansion_factor=args.expansion, k=args.k),
            batch_size=args.batch_windows,
            optimizer="adam",
            lr=args.lr,
            lr_warmup_steps=args.warmup,
            exclude_tokens=sorted(set(tokenizer.all_special_ids)),
            hookpoints=[args.hookpoint],
            init_seeds=[args.seed],
            save_every=10**9,
            log_to_wandb=False,
            save_dir=tmp,
        )
        trainer = Trainer(cfg, dataset, model)  # type: ignore[arg-type]
        load_before = os.getloadavg()[0]
        cpu0, t0 = time.process_time(), time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    sae = trainer.saes[args.hookpoint]
    steps = len(dataset) // args.batch_windows
    used = np.stack([windows[i] for i in order[: steps * args.batch_windows]])
    trained = int((~np.isin(used, cfg.exclude_tokens)).sum())
    check_x = load_file(str(args.check))["x"]
    with torch.no_grad():
        check_x_hat = sae(check_x.to(args.device)).sae_out.cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.encoder.weight.T,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
        "check_x": check_x,
        "check_x_hat": check_x_hat,
    }
    out = {n: t.detach().float().cpu().contiguous() for n, t in tensors.items() if t is not None}
    save_file({**out, "k": torch.tensor(args.k)}, str(args.out / "sae.safetensors"))
    result = {
        "library": "sparsify",
        "version": version("eai-sparsify"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_load_seconds": load_seconds,
        "train_seconds": wall,
        "cpu_seconds": cpu,
        "steps": steps,
        "windows": steps * args.batch_windows,
        "model_tokens": steps * args.batch_windows * windows.shape[1],
        "trained_tokens": trained,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "recipe": {
            "trainer": "sparsify.Trainer.fit (hooks the model, whole forward per step, logits included)",
            "optimizer": f"adam lr {args.lr}, linear warm-up {args.warmup} steps then linear decay",
            "loss": "fvu",
            "auxk": "off (default auxk_alpha 0)",
            "excluded": "special token ids only (sparsify has no position exclusion)",
        },
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
