"""Job protocol shared by the peer scripts (run by tests/test_formats.py with each peer library's own Python).

    <peer venv>/bin/python tests/peer_scripts/peer_<peer>.py JOBS.json

JOBS.json: {"x": "x.safetensors", "d_sae": F, "hookpoint": ..., "model": ..., "jobs": [{"mode": "load" | "save",
"kind": ..., "folder": ..., "out": "out.safetensors", "seed": 0}, ...]}. `load` reads `folder` with the peer
library; `save` builds a peer SAE of `kind` with random weights (seeded), naming the hookpoint and model where the
peer has a place for them, and saves it into `folder` with the peer's own save method. Either way the job writes the peer's latents [B, F] and reconstruction [B, D] of x (and any extra
outputs) to `out`. All jobs run in one process because importing a peer library takes seconds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Job = dict[str, Any]
Handler = Callable[[Job, torch.Tensor, int], dict[str, torch.Tensor]]


def run(load: Handler, save: Handler) -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    x = load_file(spec["x"])["x"]
    handlers = {"load": load, "save": save}
    for job in spec["jobs"]:
        job = {"hookpoint": spec["hookpoint"], "model": spec["model"], **job}
        torch.manual_seed(job["seed"])
        with torch.no_grad():
            outputs = handlers[job["mode"]](job, x, spec["d_sae"])
        save_file({k: v.detach().float().contiguous() for k, v in outputs.items()}, job["out"])


def randomise(params: dict[str, torch.Tensor], thresholds: tuple[str, ...] = ()) -> None:
    """Gaussian weights and biases (so a convention that drops a bias or a decoder norm shows: the rows' norms
    vary) and thresholds in [0.5, 2.5], where they cut through the pre-activations of x ~ N(0, 4)."""
    for name, p in params.items():
        p.copy_(torch.rand_like(p) * 2 + 0.5 if name in thresholds else torch.randn_like(p) * 0.5)


def dense(top_acts: torch.Tensor, top_idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(top_acts.shape[0], d_sae, dtype=top_acts.dtype).scatter(1, top_idx, top_acts)
