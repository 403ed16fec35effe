"""SCR and TPP of a demo-sized TopK SAE on the bundled model: the reseed noise of every headline number, and the
speed against the bare forwards the eval needs.

    .venv/bin/python benchmarks/scr_tpp.py [--n-train-tokens 40000] [--seeds 5] [--out benchmarks/results/scr_tpp.json]

Collects activations at the middle layer from the Wikipedia corpus, trains a TopK SAE with the train defaults
(the demo's SAE: 2,304 latents, k = 48), then runs `run_scr_tpp` on the bundled tasks once per seed (probe seed
and data subsample both change) and writes its JSON with wall times to --out. The speed ratio is the time of the
bare forwards alone (the same texts, the same batches, stopped at the hookpoint, no SAE, no probe) over the time
of the whole `run_scr_tpp` call, so 1.0 means SCR/TPP cost nothing beyond the forwards they need; each is timed
`--passes` times, alternating, and the faster of each kept (other jobs share this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from machine import machine_facts


def bare_forwards(lm, hookpoint: str, ids: list[list[int]], batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds for the forwards pooling runs, longest texts first, stopped at the hookpoint, nothing else."""
    from saelab.models.loading import capture, forward_until

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    order = np.argsort([-len(x) for x in ids], kind="stable")
    start = time.perf_counter()
    for s in range(0, len(ids), batch_size):
        batch = order[s : s + batch_size]
        tokens_BT = np.full((len(batch), len(ids[batch[0]])), pad, dtype=np.int64)
        for row, i in enumerate(batch):
            tokens_BT[row, : len(ids[i])] = ids[i]
        with torch.inference_mode(), capture(lm.model, [hookpoint]):
            forward_until(lm.model, torch.as_tensor(tokens_BT))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train-tokens", type=int, default=40_000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--tpp-n-train", type=int, default=128, help="TPP texts per class (the eval's default)")
    p.add_argument("--tpp-n-test", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/scr_tpp.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.eval.probing_features import tokenize
    from saelab.eval.scr_tpp import ScrTppSettings, _texts, build_data, run_scr_tpp
    from saelab.models.loading import BUNDLED_SMOLLM2, default_hookpoint, load_model
    from saelab.train.trainer import train

    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = default_hookpoint(lm.model)
    windows = build_windows(DataConfig(max_docs=2000), lm.tokenizer, 0)
    acts = collect(lm, windows, hookpoint, args.n_train_tokens, batch_size=16)
    sae = train(acts.acts_ND, TrainConfig(checkpoint_every=0), 0, hookpoint, lm.name).sae.eval()
    settings = ScrTppSettings(tpp_n_train=args.tpp_n_train, tpp_n_test=args.tpp_n_test)
    seeds = tuple(range(args.seeds))
    texts = list(dict.fromkeys(t for seed in seeds for t in _texts(*build_data(settings, seed))))
    ids = tokenize(lm.tokenizer, texts, settings.ctx_len)
    bare, whole = [], []
    result = None
    for _ in range(args.passes):
        bare.append(bare_forwards(lm, hookpoint, ids, settings.batch_size))
        start = time.perf_counter()
        result = run_scr_tpp(lm, sae, hookpoint, settings, seeds)
        whole.append(time.perf_counter() - start)
    assert result is not None
    out = {
        **result.to_json(),
        "benchmark": {
            "n_texts": len(ids),
            "n_tokens": int(sum(len(x) for x in ids)),
            "bare_forwards_s": round(min(bare), 2),
            "scr_tpp_s": round(min(whole), 2),
            "speed_ratio": round(min(bare) / min(whole), 3),
            "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k,
            "n_train_tokens": args.n_train_tokens,
            "tpp_n_train": args.tpp_n_train,
            "tpp_n_test": args.tpp_n_test,
            "machine": machine_facts(torch.get_num_threads(), load_before),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, s in result.noise.items():
        print(f"{name:18s} mean {s.mean:+.3f}  std {s.std:.3f}  95% CI [{s.ci_low:+.3f}, {s.ci_high:+.3f}]")
    print(json.dumps(out["benchmark"]))


if __name__ == "__main__":
    main()
