"""saelab's own format: `cfg.json` + `sae.safetensors` (`saelab.sae.base.save` / `load`); it holds every
registered architecture."""

from __future__ import annotations

from saelab.sae import base as sae_lib
from saelab.sae.formats.common import Format, has_cfg_with

FORMAT = Format(
    "saelab",
    None,
    ("cfg.json", "sae.safetensors"),
    sae_lib.save,
    sae_lib.load,
    lambda f: has_cfg_with(f, "sae.safetensors", True),
)
