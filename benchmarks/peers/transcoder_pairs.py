"""What the transcoder trainer scripts under benchmarks/peers/ share beside `common`: the paired training tokens.

The cache (written by `benchmarks/transcoder_peer.py`) holds `x_train` / `y_train` (the MLP's input and output at
the same positions) and `x_eval` / `y_eval` (held-out documents). Every trainer reads the first `--tokens` pairs
in one seeded order and writes its weights in the transcoder exchange format that the harness's one forward reads:

    pre = ReLU(x @ W_enc + b_enc),  z = the k largest of pre,  y_hat = z @ W_dec + b_dec (+ x @ W_skip)

with W_enc [D, F], b_enc [F], W_dec [F, O], b_dec [O], W_skip [D, O] (skip variant), any input centring folded into
b_enc; the check rows are x of the first held-out pairs and `check_x_hat` the library's own prediction of their y.
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open

N_CHECK_ROWS = 64


def load_pairs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [N, D], y [N, O] in the shared seeded order, check rows x [64, D] from the held-out pairs)."""
    with safe_open(str(args.acts), framework="pt") as f:
        x_ND = f.get_slice("x_train")[: args.tokens].contiguous()
        y_NO = f.get_slice("y_train")[: args.tokens].contiguous()
        check_ND = f.get_slice("x_eval")[:N_CHECK_ROWS].contiguous()
    order = torch.randperm(x_ND.shape[0], generator=torch.Generator().manual_seed(args.seed))
    return x_ND[order], y_NO[order], check_ND
