"""Other libraries' checkpoint formats (saelab/sae/formats/).

Fast tests run in our own environment: every (architecture, format) pair survives a round trip with the same
latents and reconstructions, the pairs a format cannot hold and the peer kinds we cannot read are clear errors.
Transcoders in these formats: tests/test_transcoder_formats.py. Tests marked `peers` check parity with the peer
libraries themselves (SAELens, sparsify, dictionary_learning),
each in its own environment under .venv-peers/ (`make peers`): the peer loads what we write, and we load what the
peer saves, and both sides compute latents and reconstructions of the same inputs (tests/peer_scripts/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab import cli
from saelab.config import commands
from saelab.sae import base as sae_lib
from saelab.sae.base import REGISTRY, SAEConfig, SAEError, build, register
from saelab.sae.formats import FORMATS, convert, detect_format, export_sae, import_sae
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.topk import BatchTopKSAE, TopKSAE

ROOT = Path(__file__).resolve().parent.parent
D, F = 16, 64
HOOK, MODEL = "layers.3", "tiny-llama"
PARAMS: dict[str, dict[str, Any]] = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4, "matryoshka_prefix_fractions": (0.25, 0.5, 1.0)},
    "relu": {},
    "jumprelu": {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.5},
}
# circuit-tracer's files hold transcoders only (tests/test_transcoder_formats.py): the SAE formats are the others.
SAE_FORMATS = {fmt: spec for fmt, spec in FORMATS.items() if fmt != "circuit_tracer"}
SUPPORTED = [(arch, fmt) for fmt, spec in SAE_FORMATS.items() for arch in spec.architectures]
UNSUPPORTED = [
    (arch, fmt) for fmt, spec in SAE_FORMATS.items() for arch in REGISTRY if arch not in spec.architectures
]


def random_sae(arch: str, seed: int = 0) -> sae_lib.SAE:
    """An SAE with the weights of no particular training: non-zero biases, decoder rows of varied norms,
    thresholds that cut through the pre-activations of `inputs()` (so a dropped bias, norm or threshold shows)."""
    torch.manual_seed(seed)
    s = build(SAEConfig(arch, D, F, hookpoint=HOOK, model=MODEL, **PARAMS[arch]))
    with torch.no_grad():
        for p in (s.W_enc_DF, s.W_dec_FD, s.b_enc_F, s.b_dec_D):
            p.normal_(0.0, 0.5)
        if isinstance(s, BatchTopKSAE):
            s.threshold.fill_(1.5)
        if isinstance(s, JumpReLUSAE):
            s.log_threshold_F.copy_((torch.rand(F) * 2 + 0.5).log())
    return s.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(seed)) * 2


def outputs(s: sae_lib.SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense latents [B, F], reconstruction [B, D])."""
    with torch.no_grad():
        return s.dense_latents(x), s(x).x_hat_BD


