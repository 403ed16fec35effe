"""SAE checkpoint formats, saelab's own and other libraries': read and write saelab, SAELens, sparsify and
dictionary_learning folders.

    export_sae(sae, "out/sl", "saelens")          # a folder SAELens's `SAE.load_from_disk` reads
    sae = import_sae("path/to/folder")            # the format is found from the files present
    saelab convert --src runs/demo/sae --dst out/sl --to saelens

Every peer's SAE is our affine encoder/decoder (`saelab.sae.base`) under other conventions; each is mapped exactly,
so the imported or exported SAE gives the same latents and reconstructions as the original (tests/test_formats.py
checks this against the peer libraries themselves). One module per format (`native`, `saelens`, `sparsify`,
`dictionary_learning`, `circuit_tracer`), each defining its `FORMAT`, registered in `FORMATS` below. A format
declares the architectures it can hold (`Format.holds`; saelab's own holds every registered one): exporting or
importing any other is an SAEError that names the architecture, the format and the formats that can hold it.
Transcoders too: sparsify holds TopK ones (plain and skip) as wide as their input, SAELens ReLU and JumpReLU ones
(and batchtopk / matryoshka as JumpReLU), circuit-tracer's per-layer files the same kinds as wide as their input
(and no SAEs), dictionary_learning none; `Format.refuse` says why a format cannot hold a
config whose architecture it has (tests/test_transcoder_formats.py checks the peers' own code on both sides).

Training-only hyperparameters a format has no place for (JumpReLU's kernel bandwidth and initial threshold) take
the peer's defaults on import; inference never reads them. Imports are float32 on CPU, in eval mode.
"""

from __future__ import annotations

from pathlib import Path

from saelab.sae.base import SAE, SAEConfig, SAEError
from saelab.sae.formats import circuit_tracer, dictionary_learning, native, saelens, sparsify
from saelab.sae.formats.common import Format, Weights, assemble, weights_of

__all__ = [
    "FORMATS",
    "Format",
    "Weights",
    "assemble",
    "check_holds",
    "check_holds_config",
    "convert",
    "detect_format",
    "export_sae",
    "formats_in",
    "get_format",
    "holders",
    "holders_of",
    "import_sae",
    "weights_of",
]

FORMATS: dict[str, Format] = {
    spec.name: spec
    for spec in (
        native.FORMAT,
        saelens.FORMAT,
        sparsify.FORMAT,
        dictionary_learning.FORMAT,
        circuit_tracer.FORMAT,
    )
}
"""Format name -> Format; a new format is a module here and its `FORMAT` in this line."""


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise SAEError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def formats_in(folder: Path) -> list[str]:
    """Names of the formats whose checkpoint files `folder` holds (none for a missing folder)."""
    if not folder.is_dir():
        return []
    return [name for name, spec in FORMATS.items() if spec.recognise(folder)]


def detect_format(folder: Path | str) -> str:
    """The one format whose files `folder` holds; none or several is an SAEError that says what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"{folder} is not a folder; point to the folder that holds the SAE's files")
    found = formats_in(folder)
    if len(found) > 1:
        raise SAEError(
            f"{folder} holds checkpoints of several formats ({', '.join(found)}); say which to read"
        )
    if not found:
        expected = "; ".join(f"{name}: {' + '.join(spec.files)}" for name, spec in FORMATS.items())
        raise SAEError(f"{folder} holds no SAE checkpoint of a known format ({expected})")
    return found[0]


def holders(architecture: str) -> list[str]:
    """The formats that can hold an SAE of `architecture`."""
    return [name for name, spec in FORMATS.items() if architecture in spec.architectures]


def check_holds(spec: Format, architecture: str, cfg: SAEConfig | None = None) -> None:
    """Refuse, in one line, an SAE of an architecture the format cannot hold (naming the formats that can hold
    `cfg`, where given: one that holds the architecture may still refuse its shape)."""
    if architecture not in spec.architectures:
        can = holders(architecture) if cfg is None else holders_of(cfg)
        raise SAEError(
            f"the {spec.name} format cannot hold a {architecture} SAE (it holds {', '.join(spec.architectures)}); "
            f"formats that can: {', '.join(can) or 'none'}"
        )


def holders_of(cfg: SAEConfig) -> list[str]:
    """The formats that can hold an SAE of `cfg` (its architecture, and for a transcoder its shape)."""
    return [name for name in holders(cfg.architecture) if FORMATS[name].refuse(cfg) is None]


def check_holds_config(spec: Format, cfg: SAEConfig) -> None:
    """Refuse, in one line, a transcoder the format has no layout for (or an SAE of a shape it lacks)."""
    why = spec.refuse(cfg)
    if why is not None:
        what = f"a {cfg.architecture} SAE"
        if cfg.is_transcoder:
            skip = ", skip" if cfg.skip else ""
            what = f"this {cfg.architecture} transcoder ({cfg.hookpoint} -> {cfg.target_hookpoint}{skip})"
        raise SAEError(
            f"the {spec.name} format cannot hold {what}: {why}; formats that can: {', '.join(holders_of(cfg))}"
        )


def export_sae(sae: SAE, folder: Path | str, fmt: str) -> None:
    """Write `sae` into `folder` in format `fmt`. A format that cannot hold its architecture, or a folder that
    already holds another format's checkpoint, is an SAEError."""
    spec, folder = get_format(fmt), Path(folder)
    check_holds(spec, sae.architecture, sae.cfg)
    check_holds_config(spec, sae.cfg)
    others = [name for name in formats_in(folder) if name != fmt]
    if others:
        raise SAEError(
            f"{folder} already holds a {others[0]} checkpoint; write the {fmt} copy to another folder"
        )
    spec.write(sae, folder)


def import_sae(folder: Path | str, fmt: str | None = None) -> SAE:
    """Read the SAE in `folder` (format `fmt`, or the one its files show) as a float32 saelab SAE in eval mode."""
    folder = Path(folder)
    name = fmt or detect_format(folder)
    spec = get_format(name)
    missing = [f for f in spec.files if not (folder / f).exists()]
    if missing:
        raise SAEError(f"{folder} is not a {name} checkpoint: {', '.join(missing)} missing")
    try:
        sae = spec.read(folder)
    except SAEError as err:
        raise SAEError(f"{name} checkpoint in {folder}: {err}") from err
    except Exception as err:  # a field of the wrong type or a truncated file: name the file, keep the cause
        raise SAEError(f"{name} checkpoint in {folder} is unreadable ({type(err).__name__}: {err})") from err
    check_holds(spec, sae.architecture)
    return sae


def convert(src: Path | str, dst: Path | str, to: str, src_fmt: str | None = None) -> str:
    """Read the SAE in `src` and write it to `dst` in format `to`; returns the format it was read from."""
    if Path(src).resolve() == Path(dst).resolve():
        raise SAEError(
            f"source and destination are the same folder ({src}); write the copy to another folder"
        )
    name = src_fmt or detect_format(src)
    export_sae(import_sae(src, name), dst, to)
    return name
