"""saelab's trainer (`saelab.train.trainer.train_many` on a `PairedTensorSource`) as a TopK transcoder on the shared
MLP input/output pairs; run in saelab's own environment (.venv).

    .venv/bin/python benchmarks/peers/saelab_transcoder_train.py --acts ACTS --tokens N --out DIR [--variant skip]

`--variant skip` adds the skip path. Everything not named here is TrainConfig's default: AuxK 1/32 (normalised,
dead after 20,000 tokens), input and target scaled on their own and folded back, the input's centre subtracted by
the encoder (folded into b_enc on export), 5% warm-up and decay over the last 20%, no gradient clipping. The timed
call is the whole `train_many()`, its own setup included.
"""

from __future__ import annotations

from importlib.metadata import version

import common
import torch
import transcoder_pairs

import saelab
from saelab.activations.paired import PairedTensorSource
from saelab.config import TrainConfig
from saelab.sae.formats import weights_of
from saelab.train.trainer import train_many


def main() -> None:
    args = common.parse_args(__doc__ or "")
    x_ND, y_NO, check_ND = transcoder_pairs.load_pairs(args)
    cfg = TrainConfig(
        architecture="topk",
        expansion=args.expansion,
        k=args.k,
        lr=args.lr,
        batch_size=args.batch,
        epochs=1,
        checkpoint_every=0,
        target_hookpoint="out",
        skip=args.variant == "skip",
    )
    source = PairedTensorSource(x_ND, y_NO, hookpoints=["in", "out"])
    d_in = x_ND.shape[1]
    common.warm_up(d_in, d_in * args.expansion, args.batch)
    n_steps = x_ND.shape[0] // args.batch

    def loop() -> list:
        # train_many takes a paired source (its docstring); its annotation names single-tensor sources only
        return train_many(source, [cfg], args.seed, slots=[0], target_slots=[1])  # type: ignore[arg-type]

    results, timing = common.run_timed(loop, n_steps, n_steps * args.batch)
    sae = results[0].sae.eval()
    assert results[0].steps == n_steps, (results[0].steps, n_steps)
    w = weights_of(sae)  # the input centre folded into b_enc
    weights = {"W_enc": w.W_enc_DF, "b_enc": w.b_enc_F, "W_dec": w.W_dec_FD, "b_dec": w.b_dec_D}
    if w.W_skip_DO is not None:
        weights["W_skip"] = w.W_skip_DO
    with torch.no_grad():
        check_y_hat = sae(check_ND).x_hat_BD
    recipe = {
        "schedule": "warm-up 5%, linear decay to 0 over the last 20%",
        "auxk": f"coef {cfg.auxk_coef:.4g}, normalised by the residual's variance, dead after {cfg.dead_tokens} tokens",
        "init": "encoder subtracts the input's centre; b_dec from the target",
        "input_scaling": "input and target scaled on their own, folded back on return",
        "decoder": "unit-norm rows",
        "grad_clip": "none",
        "imported_from": saelab.__file__,
    }
    common.write_result(args, weights, check_ND, check_y_hat, timing, "saelab", version("saelab"), recipe)


if __name__ == "__main__":
    main()