def assert_same_outputs(
    latents: torch.Tensor, x_hat: torch.Tensor, ref_latents: torch.Tensor, ref_x_hat: torch.Tensor
) -> None:
    active = (ref_latents > 0).float().mean()
    assert 0 < active < 1, "inputs leave every latent on or off: the comparison would prove little"
    # Folding a bias or a norm into the weights reorders float32 sums: equal up to rounding, which scales with the
    # size of the summed terms, not of the result (an output near 0 from terms near 100 carries their rounding).
    for got, ref in ((latents, ref_latents), (x_hat, ref_x_hat)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


# --- our format -> format -> our format ------------------------------------------------------------------------
BUILT_IN = {"topk", "batchtopk", "matryoshka", "relu", "jumprelu"}


def test_support_matrix() -> None:
    """The matrix the README and the format modules document: sparsify holds TopK only; saelab's own format holds
    every registered architecture, the peers' formats the built-in ones they have a place for."""
    assert set(REGISTRY) == BUILT_IN
    assert {fmt: set(spec.architectures) for fmt, spec in FORMATS.items()} == {
        "saelab": BUILT_IN,
        "saelens": BUILT_IN,
        "sparsify": {"topk"},
        "dictionary_learning": BUILT_IN,
        "circuit_tracer": BUILT_IN - {"topk"},
    }


@pytest.mark.parametrize(("arch", "fmt"), SUPPORTED)
def test_round_trip_keeps_outputs_and_config(arch: str, fmt: str, tmp_path: Path) -> None:
    s, x = random_sae(arch), inputs()
    folder = tmp_path / HOOK  # sparsify keeps the hookpoint as the folder's name
    export_sae(s, folder, fmt)
    assert detect_format(folder) == fmt
    back = import_sae(folder)
    assert_same_outputs(*outputs(back, x), *outputs(s, x))
    assert not back.training
    expected = s.cfg
    if fmt == "sparsify":  # no field for the model name (the hookpoint is the folder's name)
        expected = dataclasses.replace(expected, model="")
    if (
        fmt == "dictionary_learning" and arch == "jumprelu"
    ):  # no field: JumpReluAutoEncoder's own initial value
        expected = dataclasses.replace(expected, jumprelu_init_threshold=0.001)
    assert back.cfg == expected


@pytest.mark.bad_input
@pytest.mark.parametrize(("arch", "fmt"), UNSUPPORTED)
def test_unsupported_pairs_are_refused_and_write_nothing(arch: str, fmt: str, tmp_path: Path) -> None:
    line = f"the {fmt} format cannot hold a {arch} SAE (it holds topk); formats that can: saelab, saelens, dictionary_learning"
    with pytest.raises(SAEError, match=f"^{re.escape(line)}$"):
        export_sae(random_sae(arch), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


class ToySAE(TopKSAE):
    """An architecture registered from outside saelab: only saelab's own format can hold it."""

    architecture = "toy_format"


@pytest.fixture
def toy_registered() -> Iterator[type[ToySAE]]:
    register(ToySAE)
    yield ToySAE
    del REGISTRY[ToySAE.architecture]


@pytest.mark.bad_input
def test_a_registered_architecture_is_refused_by_name_where_no_format_has_a_place_for_it(
    toy_registered: type[ToySAE], tmp_path: Path
) -> None:
    """Export: each peer format refuses the new architecture in one line (naming it, the format and the formats
    that can hold it) and writes nothing; saelab's own holds it and reads it back. Import: a checkpoint of an
    architecture this process has not registered is refused by name."""
    torch.manual_seed(0)
    toy = build(SAEConfig("toy_format", D, F, k=4)).eval()
    for fmt in ("saelens", "sparsify", "dictionary_learning"):
        held = ", ".join(FORMATS[fmt].architectures)
        line = f"the {fmt} format cannot hold a toy_format SAE (it holds {held}); formats that can: saelab"
        with pytest.raises(SAEError, match=f"^{re.escape(line)}$"):
            export_sae(toy, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    export_sae(toy, tmp_path / "saelab", "saelab")
    back = import_sae(tmp_path / "saelab")
    assert isinstance(back, ToySAE) and back.cfg == toy.cfg
    assert_same_outputs(*outputs(back, inputs()), *outputs(toy, inputs()))
    with pytest.raises(SAEError, match="cannot hold a toy_format SAE"):
        convert(tmp_path / "saelab", tmp_path / "as-saelens", "saelens")
    assert not (tmp_path / "as-saelens").exists()
    del REGISTRY["toy_format"]  # a process that does not register it
    try:
        with pytest.raises(
            SAEError,
            match=f"saelab checkpoint in {re.escape(str(tmp_path))}/saelab: unknown SAE architecture 'toy_format'",
        ):
            import_sae(tmp_path / "saelab")
    finally:
        register(ToySAE)


def test_untrained_batchtopk_threshold_survives(tmp_path: Path) -> None:
    """A threshold of 0 (every positive latent active) is written as 0 and read back as 0, not log(0) trouble."""
    s = random_sae("batchtopk")
    s.threshold.zero_()
    for fmt in ("saelens", "dictionary_learning"):
        export_sae(s, tmp_path / fmt, fmt)
        back = import_sae(tmp_path / fmt)
        assert isinstance(back, BatchTopKSAE) and float(back.threshold) == 0.0
        assert_same_outputs(*outputs(back, inputs()), *outputs(s, inputs()))


def test_saelens_conventions_are_folded_against_a_reference(tmp_path: Path) -> None:
    """A SAELens topk file with apply_b_dec_to_input=false and rescale_acts_by_decoder_norm=true, checked against
    SAELens's inference math written out here: pre = x W_enc + b_enc, z = TopK(pre * |W_dec_i|) then ReLU,
    x_hat = (z / |W_dec_i|) W_dec + b_dec."""
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(D, F, generator=g), torch.randn(F, D, generator=g) * 2
    b_enc, b_dec = torch.randn(F, generator=g), torch.randn(D, generator=g)
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "k": 4, "dtype": "float32", "device": "cpu"}
    cfg |= {
        "apply_b_dec_to_input": False,
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"hook_name": HOOK},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    x = inputs()
    norm_F = W_dec.norm(dim=1)
    pre = (x @ W_enc + b_enc) * norm_F
    vals, idx = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    x_hat = (z / norm_F) @ W_dec + b_dec
    back = import_sae(folder)
    assert back.cfg.hookpoint == HOOK
    assert_same_outputs(*outputs(back, x), z, x_hat)


# --- what cannot be read, and where ----------------------------------------------------------------------------
def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("fmt", "arch", "edit", "match"),
    [
        (
            "saelens",
            "topk",
            {"architecture": "gated"},
            "SAELens architecture 'gated' has no saelab equivalent; saelab reads SAELens standard, topk, jumprelu",
        ),
        ("saelens", "relu", {"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ("saelens", "relu", {"reshape_activations": "hook_z"}, "reshape_activations='hook_z'"),
        (
            "sparsify",
            "topk",
            {"activation": "groupmax"},
            "activation='groupmax': saelab reads sparsify's topk",
        ),
        ("sparsify", "topk", {"skip_connection": True}, "skip_connection=true without transcode"),
        ("saelens", "topk", {"d_in": D + 1}, r"W_enc has shape \(16, 64\), expected \(17, 64\)"),
    ],
)
def test_peer_kinds_we_cannot_read_are_named(
    fmt: str, arch: str, edit: dict[str, Any], match: str, tmp_path: Path
) -> None:
    export_sae(random_sae(arch), tmp_path, fmt)
    _edit_json(tmp_path / "cfg.json", **edit)
    with pytest.raises(SAEError, match=f"{fmt} checkpoint in {re.escape(str(tmp_path))}: {match}"):
        import_sae(tmp_path)


def test_pre_6_saelens_config_is_named(tmp_path: Path) -> None:
    export_sae(random_sae("relu"), tmp_path, "saelens")
    doc = json.loads((tmp_path / "cfg.json").read_text())
    del doc["architecture"]
    (tmp_path / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(SAEError, match=r"pre-6\.0 SAELens config"):
        import_sae(tmp_path)


def test_dictionary_learning_class_we_cannot_read_is_named(tmp_path: Path) -> None:
    export_sae(random_sae("relu"), tmp_path, "dictionary_learning")
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["trainer"]["dict_class"] = "GatedAutoEncoder"
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        SAEError, match="class 'GatedAutoEncoder' has no saelab equivalent; saelab reads Auto"
    ):
        import_sae(tmp_path)


def test_dictionary_learning_without_config_json(tmp_path: Path) -> None:
    """The class follows from the tensors alone, except AutoEncoderTopK and BatchTopKSAE, which share them."""
    for arch in ("relu", "matryoshka", "jumprelu", "batchtopk"):
        folder = tmp_path / arch
        export_sae(random_sae(arch), folder, "dictionary_learning")
        (folder / "config.json").unlink()
        if arch == "batchtopk":
            with pytest.raises(SAEError, match="fits both AutoEncoderTopK and BatchTopKSAE"):
                import_sae(folder)
        else:
            assert import_sae(folder).cfg.architecture == arch
    state = {"decoder_bias": torch.zeros(D), "r_mag": torch.zeros(F)}
    torch.save(state, tmp_path / "relu" / "ae.pt")
    with pytest.raises(SAEError, match=r"holds tensors \['decoder_bias', 'r_mag'\], which match none"):
        import_sae(tmp_path / "relu")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fmt", "file"),
    [
        ("saelens", "sae_weights.safetensors"),
        ("sparsify", "sae.safetensors"),
        ("dictionary_learning", "ae.pt"),
    ],
)
def test_truncated_weights_are_an_error(fmt: str, file: str, tmp_path: Path) -> None:
    export_sae(random_sae("topk"), tmp_path, fmt)
    data = (tmp_path / file).read_bytes()
    (tmp_path / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match=f"{fmt} checkpoint in {re.escape(str(tmp_path))}"):
        import_sae(tmp_path)


@pytest.mark.bad_input
def test_format_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="is not a folder"):
        import_sae(tmp_path / "nowhere")
    with pytest.raises(SAEError, match=r"holds no SAE checkpoint of a known format \(saelab: cfg.json \+"):
        import_sae(tmp_path)
    export_sae(random_sae("topk"), tmp_path / "sl", "saelens")
    with pytest.raises(SAEError, match=r"is not a dictionary_learning checkpoint: ae\.pt missing"):
        import_sae(tmp_path / "sl", "dictionary_learning")
    with pytest.raises(SAEError, match="unknown checkpoint format 'safetensors'; known: saelab, saelens"):
        import_sae(tmp_path / "sl", "safetensors")
    export_sae(random_sae("topk"), tmp_path / "dl", "dictionary_learning")
    (tmp_path / "sl" / "ae.pt").write_bytes((tmp_path / "dl" / "ae.pt").read_bytes())
    with pytest.raises(SAEError, match=r"several formats \(saelens, dictionary_learning\); say which"):
        import_sae(tmp_path / "sl")
    assert import_sae(tmp_path / "sl", "saelens").cfg.architecture == "topk"


@pytest.mark.parametrize(("first", "second"), [("saelab", "sparsify"), ("saelens", "dictionary_learning")])
def test_export_never_mixes_formats_in_one_folder(first: str, second: str, tmp_path: Path) -> None:
    """saelab and sparsify even share file names: writing one over the other would silently relabel it."""
    export_sae(random_sae("topk"), tmp_path, first)
    with pytest.raises(SAEError, match=f"already holds a {first} checkpoint; write the {second} copy"):
        export_sae(random_sae("topk"), tmp_path, second)
    assert detect_format(tmp_path) == first
    export_sae(random_sae("topk", seed=1), tmp_path, first)  # the same format may be overwritten


# --- the command line ------------------------------------------------------------------------------------------
def test_cli_format_names_match_the_registry() -> None:
    assert typing.get_args(commands.CheckpointFormat) == tuple(FORMATS)


def test_cli_convert_chain(tmp_path: Path) -> None:
    s = random_sae("topk")
    sae_lib.save(s, tmp_path / "ours")
    chain = ["saelens", "dictionary_learning", "sparsify", "saelab"]
    src = tmp_path / "ours"
    for fmt in chain:
        dst = tmp_path / fmt / HOOK
        assert cli.main(["convert", "--src", str(src), "--dst", str(dst), "--to", fmt]) == 0
        assert detect_format(dst) == fmt
        src = dst
    back = sae_lib.load(src)
    # The hookpoint came back through sparsify's folder name; the model name had no place in sparsify.
    assert back.cfg == dataclasses.replace(s.cfg, model="")
    assert_same_outputs(*outputs(back, inputs()), *outputs(s, inputs()))


@pytest.mark.bad_input
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae_lib.save(random_sae("relu"), tmp_path / "ours")
    argv = ["convert", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "sp"), "--to", "sparsify"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "saelab: SAEError: the sparsify format cannot hold a relu SAE (it holds topk); "
        "formats that can: saelab, saelens, dictionary_learning\n"
    )
    argv = ["convert", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "x"), "--to", "saelens"]
    assert cli.main([*argv, "--from", "dictionary_learning"]) == 1
    assert capsys.readouterr().err.endswith("is not a dictionary_learning checkpoint: ae.pt missing\n")


