"""SAELens's `SAETrainer` with its TopK (or BatchTopK) training SAE on the shared tokens; run in .venv-peers/saelens.

    .venv-peers/saelens/bin/python benchmarks/peers/saelens_train.py --acts ACTS --tokens N --out DIR \
        [--arch topk|batchtopk] [--variant default|bdec-median]

`SAETrainer.fit()` is timed as a whole, fed by an iterator over the batches in memory. The SAE and trainer keep their
defaults (decoder rows start at norm 0.1, top-k on pre-activations scaled by decoder norms, AuxK coefficient 1 with
dead latents after 1,000 steps, gradient-norm clipping at 1, no input normalisation, b_dec starting at 0) except the
learning-rate schedule: 5% warm-up and linear decay to 0 over the last 20% (`lr_warm_up_steps`, `lr_decay_steps`;
`lr_end` must be set for the trainer to start, and with the constant scheduler the decay starts from it, so it is lr).
SAELens 6 has no b_dec initialisation of its own; variant `bdec-median` sets b_dec to the geometric median of the first
batch by hand before training (inside the timed region, as dictionary_learning and saelab do it inside theirs).
Weights are exported through SAELens's own inference fold (`save_inference_model`), and the check rows are
reconstructed by the inference SAE that `SAE.load_from_disk` reads back from it.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path

import common
import torch
from sae_lens import SAE, BatchTopKTrainingSAE, SAETrainer, TopKTrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from safetensors.torch import load_file


def weiszfeld_median(x_ND: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Geometric median by Weiszfeld's iteration (what the other trainers start b_dec from)."""
    med = x_ND.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x_ND - med).norm(dim=1).clamp_min(1e-6)
        med = (w[:, None] * x_ND).sum(dim=0) / w.sum()
    return med


def main() -> None:
    args = common.parse_args(__doc__ or "")
    train_ND, check_ND = common.load_tokens(args)
    data = common.batches(train_ND, args.batch)
    d_in = train_ND.shape[1]
    d_sae = d_in * args.expansion
    if args.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, device="cpu"))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, device="cpu"))
    warmup, decay_start = common.schedule_steps(len(data))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=len(data) * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_warm_up_steps=warmup,
        lr_decay_steps=len(data) - decay_start,
        device="cpu",
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(data))

    def fit() -> None:
        if args.variant == "bdec-median":
            with torch.no_grad():
                sae.b_dec.copy_(weiszfeld_median(data[0]))
        trainer.fit()

    common.warm_up(d_in, d_sae, args.batch)
    _, timing = common.run_timed(fit, len(data), len(data) * args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        state = load_file(str(Path(tmp) / "sae_weights.safetensors"))
        inference = SAE.load_from_disk(tmp, device="cpu")
        with torch.no_grad():
            check_x_hat = inference(check_ND)
    assert inference.cfg.apply_b_dec_to_input and inference.cfg.normalize_activations == "none"
    weights = {
        "W_enc": state["W_enc"],
        "b_enc": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    if "threshold" in state:
        weights["threshold"] = state["threshold"]
    recipe = {
        "schedule": f"warm-up {warmup} steps, linear decay to 0 over the last {len(data) - decay_start} steps",
        "auxk": f"coef {sae.cfg.aux_loss_coefficient:.4g}, not normalised, dead after "
        f"{trainer_cfg.dead_feature_window} steps",
        "b_dec_init": "geometric median of the first batch (by hand)"
        if args.variant == "bdec-median"
        else "zeros",
        "input_scaling": "none",
        "grad_clip": "norm 1.0",
        "decoder_init_norm": sae.cfg.decoder_init_norm,
        "rescale_acts_by_decoder_norm": sae.cfg.rescale_acts_by_decoder_norm,
    }
    common.write_result(args, weights, check_ND, check_x_hat, timing, "sae_lens", version("sae-lens"), recipe)


if __name__ == "__main__":
    main()
