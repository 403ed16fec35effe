"""saelab's trainer (`saelab.train.trainer.train`) on the shared tokens; run in saelab's own environment (.venv).

    .venv/bin/python benchmarks/peers/saelab_train.py --acts ACTS --tokens N --out DIR [--arch topk|batchtopk]

Everything not named here is TrainConfig's default: AuxK 1/32 (normalised, dead after 20,000 tokens), inputs scaled
to E||x||^2 = d_in, b_dec at the geometric median, 5% warm-up and decay over the last 20%, no gradient clipping. The
timed call is the whole `train()`, its own setup (input scale, geometric median) included.
"""

from __future__ import annotations

from importlib.metadata import version

import common
import torch

import saelab
from saelab.config import TrainConfig
from saelab.train.trainer import train


def main() -> None:
    args = common.parse_args(__doc__ or "")
    train_ND, check_ND = common.load_tokens(args)
    cfg = TrainConfig(
        architecture=args.arch,
        expansion=args.expansion,
        k=args.k,
        lr=args.lr,
        batch_size=args.batch,
        epochs=1,
        checkpoint_every=0,
        # --variant one-after-matmul: the CPU step's work after its selection matmul on one thread
        cpu_step_threads="one-after-matmul" if args.variant == "one-after-matmul" else "all",
        # --variant float32-selection: the entries chosen from the float32 matmul (the default is `auto`)
        selection_matmul="float32" if args.variant == "float32-selection" else "auto",
    )
    d_in = train_ND.shape[1]
    common.warm_up(d_in, d_in * args.expansion, args.batch)
    n_steps = train_ND.shape[0] // args.batch
    result, timing = common.run_timed(lambda: train(train_ND, cfg, args.seed), n_steps, n_steps * args.batch)
    sae = result.sae.eval()
    assert result.steps == n_steps, (result.steps, n_steps)
    weights = {"W_enc": sae.W_enc_DF, "b_enc": sae.b_enc_F, "W_dec": sae.W_dec_FD, "b_dec": sae.b_dec_D}
    if args.arch == "batchtopk":
        weights["threshold"] = sae.threshold.expand(sae.cfg.d_sae)
    with torch.no_grad():
        check_x_hat = sae(check_ND).x_hat_BD
    recipe = {
        "schedule": "warm-up 5%, linear decay to 0 over the last 20%",
        "auxk": f"coef {cfg.auxk_coef:.4g}, normalised by the residual's variance, dead after {cfg.dead_tokens} tokens",
        "b_dec_init": "geometric median of 8,192 rows",
        "input_scaling": "E||x||^2 = d_in, folded back on return",
        "grad_clip": "none",
        "imported_from": saelab.__file__,
    }
    common.write_result(args, weights, check_ND, check_x_hat, timing, "saelab", version("saelab"), recipe)


if __name__ == "__main__":
    main()
