"""SAELens side of the evaluation parity test (tests/test_eval_parity.py); run with .venv-peers/saelens's Python.

    .venv-peers/saelens/bin/python tests/peer_scripts/peer_saelens_eval.py SPEC.json

SPEC.json: {"model_folder": a local HF folder (saelab's dequantised copy of the bundled model), "hookpoint": a module
name, "model_name": ..., "tokens": a safetensors file with int64 "train" and "eval" windows [n, T],
"ignore_tokens": [ids], "d_sae", "k", "lr", "train_batch", "train_steps", "train_exclude_first", "seed",
"eval_batch_prompts", "sae_folder", "metrics": where the JSON goes, "per_token": where the per-token tensors go}.

1. SAELens's own model loader (`load_model("AutoModelForCausalLM", folder)`, a `HookedProxyLM`) wraps the model;
   `run_with_cache` collects the hookpoint's activations on the training windows, leaving out positions holding an
   `ignore_tokens` id and the first `train_exclude_first` positions (activations up to ~100x the others there);
   SAELens's `SAETrainer` trains a `TopKTrainingSAE` on them; `save_inference_model` saves it. Trainer and SAE keep
   SAELens's defaults except: b_dec starts at the mean of the training activations (SAELens 6 has no b_dec
   initialisation, and from 0 a run this short learns little), and the learning rate is constant (`lr_end` must be
   set for the trainer to start).
2. The saved folder is read back with `SAE.load_from_disk` and evaluated by `sae_lens.evals.run_evals`, unmodified
   (it calls `get_downstream_reconstruction_metrics` -> `get_recons_loss` and `get_sparsity_and_variance_metrics`),
   with `exclude_special_tokens=ignore_tokens`. `FixedWindows` stands in for the ActivationsStore: it hands out the
   spec's evaluation windows in order, `eval_batch_prompts` at a time, and both passes must use every window.
   `get_recons_loss` is wrapped only to keep a copy of the per-token values it returns (CE [n, T-1], KL [n, T]),
   so the test can average them over other positions; what it returns to SAELens is untouched.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sae_lens.evals as sl_evals
import torch
from sae_lens import SAE, SAETrainer, TopKTrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.load_model import load_model
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from safetensors.torch import load_file, save_file


class FixedWindows:
    """The part of an ActivationsStore that `run_evals` uses, serving exactly the given windows in order."""

    def __init__(self, tokens: torch.Tensor, batch_prompts: int) -> None:
        self.tokens = tokens
        self.store_batch_size_prompts = batch_prompts
        self.context_size = tokens.shape[1]
        self.served = 0

    def get_batch_tokens(self, batch_size: int | None = None, **_: Any) -> torch.Tensor:
        n = batch_size or self.store_batch_size_prompts
        if self.served + n > len(self.tokens):
            raise RuntimeError(
                f"asked for windows {self.served}..{self.served + n}; the test gave {len(self.tokens)}"
            )
        batch = self.tokens[self.served : self.served + n]
        self.served += n
        return batch

    def reset_input_dataset(self) -> None:
        assert self.served == len(self.tokens), "the reconstruction pass left windows unused"
        self.served = 0


def keep_mask(tokens: torch.Tensor, ignore_tokens: list[int]) -> torch.Tensor:
    return ~torch.isin(tokens, torch.tensor(ignore_tokens))


@torch.no_grad()
def training_activations(model: Any, tokens: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    hook = spec["hookpoint"]
    stop = extract_stop_at_layer_from_tlens_hook_name(hook)  # as SAELens's evals call it
    rows = []
    for start in range(0, len(tokens), spec["eval_batch_prompts"]):
        batch = tokens[start : start + spec["eval_batch_prompts"]]
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=stop)
        keep = keep_mask(batch, spec["ignore_tokens"])
        keep[:, : spec["train_exclude_first"]] = False
        rows.append(cache[hook][keep])
    return torch.cat(rows).float()


def batches(x_ND: torch.Tensor, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled passes over the activations, without end (the trainer stops at total_training_samples)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x_ND), generator=g)
        for start in range(0, len(perm) - size + 1, size):
            yield x_ND[perm[start : start + size]]


def train(x_ND: torch.Tensor, spec: dict[str, Any]) -> TopKTrainingSAE:
    metadata = SAEMetadata(hook_name=spec["hookpoint"], model_name=spec["model_name"])
    cfg = TopKTrainingSAEConfig(
        d_in=x_ND.shape[1], d_sae=spec["d_sae"], k=spec["k"], device="cpu", metadata=metadata
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(x_ND.mean(dim=0))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=spec["train_steps"] * spec["train_batch"],
        train_batch_size_samples=spec["train_batch"],
        lr=spec["lr"],
        lr_end=spec["lr"],
        device="cpu",
    )
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(x_ND, spec["train_batch"], spec["seed"])).fit()
    return sae


def evaluate(sae: SAE, model: Any, tokens: torch.Tensor, spec: dict[str, Any]) -> dict[str, Any]:
    recorded: list[dict[str, torch.Tensor]] = []
    original = sl_evals.get_recons_loss

    def recording(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = original(*args, **kwargs)
        recorded.append({name: value.detach().clone() for name, value in out.items()})
        return out

    n_batches = len(tokens) // spec["eval_batch_prompts"]
    assert n_batches * spec["eval_batch_prompts"] == len(tokens)
    store = FixedWindows(tokens, spec["eval_batch_prompts"])
    config = sl_evals.get_eval_everything_config(
        batch_size_prompts=spec["eval_batch_prompts"],
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
    )
    sl_evals.get_recons_loss = recording
    try:
        metrics, feature_metrics = sl_evals.run_evals(
            sae,
            store,  # type: ignore[arg-type]
            model,
            ActivationScaler(),
            config,
            exclude_special_tokens=spec["ignore_tokens"],
        )
    finally:
        sl_evals.get_recons_loss = original
    assert store.served == len(tokens), "the sparsity pass left windows unused"
    per_token = {name: torch.cat([r[name] for r in recorded]).float().contiguous() for name in recorded[0]}
    save_file(per_token, spec["per_token"])
    flat = {name: value for group in metrics.values() for name, value in group.items()}
    flat["feature_density"] = feature_metrics["feature_density"]
    return flat


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "the peer must not reach a model hub"
    torch.manual_seed(spec["seed"])
    model = load_model(
        "AutoModelForCausalLM",
        spec["model_folder"],
        device="cpu",
        model_from_pretrained_kwargs={"dtype": torch.float32, "local_files_only": True},
        hook_names=[spec["hookpoint"]],
    )
    model.eval()
    tokens = load_file(spec["tokens"])
    sae = train(training_activations(model, tokens["train"], spec), spec)
    sae.save_inference_model(spec["sae_folder"])
    inference = SAE.load_from_disk(spec["sae_folder"], device="cpu").eval()
    metrics = evaluate(inference, model, tokens["eval"], spec)
    Path(spec["metrics"]).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
