"""dictionary_learning side of the format parity tests (see peer_io.py for the job protocol).

load: the class named by config.json's `trainer.dict_class`, through its own `from_pretrained(ae.pt)`
(`AutoEncoder` with normalize_decoder=False, which keeps the stored latent scale), and again through the library's
folder loader `utils.load_dictionary` (AutoEncoder's default there rescales latents to unit decoder norms; the
reconstruction is the same). save kinds: the dict classes, each built by its trainer and saved as `trainSAE` saves
it (`ae.pt` = the state dict, `config.json` = {"trainer": trainer.config}); `GatedAutoEncoder` has no saelab
equivalent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.gdm import GatedSAETrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
from dictionary_learning.utils import load_dictionary
from peer_io import Job, randomise, run

CLASSES = {
    "AutoEncoder": AutoEncoder,
    "AutoEncoderTopK": AutoEncoderTopK,
    "BatchTopKSAE": BatchTopKSAE,
    "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE,
    "JumpReluAutoEncoder": JumpReluAutoEncoder,
}


def load(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    folder = Path(job["folder"])
    dict_class = json.loads((folder / "config.json").read_text())["trainer"]["dict_class"]
    cls = CLASSES[dict_class]
    if cls is AutoEncoder:
        ae = cls.from_pretrained(folder / "ae.pt", normalize_decoder=False)
    else:
        ae = cls.from_pretrained(folder / "ae.pt")
    latents = ae.encode(x)
    by_folder, _ = load_dictionary(str(folder), device="cpu")
    return {"latents": latents, "x_hat": ae.decode(latents), "x_hat_load_dictionary": by_folder(x)}


def save(job: Job, x: torch.Tensor, d_sae: int) -> dict[str, torch.Tensor]:
    kind, folder = job["kind"], Path(job["folder"])
    common = {
        "steps": 10_000,  # above the default warm-up steps, which the trainers check
        "activation_dim": x.shape[1],
        "dict_size": d_sae,
        "layer": 3,
        "lm_name": job["model"],
        "submodule_name": job["hookpoint"],
        "device": "cpu",
    }
    if kind == "AutoEncoder":
        trainer = StandardTrainerAprilUpdate(**common)
    elif kind == "AutoEncoderTopK":
        trainer = TopKTrainer(k=4, **common)
    elif kind == "BatchTopKSAE":
        trainer = BatchTopKTrainer(k=4, **common)
    elif kind == "MatryoshkaBatchTopKSAE":
        trainer = MatryoshkaBatchTopKTrainer(k=4, group_fractions=[0.25, 0.25, 0.5], **common)
    elif kind == "JumpReluAutoEncoder":
        trainer = JumpReluTrainer(**common)
    elif kind == "GatedAutoEncoder":
        trainer = GatedSAETrainer(**common)
    else:
        raise ValueError(f"unknown dictionary_learning kind {kind!r}")
    ae = trainer.ae
    randomise(dict(ae.named_parameters()), thresholds=("threshold",))
    if hasattr(ae, "k"):  # the k-sparse classes' learned inference threshold (a buffer)
        ae.threshold.fill_(1.5)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))
    latents = ae.encode(x)
    return {"latents": latents, "x_hat": ae.decode(latents)}


if __name__ == "__main__":
    run(load, save)
