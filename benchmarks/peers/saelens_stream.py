"""SAELens's own on-the-fly runner: `LanguageModelSAETrainingRunner` generates activations from the language model
through its `ActivationsStore` and mixing buffer while it trains; run in .venv-peers/saelens (started by
`benchmarks/stream_speed.py`).

    .venv-peers/saelens/bin/python benchmarks/peers/saelens_stream.py --model-dir DIR --windows W.npy \
        --check CHECK.safetensors --hookpoint model.layers.15 --training-tokens N --out DIR

The model is the HF folder `--model-dir`, loaded here (local files only, outside the clock) and wrapped in SAELens's
`HookedProxyLM` (TransformerLens has no SmolLM2 config; SAELens hooks HF module paths such as `model.layers.15`) and
given to the runner as `override_model`. `--windows` holds the token windows [n, ctx] of saelab's stream (the same
documents, packed the same way), shuffled by window with the seed (the runner reads its dataset in order) and given
as `override_dataset`, a pre-tokenised `datasets.Dataset` with an `input_ids` column of context length. The runner
trains until `--training-tokens` activations have gone through the SAE, `--batch` per step (the store wraps to a
new epoch when it runs out of windows: that is made an error here, so give more windows than it needs).

SAE: TopK, `--expansion` x d_in latents, `--k`; Adam at `--lr`, `--warmup` warm-up steps and a linear decay over the
last `--decay` steps (`lr_end` is lr, where SAELens's constant scheduler starts its decay). Everything else is
SAELens's default:
- activations store: `store_batch_size_prompts` 32 windows per LM forward, stopped after the hooked layer
  (`stop_at_layer`); mixing buffer of `n_batches_in_buffer` (20) x context = 2,560 tokens, of which half
  (`activations_mixing_fraction` 0.5) stays behind to mix with the next forward's tokens, so batches are shuffled
  across about one forward; no prefetching thread; no autocast or compilation. SAELens 6.54.12 sizes that buffer
  without `store_batch_size_prompts` (its docs and `tokens_per_buffer` mean 20 x 32 x 128 = 81,920 tokens; SAELens
  pull request #692) and refuses a batch larger than the buffer, its own default of 4,096 included: for such a
  `--batch` `n_batches_in_buffer` is raised to the fewest context-length batches that hold one (recorded);
- no exclusion: `exclude_special_tokens` False and `seqpos_slice` (None,), so every position of every window is
  trained on, the first positions (the massive activations) and the `<|im_end|>` separators included;
- b_dec starts at zero (SAELens 6 has no data-dependent initialisation); decoder rows at norm 0.1; top-k on
  pre-activations scaled by decoder norms; AuxK coefficient 1 on latents dead for 1,000 steps (so never active in a
  short run); gradient-norm clipping at 1; no input normalisation;
- W&B off, no checkpoints, no output folder (the evaluator only runs when logging to W&B).
The timed call is `runner.run()`. The check rows' reconstruction is the trained SAE's own forward; the weights are
exported through SAELens's inference fold (`save_inference_model`). Writes `sae.safetensors` in the exchange format
of `benchmarks/peers/common.py` and `result.json`; `model_tokens` counts the windows the LM actually ran on (a
forward pre-hook counts them), which includes tokens the mixing buffer still held when training stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.load_model import HookedProxyLM
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def parse_args() -> argparse.Namespace:
    p = common.stream_parser(__doc__)
    p.add_argument("--hookpoint", default="model.layers.15", help="module path in the HF model")
    p.add_argument("--training-tokens", type=int, required=True, help="activations trained on")
    p.add_argument("--batch", type=int, default=1024, help="tokens per SAE step")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--decay", type=int, default=0, help="steps of linear decay to 0 at the end")
    p.add_argument(
        "--n-batches-in-buffer",
        type=int,
        help="SAELens's default (20), or enough for one batch where that is less",
    )
    return p.parse_args()


def buffer_batches(args: argparse.Namespace, context: int) -> int:
    """`n_batches_in_buffer`: the flag, else SAELens's default, raised where its mixing buffer (that many contexts
    in 6.54.12) would be smaller than one training batch, which it refuses."""
    if args.n_batches_in_buffer is not None:
        return int(args.n_batches_in_buffer)
    default = next(f.default for f in fields(LanguageModelSAERunnerConfig) if f.name == "n_batches_in_buffer")
    assert isinstance(default, int)
    return max(default, -(-args.batch // context))


def runner_config(args: argparse.Namespace, d_in: int, context: int) -> LanguageModelSAERunnerConfig[Any]:
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=args.expansion * d_in, k=args.k, dtype="float32", device=args.device
    )
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=str(args.model_dir),
        model_class_name="AutoModelForCausalLM",
        hook_name=args.hookpoint,
        context_size=context,
        n_batches_in_buffer=buffer_batches(args, context),
        training_tokens=args.training_tokens,
        train_batch_size_tokens=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_warm_up_steps=args.warmup,
        lr_decay_steps=args.decay,
        device=args.device,
        dtype="float32",
        seed=args.seed,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )


def load_lm(args: argparse.Namespace) -> tuple[PreTrainedModel, HookedProxyLM, float]:
    """(the HF model, SAELens's wrapper hooking only the hookpoint, seconds taken)."""
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), local_files_only=True
    ).to(args.device)
    model = HookedProxyLM(hf_model.eval(), tokenizer, hook_names=[args.hookpoint])
    return hf_model, model, time.perf_counter() - t0


