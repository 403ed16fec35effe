"""A new architecture the documented way (README, "Extending saelab"): one class plus its registration, then the
real CLI stages collect -> train -> eval on a tiny real model, with `--train.architecture toy`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saelab.cli import main
from saelab.sae import base as sae_lib
from saelab.sae.base import SAE, SparseCode, register


class ToySAE(SAE):
    """Each token keeps its two largest ReLU'd pre-activations (a TopK with k fixed at 2), trained on the shared
    dense path: reconstruction plus AuxK, a unit-norm decoder."""

    architecture = "toy"

    def select(self, pre_BF: torch.Tensor) -> SparseCode:
        acts, idx = pre_BF.topk(2, dim=-1, sorted=False)
        return SparseCode(acts, idx)

    def train_latents(self, raw_BF: torch.Tensor) -> torch.Tensor:
        acts, idx = raw_BF.relu().topk(2, dim=-1, sorted=False)
        return torch.zeros_like(raw_BF).scatter(1, idx, acts)


@pytest.fixture
def toy() -> Iterator[type[ToySAE]]:
    """`register(ToySAE)` is the registration (as `@register` above the class would be); the other tests see only
    the built-in architectures, so it is undone afterwards."""
    register(ToySAE)
    yield ToySAE
    del sae_lib.REGISTRY[ToySAE.architecture]


COLLECT = ["--data.ctx-len", "32", "--collect.n-train-tokens", "1500", "--collect.batch-size", "8"]
TRAIN = ["--train.expansion", "4", "--train.batch-size", "128", "--train.epochs", "4"]
EVAL = ["--eval.n-windows", "8", "--eval.n-ce-windows", "4", "--eval.batch-size", "4"]


def test_a_registered_architecture_runs_through_the_cli(
    toy: type[ToySAE],
    tmp_path: Path,
    tiny_model_dir: Path,
    corpus_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert "--train.architecture {topk,batchtopk,matryoshka,relu,jumprelu,toy}" in capsys.readouterr().out
    run = tmp_path / "r"
    collect = ["collect", "--run-dir", str(run), "--model.name", str(tiny_model_dir), "--data.dataset"]
    assert main([*collect, str(corpus_file), *COLLECT]) == 0
    assert main(["train", "--run-dir", str(run), *TRAIN, "--train.architecture", "toy"]) == 0
    sae = sae_lib.load(run / "sae")
    assert isinstance(sae, ToySAE) and not sae.training
    assert json.loads((run / "sae" / "cfg.json").read_text())["architecture"] == "toy"
    assert main(["eval", "--run-dir", str(run), *EVAL]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["sae_config"]["architecture"] == "toy"
    assert 1 < metrics["l0"] <= 2 and metrics["explained_variance"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["train"]["architecture"] == "toy"
    # a process that has not registered it refuses the name, listing the ones it knows
    del sae_lib.REGISTRY["toy"]
    try:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--run-dir", str(run), "--train.architecture", "toy"])
        assert exc.value.code == 2
        assert "invalid choice 'toy'" in capsys.readouterr().err
    finally:
        register(ToySAE)
