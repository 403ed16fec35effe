"""SAEBench side of the SCR/TPP parity test (tests/test_scr_tpp_parity.py); run with .venv-peers/saebench's Python.

    .venv-peers/saebench/bin/python tests/peer_scripts/peer_saebench_scr.py SPEC.json

SPEC.json: {"sae_folder": the SAE in SAELens's format, "acts": a safetensors file of per-token activations
[N, L, D] at the hookpoint, masked positions zeroed (SAEBench's convention), keyed "{seed}/{scr|tpp}/{train|test}/
{class key}" with SAEBench's class keys, "seeds", "n_values", "n_check": the n whose ablated activations are kept,
"epochs", "artifacts": a scratch folder, "out": where the tensors go, "metrics": where the JSON goes}.

Per seed and eval, as `sae_bench.evals.scr_and_tpp.main.run_eval_single_sae` does: `random.seed` and
`torch.manual_seed(seed)`; the pooled activations by `create_meaned_model_activations`; SAEBench's probes by
`train_probe_on_activations` (its GPU-style torch probe, its settings) and their clean accuracies by
`get_probe_test_accuracy`; activations and probes written where `run_eval_single_dataset` looks for them, which then
runs SAEBench's own attribution and ablations; `get_scr_plotting_dict` / `create_tpp_plotting_dict` make the
metrics. This runs twice: with SAELens's SAE as loaded (`plain`), and with an encode that returns 0 on masked
(all-zero) positions (`masked`), which SAEBench's `ablated_precomputed_activations` assumes ("we must have already
zeroed out all masked tokens") but an SAE with biases does not do. For `masked` it also writes the probes' weights,
`get_all_node_effects_for_one_sae`'s effects and the pooled test activations ablated at n_check.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any

import sae_bench.evals.scr_and_tpp.main as scr_main
import sae_bench.evals.sparse_probing.probe_training as probe_training
import sae_bench.sae_bench_utils.activation_collection as activation_collection
import sae_bench.sae_bench_utils.dataset_info as dataset_info
import torch
from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
from sae_lens import SAE
from safetensors.torch import load_file, save_file

DATASET = "LabHC/bias_in_bios_class_set1"
COLUMN1 = ("professor", "nurse")


class MaskedEncode(torch.nn.Module):
    """SAELens's SAE with latents 0 on all-zero (masked) positions; decode and W_dec unchanged."""

    def __init__(self, sae: Any) -> None:
        super().__init__()
        self.sae = sae
        self.W_dec = sae.W_dec
        self.cfg = sae.cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x) * (x.abs().sum(-1, keepdim=True) != 0).to(x.dtype)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)


def one_eval(
    spec: dict[str, Any], acts: dict[str, torch.Tensor], sae: Any, seed: int, scr: bool
) -> dict[str, Any]:
    kind = "scr" if scr else "tpp"
    split = {s: {k.split("/", 3)[3]: v for k, v in acts.items() if k.startswith(f"{seed}/{kind}/{s}/")}
             for s in ("train", "test")}  # fmt: skip
    config = ScrAndTppEvalConfig(
        random_seed=seed, perform_scr=scr, n_values=spec["n_values"], probe_epochs=spec["epochs"],
        early_stopping_patience=spec["epochs"], model_name="saelab-parity", llm_dtype="float32", llm_batch_size=32,
    )  # fmt: skip
    random.seed(seed)
    torch.manual_seed(seed)
    chosen = list(dataset_info.PAIRED_CLASS_KEYS) if scr else dataset_info.chosen_classes_per_dataset[DATASET]
    train_BD = activation_collection.create_meaned_model_activations(split["train"])
    test_BD = activation_collection.create_meaned_model_activations(split["test"])
    torch.set_grad_enabled(True)
    probes, _ = probe_training.train_probe_on_activations(
        train_BD, test_BD, select_top_k=None, use_sklearn=False, batch_size=config.probe_train_batch_size,
        epochs=config.probe_epochs, lr=config.probe_lr, perform_scr=scr,
        early_stopping_patience=config.early_stopping_patience, l1_penalty=config.probe_l1_penalty,
    )  # fmt: skip
    torch.set_grad_enabled(False)
    clean = scr_main.get_probe_test_accuracy(probes, chosen, test_BD, config.probe_test_batch_size, scr)  # type: ignore[arg-type]
    folder = Path(spec["artifacts"]) / f"{kind}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{DATASET}_{COLUMN1[0]}_{COLUMN1[1]}" if scr else DATASET
    torch.save(
        {"train": split["train"], "test": split["test"]}, folder / f"{stem}_activations.pt".replace("/", "_")
    )
    with open(folder / f"{stem}_probes.pkl".replace("/", "_"), "wb") as f:
        pickle.dump({"llm_probes": probes, "llm_test_accuracies": clean}, f)
    out: dict[str, Any] = {"probes": probes, "train": split["train"], "test": split["test"], "chosen": chosen}
    for name, model in (("plain", sae), ("masked", MaskedEncode(sae))):
        raw, clean_accs = scr_main.run_eval_single_dataset(
            DATASET,
            config,
            model,
            None,
            0,
            "",
            "cpu",
            str(folder),
            False,
            COLUMN1 if scr else None,  # type: ignore[arg-type]
        )
        if scr:
            metrics = scr_main.get_scr_plotting_dict(raw, clean_accs)  # type: ignore[arg-type]
        else:
            metrics, _ = scr_main.create_tpp_plotting_dict(raw, clean_accs)  # type: ignore[arg-type]
        out[name] = {"metrics": metrics, "clean": clean_accs, "raw": raw}
    return out


def tensors_of(res: dict[str, Any], sae: Any, seed: int, kind: str, n_check: int) -> dict[str, torch.Tensor]:
    """Probe weights, SAEBench's attribution and the pooled test activations ablated at n_check (masked SAE)."""
    out: dict[str, torch.Tensor] = {}
    for key, probe in res["probes"].items():
        out[f"{seed}/{kind}/w/{key}"] = probe.net.weight.detach()[0]
        out[f"{seed}/{kind}/b/{key}"] = probe.net.bias.detach()
    masked = MaskedEncode(sae)
    effects = scr_main.get_all_node_effects_for_one_sae(
        masked,
        res["probes"],
        res["chosen"],
        kind == "scr",
        res["train"],
        125,  # type: ignore[arg-type]
    )
    for key, e in effects.items():
        out[f"{seed}/{kind}/effect/{key}"] = e
        chosen_F = scr_main.select_top_n_features(e, n_check, key)
        for test_key, acts_BLD in res["test"].items():
            ablated = scr_main.ablated_precomputed_activations(acts_BLD, masked, chosen_F, 125)  # type: ignore[arg-type]
            out[f"{seed}/{kind}/ablated/{key}/{test_key}"] = ablated
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    acts = load_file(spec["acts"])
    sae = SAE.load_from_disk(spec["sae_folder"], device="cpu")
    sae.eval()
    tensors: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    for seed in spec["seeds"]:
        for kind in ("scr", "tpp"):
            res = one_eval(spec, acts, sae, seed, kind == "scr")
            metrics[f"{seed}/{kind}"] = {name: {"metrics": res[name]["metrics"], "clean": res[name]["clean"]}
                                         for name in ("plain", "masked")}  # fmt: skip
            with torch.no_grad():
                tensors.update(tensors_of(res, sae, seed, kind, spec["n_check"]))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, spec["out"])
    Path(spec["metrics"]).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
