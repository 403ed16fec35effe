"""sparsify's `SparseCoder` (TopK, sparse decoder) in a plain training loop on the shared tokens; run in
.venv-peers/sparsify with SPARSIFY_DISABLE_TRITON=1.

    .venv-peers/sparsify/bin/python benchmarks/peers/sparsify_train.py --acts ACTS --tokens N --out DIR

sparsify's own `Trainer` hooks a language model and cannot take an activation tensor, so this loop follows what its
`fvu` path does per step, with the optimizer set to Adam (its default is signum): b_dec = mean of the first batch;
decoder rows renormalised before each forward; loss = FVU + auxk_alpha * AuxK (auxk_alpha defaults to 0, so AuxK is
off) with FVU = sum ||x - x_hat||^2 / sum ||x - batch mean||^2; the gradient component parallel to decoder rows
removed; Adam step. The learning-rate schedule is the shared one (its Trainer's default warm-up is 1,000 steps,
longer than this run). No gradient clipping.
"""

from __future__ import annotations

from importlib.metadata import version

import common
import torch
from sparsify import SparseCoder, SparseCoderConfig


def main() -> None:
    args = common.parse_args(__doc__ or "")
    if args.arch != "topk":
        raise SystemExit("sparsify has no BatchTopK SAE")
    train_ND, check_ND = common.load_tokens(args)
    data = common.batches(train_ND, args.batch)
    d_in = train_ND.shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(expansion_factor=args.expansion, k=args.k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.lr_factor(s, len(data)))

    def step(i: int, x_BD: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x_BD.mean(dim=0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x_BD)
        loss = out.fvu + out.multi_topk_fvu / 8  # + auxk_alpha (0) * auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()

    common.warm_up(d_in, sae.num_latents, args.batch)
    timing = common.run_steps(step, data)
    with torch.no_grad():
        check_x_hat = sae(check_ND).sae_out
    weights = {
        "W_enc": sae.encoder.weight.T,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    recipe = {
        "schedule": "shared: warm-up 5%, linear decay to 0 over the last 20% (set in this loop)",
        "auxk": "off (auxk_alpha default 0)",
        "b_dec_init": "mean of the first batch",
        "input_scaling": "none (loss is FVU, normalised per batch)",
        "grad_clip": "none",
        "decoder": "sparse (gather of the k rows; eager, Triton off)",
    }
    common.write_result(
        args, weights, check_ND, check_x_hat, timing, "sparsify", version("eai-sparsify"), recipe
    )


if __name__ == "__main__":
    main()
