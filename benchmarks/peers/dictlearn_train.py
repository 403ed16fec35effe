"""dictionary_learning's `TopKTrainer` / `BatchTopKTrainer` on the shared tokens; run in .venv-peers/dictlearn.

    .venv-peers/dictlearn/bin/python benchmarks/peers/dictlearn_train.py --acts ACTS --tokens N --out DIR \
        [--arch topk|batchtopk]

The loop is the one `dictionary_learning.training.trainSAE` runs on CPU (`trainer.update(step, batch)` per batch;
its logging, saving and optional activation normalisation left out: normalisation is off by default). The trainer
keeps its own recipe: b_dec at the geometric median of the first batch (inside `update`, so timed), AuxK 1/32 with
dead latents after 10M tokens, gradient-norm clipping at 1. Changed from its defaults so that a 70-step run is
meaningful: `warmup_steps` (default 1000, longer than the run) and `decay_start` set to the shared schedule; for
BatchTopK, `threshold_start_step` (default 1000) set to the end of warm-up and `threshold_beta` 0.999 -> 0.9, so the
inference threshold is learned within the run.
"""

from __future__ import annotations

from importlib.metadata import version

import common
import torch
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.top_k import TopKTrainer


def main() -> None:
    args = common.parse_args(__doc__ or "")
    train_ND, check_ND = common.load_tokens(args)
    data = common.batches(train_ND, args.batch)
    d_in = train_ND.shape[1]
    d_sae = d_in * args.expansion
    warmup, decay_start = common.schedule_steps(len(data))
    extra = {"threshold_start_step": warmup, "threshold_beta": 0.9} if args.arch == "batchtopk" else {}
    trainer_cls = BatchTopKTrainer if args.arch == "batchtopk" else TopKTrainer
    trainer = trainer_cls(
        steps=len(data),
        activation_dim=d_in,
        dict_size=d_sae,
        k=args.k,
        layer=15,
        lm_name="SmolLM2-135M",
        lr=args.lr,
        warmup_steps=warmup,
        decay_start=decay_start,
        seed=args.seed,
        device="cpu",
        **extra,
    )
    common.warm_up(d_in, d_sae, args.batch)
    timing = common.run_steps(trainer.update, data)
    ae = trainer.ae.eval()
    weights = {
        "W_enc": ae.encoder.weight.T,
        "b_enc": ae.encoder.bias,
        "W_dec": ae.decoder.weight.T,
        "b_dec": ae.b_dec,
    }
    if args.arch == "batchtopk":
        weights["threshold"] = ae.threshold.expand(d_sae)
    with torch.no_grad():
        check_x_hat = ae(check_ND)  # BatchTopK: its inference threshold; TopK: per-token top-k
    recipe = {
        "schedule": f"warm-up {warmup} steps from lr 0, linear decay to 0 from step {decay_start}",
        "auxk": f"coef {trainer.auxk_alpha:.4g}, normalised, dead after {trainer.dead_feature_threshold} tokens",
        "b_dec_init": "geometric median of the first batch (in the timed loop)",
        "input_scaling": "none",
        "grad_clip": "norm 1.0",
        **({"threshold": "start at warm-up end, EMA beta 0.9 (default 1000 / 0.999)"} if extra else {}),
    }
    common.write_result(
        args,
        weights,
        check_ND,
        check_x_hat,
        timing,
        "dictionary_learning",
        version("dictionary_learning"),
        recipe,
    )


if __name__ == "__main__":
    main()