def write_sae(sae: Any, args: argparse.Namespace) -> None:
    """`sae.safetensors`: SAELens's inference fold of the weights, the check rows and the trained SAE's own
    reconstruction of them."""
    check_x = load_file(str(args.check))["x"]
    sae.eval()
    with torch.no_grad():
        check_x_hat = sae(check_x.to(args.device)).cpu()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        state = load_file(str(Path(tmp) / "sae_weights.safetensors"))
        inference_cfg = json.loads((Path(tmp) / "cfg.json").read_text())
    # the exchange forward subtracts b_dec from the input and normalises nothing
    assert inference_cfg["apply_b_dec_to_input"] and inference_cfg["normalize_activations"] == "none"
    tensors = {n: state[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors |= {"check_x": check_x, "check_x_hat": check_x_hat}
    out = {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({**out, "k": torch.tensor(args.k)}, str(args.out / "sae.safetensors"))


def recipe(args: argparse.Namespace, runner: LanguageModelSAETrainingRunner) -> dict[str, Any]:
    cfg, store, sae_cfg = runner.cfg, runner.activations_store, runner.sae.cfg
    return {
        "trainer": "LanguageModelSAETrainingRunner.run (ActivationsStore + mixing buffer, LM stopped after the "
        "hooked layer)",
        "store_batch_size_prompts": store.store_batch_size_prompts,
        "n_batches_in_buffer": store.n_batches_in_buffer,
        "mixing_buffer_tokens": store.n_batches_in_buffer * store.training_context_size,
        "activations_mixing_fraction": store.activations_mixing_fraction,
        "prefetch_llm_batches": cfg.prefetch_llm_batches,
        "optimizer": f"adam lr {args.lr}, warm-up {args.warmup} steps, linear decay to 0 over the last "
        f"{args.decay} steps",
        "auxk": f"coef {sae_cfg.aux_loss_coefficient:.4g}, dead after {cfg.dead_feature_window} steps",
        "b_dec_init": "zeros",
        "decoder_init_norm": sae_cfg.decoder_init_norm,
        "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm,
        "grad_clip": "norm 1.0",
        "input_scaling": sae_cfg.normalize_activations,
        "excluded": "nothing (exclude_special_tokens False, seqpos_slice (None,): every position trained on)",
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Running out of windows would silently reuse them (a new epoch): fail instead.
    warnings.filterwarnings("error", message="All samples in the training dataset have been exhausted")
    hf_model, model, load_seconds = load_lm(args)
    windows = np.load(args.windows)
    order = np.random.default_rng(args.seed).permutation(len(windows))
    dataset = Dataset.from_dict({"input_ids": windows[order].astype(np.int64)})
    cfg = runner_config(args, hf_model.config.hidden_size, windows.shape[1])
    assert cfg.exclude_special_tokens is False and cfg.seqpos_slice == (None,)  # what the recipe says
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    forwarded: list[int] = []  # windows per LM forward, counted as they go in
    hf_model.register_forward_pre_hook(lambda _m, inputs: forwarded.append(int(inputs[0].shape[0])))
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    sae = runner.run()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    write_sae(sae, args)
    steps = -(-args.training_tokens // args.batch)  # the trainer steps until it has seen training_tokens
    result = {
        "library": "sae_lens",
        "version": version("sae-lens"),
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "model_load_seconds": load_seconds,
        "train_seconds": wall,
        "cpu_seconds": cpu,
        "steps": steps,
        "lm_forwards": len(forwarded),
        "windows": sum(forwarded),
        "windows_given": len(windows),
        "model_tokens": sum(forwarded) * windows.shape[1],
        "trained_tokens": steps * args.batch,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "settings": {
            "hook_name": cfg.hook_name,
            "context_size": cfg.context_size,
            "d_sae": cfg.sae.d_sae,
            "k": args.k,
            "train_batch_size_tokens": cfg.train_batch_size_tokens,
            "training_tokens": cfg.training_tokens,
            "lr": args.lr,
            "seed": args.seed,
        },
        "recipe": recipe(args, runner),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
