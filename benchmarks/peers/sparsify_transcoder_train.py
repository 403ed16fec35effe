"""sparsify's `SparseCoder` as a transcoder (`transcode=True`, TopK, sparse decoder) in a plain training loop on the
shared MLP input/output pairs; run in .venv-peers/sparsify with SPARSIFY_DISABLE_TRITON=1.

    .venv-peers/sparsify/bin/python benchmarks/peers/sparsify_transcoder_train.py --acts ACTS --tokens N --out DIR \
        [--variant skip]

sparsify's own `Trainer` hooks a language model and cannot take activation tensors, so this loop does what its
transcoder path does per step (sparsify 1.3.3 `Trainer.fit`), with the optimizer set to Adam (its default is
signum) and the shared learning-rate schedule: on the first batch the encoder bias is set to -mean(x) W_enc^T (the
pre-activations centred) and b_dec to mean(y); W_dec starts at zero; the decoder is neither renormalised nor has
its parallel gradient removed (sparsify skips both for transcoders); loss = FVU of y + auxk_alpha (0) * AuxK.
`--variant skip` sets `skip_connection=True` (W_skip starts at zero). k stays fixed (as in the SAE loop).
"""

from __future__ import annotations

from importlib.metadata import version

import common
import torch
import transcoder_pairs
from sparsify import SparseCoder, SparseCoderConfig


def main() -> None:
    args = common.parse_args(__doc__ or "")
    x_ND, y_NO, check_ND = transcoder_pairs.load_pairs(args)
    n = x_ND.shape[0] // args.batch
    pairs = list(zip(x_ND[: n * args.batch].split(args.batch), y_NO[: n * args.batch].split(args.batch)))
    d_in = x_ND.shape[1]
    cfg = SparseCoderConfig(
        expansion_factor=args.expansion, k=args.k, transcode=True, skip_connection=args.variant == "skip"
    )
    sae = SparseCoder(d_in, cfg, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.lr_factor(s, len(pairs)))

    def loop() -> None:
        for i, (x_BD, y_BO) in enumerate(pairs):
            if i == 0:
                sae.encoder.bias.data = -x_BD.mean(dim=0) @ sae.encoder.weight.data.T
                sae.b_dec.data = y_BO.mean(dim=0)
            out = sae(x_BD, y_BO)
            loss = out.fvu + out.multi_topk_fvu / 8  # + auxk_alpha (0) * auxk_loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    common.warm_up(d_in, sae.num_latents, args.batch)
    timing = common.run_timed(loop, len(pairs), len(pairs) * args.batch)[1]
    with torch.no_grad():
        check_y_hat = sae(check_ND).sae_out
    weights = {
        "W_enc": sae.encoder.weight.T,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    if sae.W_skip is not None:
        weights["W_skip"] = sae.W_skip.T
    recipe = {
        "schedule": "shared: warm-up 5%, linear decay to 0 over the last 20% (set in this loop)",
        "auxk": "off (auxk_alpha default 0)",
        "init": "encoder bias -mean(x) W_enc^T and b_dec = mean(y) on the first batch; W_dec zero",
        "input_scaling": "none (loss is FVU, normalised per batch)",
        "decoder": "unconstrained (sparsify does not renormalise a transcoder's); sparse (gather), Triton off",
        "grad_clip": "none",
    }
    common.write_result(
        args, weights, check_ND, check_y_hat, timing, "sparsify", version("eai-sparsify"), recipe
    )


if __name__ == "__main__":
    main()