# --- parity with the peer libraries, each in its own environment -----------------------------------------------
PEER_FORMAT = {"saelens": "saelens", "sparsify": "sparsify", "dictlearn": "dictionary_learning"}
# What each peer script builds and saves with the peer's own save method, and the architecture saelab reads it as.
PEER_KINDS = {
    "saelens": {
        "standard": "relu",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "batchtopk": "batchtopk",
        "matryoshka_batchtopk": "matryoshka",
    },
    "sparsify": {"topk": "topk"},
    "dictlearn": {
        "AutoEncoder": "relu",
        "AutoEncoderTopK": "topk",
        "BatchTopKSAE": "batchtopk",
        "MatryoshkaBatchTopKSAE": "matryoshka",
        "JumpReluAutoEncoder": "jumprelu",
    },
}
# Peer kinds saelab has no equivalent for, and the words of the error that must say so.
PEER_UNREADABLE = {
    ("saelens", "gated"): "SAELens architecture 'gated' has no saelab equivalent",
    ("sparsify", "groupmax"): "activation='groupmax'",
    ("sparsify", "skip_sae"): "skip_connection=true without transcode",
    ("dictlearn", "GatedAutoEncoder"): "class 'GatedAutoEncoder' has no saelab equivalent",
}
OURS = [(peer, arch) for peer, fmt in PEER_FORMAT.items() for arch in FORMATS[fmt].architectures]
THEIRS = [(peer, kind) for peer, kinds in PEER_KINDS.items() for kind in kinds]
PEER_TIMEOUT_S = 300


