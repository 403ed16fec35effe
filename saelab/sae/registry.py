"""What names an SAE: its config (`SAEConfig`, saved as `cfg.json`) and the registry of architectures.

An architecture is a subclass of `saelab.sae.base.SAE` registered under its `architecture` name:

    @register
    class MySAE(SAE):
        architecture = "mine"
        ...

`saelab/sae/__init__.py` imports the built-in modules (`topk`, `relu`, `jumprelu`), so the registry holds every
built-in architecture whenever anything of `saelab.sae` is imported. This module imports no architecture: the
architecture modules import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from saelab.sae.base import SAE


class SAEError(ValueError):
    """An SAE checkpoint or input is unusable; the message says why and what to do."""


@dataclass(frozen=True)
class SAEConfig:
    """What is needed to rebuild an SAE; saved as `cfg.json` (with only the parameters its architecture takes)."""

    architecture: str
    d_in: int
    d_sae: int
    k: int = 0
    """Active latents per token (topk) or per token on average (batchtopk, matryoshka); unused (0) otherwise."""
    hookpoint: str = ""
    model: str = ""
    matryoshka_prefix_fractions: tuple[float, ...] = ()
    """matryoshka: nested prefix sizes as fractions of d_sae, increasing, the last 1.0."""
    jumprelu_bandwidth: float = 0.0
    """jumprelu: width epsilon of the rectangle kernel in the threshold's pseudo-derivative."""
    jumprelu_init_threshold: float = 0.0
    """jumprelu: threshold every latent starts from."""
    d_out: int = 0
    """Transcoder: width of the target it reconstructs (0 = an SAE, which reconstructs its input)."""
    target_hookpoint: str = ""
    """Transcoder: the module whose output it reconstructs from `hookpoint`'s (e.g. `model.layers.6.mlp` from
    `model.layers.6.post_attention_layernorm`)."""
    skip: bool = False
    """Transcoder: a learned linear skip path from input to output (Paulo, Shabalin & Belrose 2025)."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0 or self.d_out < 0:
            raise SAEError(
                f"d_in and d_sae must be > 0 and d_out >= 0, got {self.d_in}, {self.d_sae}, {self.d_out}"
            )
        if not self.is_transcoder and (self.skip or self.target_hookpoint):
            raise SAEError(
                "skip and target_hookpoint are transcoder settings: a transcoder's config needs d_out > 0 "
                f"(got skip={self.skip}, target_hookpoint={self.target_hookpoint!r}, d_out=0)"
            )
        architecture_class(self.architecture).check_config(self)

    @property
    def is_transcoder(self) -> bool:
        """Reconstructs another hookpoint's output (`d_out` > 0) rather than its own input."""
        return self.d_out > 0

    @property
    def out_width(self) -> int:
        """Width of what the decoder writes: d_out for a transcoder, d_in for an SAE."""
        return self.d_out or self.d_in

    def to_json(self) -> dict[str, Any]:
        """The common fields plus the parameters of this architecture only; a transcoder's fields only for a
        transcoder (an SAE's cfg.json, and so its hash, is as it was before transcoders)."""
        keep = {*COMMON_FIELDS, *REGISTRY[self.architecture].params}
        if self.is_transcoder:
            keep |= set(TRANSCODER_FIELDS)
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SAEConfig:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


COMMON_FIELDS = ("architecture", "d_in", "d_sae", "hookpoint", "model")
"""`SAEConfig` fields of every architecture; the others are parameters of some architectures (`SAE.params`)."""
TRANSCODER_FIELDS = ("d_out", "target_hookpoint", "skip")
"""`SAEConfig` fields of a transcoder, of any architecture (saved only for transcoders)."""
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
ARCH_PARAMS = tuple(name for name in DEFAULTS if name not in (*COMMON_FIELDS, *TRANSCODER_FIELDS))

REGISTRY: dict[str, type[SAE]] = {}
"""Architecture name -> SAE class; filled by `register`."""

_S = TypeVar("_S", bound="type[SAE]")


def register(cls: _S) -> _S:
    """Register an SAE class under its `architecture` name (a class decorator; returns the class)."""
    name = cls.architecture
    if not name:
        raise SAEError(f"{cls.__name__} has no `architecture` name to register under")
    if REGISTRY.get(name, cls) is not cls:
        raise SAEError(f"architecture {name!r} is already registered by {REGISTRY[name].__name__}")
    REGISTRY[name] = cls
    return cls


def architecture_class(name: str) -> type[SAE]:
    if name not in REGISTRY:
        raise SAEError(
            f"unknown SAE architecture {name!r}; known: {', '.join(REGISTRY)} (an architecture of your own must be "
            "registered, saelab.sae.registry.register, in the process that builds or loads it)"
        )
    return REGISTRY[name]


def architecture_names() -> tuple[str, ...]:
    """The registered architectures in registration order (the built-ins first)."""
    return tuple(REGISTRY)