@dataclass(frozen=True)
class PeerRun:
    """One run of a peer's script over all its jobs (one process: importing a peer library takes seconds)."""

    folder: Path
    returncode: int
    log: str

    def out(self, job: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"{job}.out"))


def _job(mode: str, kind: str, folder: Path, out: Path, seed: int) -> dict[str, Any]:
    return {"mode": mode, "kind": kind, "folder": str(folder), "out": str(out), "seed": seed}


@pytest.fixture(scope="session")
def peer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeerRun]:
    """Every built peer environment runs its script once, all at the same time: it loads each SAE we exported
    in its format and builds, saves and runs each of its own kinds, on the same inputs."""
    root = tmp_path_factory.mktemp("peers")
    save_file({"x": inputs()}, str(root / "x.safetensors"))
    started = {}
    for peer, fmt in PEER_FORMAT.items():
        venv = ROOT / ".venv-peers" / peer
        if not (venv / ".installed").exists():
            continue
        folder = root / peer
        jobs = []
        for arch in FORMATS[fmt].architectures:
            export_sae(random_sae(arch), folder / f"ours_{arch}", fmt)
            jobs.append(_job("load", "", folder / f"ours_{arch}", folder / f"ours_{arch}.out", seed=0))
        kinds = [*PEER_KINDS[peer], *(kind for p, kind in PEER_UNREADABLE if p == peer)]
        for seed, kind in enumerate(kinds):
            out = folder / f"theirs_{kind}.out"
            jobs.append(_job("save", kind, folder / f"theirs_{kind}" / HOOK, out, seed=seed))
        spec = {"x": str(root / "x.safetensors"), "d_sae": F, "hookpoint": HOOK, "model": MODEL, "jobs": jobs}
        (folder / "jobs.json").write_text(json.dumps(spec))
        log = (folder / "log.txt").open("w")
        cmd = [str(venv / "bin" / "python"), f"tests/peer_scripts/peer_{peer}.py", str(folder / "jobs.json")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSIFY_DISABLE_TRITON": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[peer] = (folder, log, proc)
    runs = {}
    for peer, (folder, log, proc) in started.items():
        try:
            returncode = proc.wait(timeout=PEER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        log.close()
        runs[peer] = PeerRun(folder, returncode, (folder / "log.txt").read_text())
    return runs


def peer_run(peer_runs: dict[str, PeerRun], peer: str) -> PeerRun:
    if peer not in peer_runs:
        msg = f".venv-peers/{peer} is missing or unfinished; `make peers` builds it"
        if os.environ.get("SAELAB_REQUIRE_PEERS") == "1":
            pytest.fail(f"{msg} (SAELAB_REQUIRE_PEERS=1 requires it)")
        pytest.skip(msg)
    run = peer_runs[peer]
    if run.returncode != 0:
        pytest.fail(f"the {peer} script failed (exit {run.returncode}):\n{run.log[-4000:]}")
    return run


def test_missing_peer_environment_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAELAB_REQUIRE_PEERS", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=r"\.venv-peers/sparsify is missing or unfinished; `make peers`"
    ):
        peer_run({}, "sparsify")
    monkeypatch.setenv("SAELAB_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="`make peers` builds it"):
        peer_run({}, "sparsify")


@pytest.mark.peers
@pytest.mark.parametrize(("peer", "arch"), OURS)
def test_peer_library_reads_our_export(peer: str, arch: str, peer_runs: dict[str, PeerRun]) -> None:
    theirs = peer_run(peer_runs, peer).out(f"ours_{arch}")
    assert_same_outputs(theirs["latents"], theirs["x_hat"], *outputs(random_sae(arch), inputs()))
    if "x_hat_load_dictionary" in theirs:  # dictionary_learning's folder loader, which reads our config.json
        torch.testing.assert_close(theirs["x_hat_load_dictionary"], theirs["x_hat"], rtol=1e-5, atol=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize(("peer", "kind"), THEIRS)
def test_we_read_what_the_peer_library_saves(peer: str, kind: str, peer_runs: dict[str, PeerRun]) -> None:
    run = peer_run(peer_runs, peer)
    folder = run.folder / f"theirs_{kind}" / HOOK
    assert detect_format(folder) == PEER_FORMAT[peer]
    ours = import_sae(folder)
    theirs = run.out(f"theirs_{kind}")
    assert_same_outputs(*outputs(ours, inputs()), theirs["latents"], theirs["x_hat"])
    assert ours.cfg.architecture == PEER_KINDS[peer][kind]
    assert ours.cfg.hookpoint == HOOK
    assert ours.cfg.model == ("" if peer == "sparsify" else MODEL)
    if kind == "matryoshka_batchtopk":
        assert ours.cfg.matryoshka_prefix_fractions == (0.25, 0.5, 1.0)


@pytest.mark.peers
@pytest.mark.parametrize(("peer", "kind"), list(PEER_UNREADABLE))
def test_peer_kinds_without_equivalent_are_named(peer: str, kind: str, peer_runs: dict[str, PeerRun]) -> None:
    folder = peer_run(peer_runs, peer).folder / f"theirs_{kind}" / HOOK
    with pytest.raises(SAEError, match=re.escape(PEER_UNREADABLE[peer, kind])):
        import_sae(folder)
