"""Transcoders and skip transcoders in other libraries' checkpoint formats (saelab/sae/formats/, issue 20).

Fast tests run in our own environment: every (architecture, skip, format) a format can hold survives a round trip
with the same latents and prediction of the target (skip path included) and the same config; what a format cannot
hold is refused in one line that names it; peer files of kinds we cannot read are named. Tests marked `peers`
check parity with sparsify 1.3.3, SAELens 6.54.12 and circuit-tracer 0.5.0 themselves, each in its own
environment under .venv-peers/ (`make peers`): the peer loads what we write (circuit-tracer: one layer's file with
its per-layer loader, and a set we wrote layer by layer with its set loader), and we load what the peer saves, and
both sides compute latents and the transcoder's output (and the skip path alone) on the same inputs, equal within rtol 1e-5 and atol 1e-6 x max|reference| (float32
rounding of the folded input centre; see test_formats.assert_same_outputs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_formats import (
    PARAMS,
    PEER_TIMEOUT_S,
    ROOT,
    PeerRun,
    assert_same_outputs,
    inputs,
    outputs,
    peer_run,
)

from saelab.sae import base as sae_lib
from saelab.sae.base import SAEConfig, SAEError, build
from saelab.sae.formats import FORMATS, circuit_tracer, detect_format, export_sae, import_sae

D, D_OUT, F = 16, 20, 64
IN_HP, OUT_HP, MODEL = "model.layers.3.post_attention_layernorm", "model.layers.3.mlp", "tiny-llama"
# What each format holds as a transcoder: (architecture, skip, d_out). sparsify's transcoders are TopK and write
# their input's width; SAELens loads ReLU and JumpReLU transcoders (batchtopk and matryoshka go as JumpReLU);
# circuit-tracer's per-layer files hold what SAELens does, as wide as their input.
HOLDS = {
    "saelab": [(a, s, D_OUT) for a in PARAMS for s in (False, True)],
    "saelens": [
        (a, s, D_OUT) for a in ("relu", "jumprelu", "batchtopk", "matryoshka") for s in (False, True)
    ],
    "sparsify": [("topk", s, D) for s in (False, True)],
    "dictionary_learning": [],
    "circuit_tracer": [
        (a, s, D) for a in ("relu", "jumprelu", "batchtopk", "matryoshka") for s in (False, True)
    ],
}
SUPPORTED = [(fmt, *held) for fmt, kinds in HOLDS.items() for held in kinds]


def test_support_matrix() -> None:
    """Each format holds exactly the transcoders listed in HOLDS (and the README): every other (architecture,
    skip, d_out) is refused before a file is written."""
    for fmt in FORMATS:
        held = []
        for arch in PARAMS:
            for skip in (False, True):
                for d_out in (D, D_OUT):
                    cfg = random_transcoder(arch, skip, d_out).cfg
                    if arch in FORMATS[fmt].architectures and FORMATS[fmt].refuse(cfg) is None:
                        held.append((arch, skip, d_out))
        expected = HOLDS[fmt] + [
            (a, s, D) for a, s, _ in HOLDS[fmt] if fmt not in ("sparsify", "circuit_tracer")
        ]
        assert sorted(held) == sorted(expected), fmt


def random_transcoder(arch: str, skip: bool, d_out: int = D_OUT, seed: int = 0) -> sae_lib.SAE:
    """A transcoder with weights of no particular training: every parameter and buffer non-zero (the input centre
    too, which the peers' formats have no place for and must be folded), thresholds through the pre-activations."""
    torch.manual_seed(seed)
    cfg = SAEConfig(arch, D, F, hookpoint=IN_HP, model=MODEL, target_hookpoint=OUT_HP, d_out=d_out, skip=skip,
                    **PARAMS[arch])  # fmt: skip
    s = build(cfg)
    with torch.no_grad():
        for name, t in [*s.named_parameters(), *s.named_buffers()]:
            if name == "log_threshold_F":
                t.copy_((torch.rand_like(t) * 2 + 0.5).log())
            elif name == "threshold":
                t.fill_(1.5)
            else:
                t.normal_(0.0, 0.5)
    return s.eval()


@pytest.mark.parametrize(("fmt", "arch", "skip", "d_out"), SUPPORTED)
def test_round_trip_keeps_latents_prediction_and_config(
    fmt: str, arch: str, skip: bool, d_out: int, tmp_path: Path
) -> None:
    s, x = random_transcoder(arch, skip, d_out), inputs()
    folder = tmp_path / OUT_HP  # sparsify names a transcoder's folder after the module it rebuilds
    export_sae(s, folder, fmt)
    assert detect_format(folder) == fmt
    back = import_sae(folder)
    assert_same_outputs(*outputs(back, x), *outputs(s, x))
    if skip:  # the skip path alone, too: a transposed W_skip would still pass for a symmetric one
        assert back.W_skip_DO is not None and s.W_skip_DO is not None
        torch.testing.assert_close(back.W_skip_DO, s.W_skip_DO)
    expected = s.cfg
    if fmt == "sparsify":  # no field for the model name
        expected = dataclasses.replace(expected, model="")
    assert back.cfg == expected


def test_skip_path_carries_what_it_should_after_a_round_trip(tmp_path: Path) -> None:
    """With every latent off, the prediction is b_dec + x W_skip on both sides: the skip survives on its own."""
    for fmt, arch, d_out in (("sparsify", "topk", D), ("saelens", "relu", D_OUT)):
        s = random_transcoder(arch, True, d_out)
        with torch.no_grad():
            s.b_enc_F.fill_(-1e4)
        export_sae(s, tmp_path / fmt / OUT_HP, fmt)
        back, x = import_sae(tmp_path / fmt / OUT_HP), inputs()
        assert s.W_skip_DO is not None
        expected = x @ s.W_skip_DO + s.b_dec_D
        torch.testing.assert_close(outputs(back, x)[1], expected.detach(), rtol=1e-5, atol=1e-5)
        assert int((outputs(back, x)[0] > 0).sum()) == 0


# --- what a format cannot hold, and what we cannot read --------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fmt", "arch", "skip", "d_out", "line"),
    [
        (
            "sparsify", "topk", True, D_OUT,
            f"the sparsify format cannot hold this topk transcoder ({IN_HP} -> {OUT_HP}, skip): d_out=20 differs "
            "from d_in=16, and a sparsify transcoder writes its input's width; formats that can: saelab",
        ),
        (
            "saelens", "topk", False, D_OUT,
            f"the saelens format cannot hold this topk transcoder ({IN_HP} -> {OUT_HP}): SAELens has no topk "
            "transcoder (it loads jumprelu_skip_transcoder, jumprelu_transcoder, skip_transcoder, transcoder); "
            "formats that can: saelab",
        ),
        (
            "dictionary_learning", "relu", False, D_OUT,
            f"the dictionary_learning format cannot hold this relu transcoder ({IN_HP} -> {OUT_HP}): "
            "dictionary_learning has no transcoder layout (its dictionaries reconstruct their input); formats that "
            "can: saelab, saelens",
        ),
        (
            "sparsify", "relu", False, D,
            "the sparsify format cannot hold a relu SAE (it holds topk); formats that can: saelab, saelens, "
            "circuit_tracer",
        ),
        (
            "dictionary_learning", "topk", False, D,
            f"the dictionary_learning format cannot hold this topk transcoder ({IN_HP} -> {OUT_HP}): "
            "dictionary_learning has no transcoder layout (its dictionaries reconstruct their input); formats that "
            "can: saelab, sparsify",
        ),
    ],
)  # fmt: skip
def test_what_a_format_cannot_hold_is_refused_by_name_and_writes_nothing(
    fmt: str, arch: str, skip: bool, d_out: int, line: str, tmp_path: Path
) -> None:
    with pytest.raises(SAEError, match=f"^{re.escape(line)}$"):
        export_sae(random_transcoder(arch, skip, d_out), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def _edit_json(path: Path, edit: dict[str, Any]) -> None:
    doc = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fmt", "arch", "skip", "d_out", "edit", "match"),
    [
        ("sparsify", "topk", False, D, {"transcode": False, "skip_connection": True},
         "skip_connection=true without transcode: an SAE with a skip path"),
        ("sparsify", "topk", False, D, {"skip_connection": True}, r"tensors do not fit: missing \['W_skip'\]"),
        ("sparsify", "topk", True, D, {"d_in": D + 1}, r"W_enc has shape \(16, 64\), expected \(17, 64\)"),
        ("saelens", "relu", True, D_OUT, {"apply_b_dec_to_input": True}, "apply_b_dec_to_input=true on a transcoder"),
        ("saelens", "relu", False, D_OUT, {"d_out": D_OUT + 1},
         r"W_dec has shape \(64, 20\), expected \(64, 21\) for d_in=16, d_sae=64, d_out=21"),
        ("saelens", "relu", True, D_OUT, {"architecture": "transcoder"}, r"tensors do not fit: missing \[\], unexpected \['W_skip'\]"),
    ],
)  # fmt: skip
def test_peer_transcoder_files_that_do_not_fit_are_named(
    fmt: str, arch: str, skip: bool, d_out: int, edit: dict[str, Any], match: str, tmp_path: Path
) -> None:
    folder = tmp_path / OUT_HP
    export_sae(random_transcoder(arch, skip, d_out), folder, fmt)
    _edit_json(folder / "cfg.json", edit)
    with pytest.raises(SAEError, match=f"{fmt} checkpoint in {re.escape(str(folder))}: {match}"):
        import_sae(folder)


def test_hookpoints_of_peer_files_without_saelabs_fields(tmp_path: Path) -> None:
    """A sparsify transcoder names only the module it rebuilds (its folder): the input of a Llama-layout `mlp` is
    its `post_attention_layernorm`; elsewhere the input is unknown (empty). A SAELens transcoder without
    `metadata.hook_name_out` has an empty target."""
    for folder, input_hp in (("layers.7.mlp", "layers.7.post_attention_layernorm"), ("h.7.c_fc", "")):
        export_sae(random_transcoder("topk", False, D), tmp_path / folder, "sparsify")
        _edit_json(tmp_path / folder / "cfg.json", {"input_hookpoint": None})
        cfg = import_sae(tmp_path / folder).cfg
        assert (cfg.hookpoint, cfg.target_hookpoint) == (input_hp, folder)
    export_sae(random_transcoder("relu", False), tmp_path / "sl", "saelens")
    doc = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    del doc["metadata"]["hook_name_out"]
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(doc))
    cfg = import_sae(tmp_path / "sl").cfg
    assert (cfg.hookpoint, cfg.target_hookpoint, cfg.d_out) == (IN_HP, "", D_OUT)


# --- parity with the peer libraries, each in its own environment -----------------------------------------------
PEER_FORMAT = {"saelens": "saelens", "sparsify": "sparsify"}
OURS = [(peer, arch, skip, d_out) for peer, fmt in PEER_FORMAT.items() for arch, skip, d_out in HOLDS[fmt]]
# What each peer script builds and saves with the peer's own save method: (architecture, skip, d_out) in saelab.
PEER_KINDS: dict[str, dict[str, tuple[str, bool, int]]] = {
    "saelens": {
        "transcoder": ("relu", False, D_OUT),
        "skip_transcoder": ("relu", True, D_OUT),
        "jumprelu_transcoder": ("jumprelu", False, D_OUT),
        "jumprelu_skip_transcoder": ("jumprelu", True, D_OUT),
    },
    "sparsify": {"transcode": ("topk", False, D), "transcode_skip": ("topk", True, D)},
}
THEIRS = [(peer, kind) for peer, kinds in PEER_KINDS.items() for kind in kinds]


def _tag(arch: str, skip: bool) -> str:
    return f"{arch}{'_skip' if skip else ''}"


@pytest.fixture(scope="session")
def transcoder_peer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeerRun]:
    """Every built peer environment runs its script once: it loads each transcoder we exported in its format and
    builds, saves and runs each of its own transcoder kinds, on the same inputs."""
    root = tmp_path_factory.mktemp("tc-peers")
    save_file({"x": inputs()}, str(root / "x.safetensors"))
    started = {}
    for peer, fmt in PEER_FORMAT.items():
        venv = ROOT / ".venv-peers" / peer
        if not (venv / ".installed").exists():
            continue
        folder = root / peer
        jobs: list[dict[str, Any]] = []
        for arch, skip, d_out in HOLDS[fmt]:
            tag = _tag(arch, skip)
            export_sae(random_transcoder(arch, skip, d_out), folder / f"ours_{tag}" / OUT_HP, fmt)
            jobs.append({"mode": "load", "kind": "", "folder": str(folder / f"ours_{tag}" / OUT_HP),
                         "out": str(folder / f"ours_{tag}.out"), "seed": 0})  # fmt: skip
        for seed, (kind, (_, _, d_out)) in enumerate(PEER_KINDS[peer].items()):
            jobs.append({"mode": "save", "kind": kind, "folder": str(folder / f"theirs_{kind}" / OUT_HP),
                         "out": str(folder / f"theirs_{kind}.out"), "seed": seed, "d_out": d_out,
                         "hookpoint": IN_HP, "target_hookpoint": OUT_HP})  # fmt: skip
        spec = {
            "x": str(root / "x.safetensors"),
            "d_sae": F,
            "hookpoint": IN_HP,
            "model": MODEL,
            "jobs": jobs,
        }
        (folder / "jobs.json").write_text(json.dumps(spec))
        log = (folder / "log.txt").open("w")
        cmd = [str(venv / "bin" / "python"), f"tests/peer_scripts/peer_{peer}.py", str(folder / "jobs.json")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSIFY_DISABLE_TRITON": "1"}
        started[peer] = (
            folder,
            log,
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
        )
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


@pytest.mark.peers
@pytest.mark.parametrize(("peer", "arch", "skip", "d_out"), OURS)
def test_peer_library_reads_our_transcoder(
    peer: str, arch: str, skip: bool, d_out: int, transcoder_peer_runs: dict[str, PeerRun]
) -> None:
    theirs = peer_run(transcoder_peer_runs, peer).out(f"ours_{_tag(arch, skip)}")
    ours = random_transcoder(arch, skip, d_out)
    assert theirs["x_hat"].shape == (64, d_out)
    assert_same_outputs(theirs["latents"], theirs["x_hat"], *outputs(ours, inputs()))
    if skip:
        assert ours.W_skip_DO is not None
        ref = (inputs() @ ours.W_skip_DO).detach()
        torch.testing.assert_close(theirs["skip"], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.peers
@pytest.mark.parametrize(("peer", "kind"), THEIRS)
def test_we_read_the_transcoders_the_peer_library_saves(
    peer: str, kind: str, transcoder_peer_runs: dict[str, PeerRun]
) -> None:
    run = peer_run(transcoder_peer_runs, peer)
    folder = run.folder / f"theirs_{kind}" / OUT_HP
    assert detect_format(folder) == PEER_FORMAT[peer]
    ours, theirs = import_sae(folder), run.out(f"theirs_{kind}")
    arch, skip, d_out = PEER_KINDS[peer][kind]
    assert (ours.cfg.architecture, ours.cfg.skip, ours.cfg.d_out) == (arch, skip, d_out)
    assert_same_outputs(*outputs(ours, inputs()), theirs["latents"], theirs["x_hat"])
    if skip:
        assert ours.W_skip_DO is not None
        ref = theirs["skip"]
        torch.testing.assert_close(
            inputs() @ ours.W_skip_DO.detach(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())
        )
    # sparsify names the rebuilt module by the folder (and saelab reads a Llama MLP's input as the norm before
    # it); SAELens's metadata names the input, and the output where the saving code put it there
    assert (ours.cfg.hookpoint, ours.cfg.target_hookpoint) == (IN_HP, OUT_HP)


# --- circuit-tracer's per-layer files (saelab/sae/formats/circuit_tracer.py) ------------------------------------
def _moved(s: sae_lib.SAE, hookpoint: str, target: str, **changes: Any) -> sae_lib.SAE:
    """`s` with other hookpoints (and config changes), the same weights."""
    moved = build(dataclasses.replace(s.cfg, hookpoint=hookpoint, target_hookpoint=target, **changes))
    moved.load_state_dict(s.state_dict())
    return moved.eval()


def _strip_saelab_metadata(path: Path) -> None:
    """Save a layer's file again without saelab's metadata, as circuit-tracer's `to_safetensors` would."""
    save_file(load_file(str(path)), str(path))


def test_circuit_tracer_layer_file_layout(tmp_path: Path) -> None:
    """One layer's file in circuit-tracer's names and orientations, beside the set's config.yaml."""
    s = random_transcoder("jumprelu", True, D)
    export_sae(s, tmp_path / "ct", "circuit_tracer")
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.yaml", "layer_3.safetensors"]
    state = load_file(str(tmp_path / "ct" / "layer_3.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,),
        "activation_function.threshold": (F,), "W_skip": (D, D),
    }  # fmt: skip
    assert s.W_skip_DO is not None
    torch.testing.assert_close(state["W_skip"], s.W_skip_DO.detach().T)
    assert yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text()) == {
        "model_kind": "transcoder_set",
        "model_name": MODEL,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }


@pytest.mark.parametrize(
    ("arch", "read_as"), [("relu", "relu"), ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu")]
)
def test_circuit_tracer_files_without_saelabs_metadata(arch: str, read_as: str, tmp_path: Path) -> None:
    """A layer file circuit-tracer saved (no saelab config): ReLU or JumpReLU by its tensors, hookpoints from the
    set's TransformerLens hooks, the same latents and prediction; a hook saelab has no module name for stays a
    TransformerLens name."""
    s = random_transcoder(arch, True, D)
    export_sae(s, tmp_path, "circuit_tracer")
    _strip_saelab_metadata(tmp_path / "layer_3.safetensors")
    back = import_sae(tmp_path)
    assert_same_outputs(*outputs(back, inputs()), *outputs(s, inputs()))
    assert (back.cfg.architecture, back.cfg.skip, back.cfg.model) == (read_as, True, MODEL)
    assert (back.cfg.hookpoint, back.cfg.target_hookpoint) == (
        "layers.3.post_attention_layernorm",
        "layers.3.mlp",
    )
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text().replace("mlp.hook_in", "ln2.hook_normalized"))
    assert import_sae(tmp_path).cfg.hookpoint == "blocks.3.ln2.hook_normalized"


def test_circuit_tracer_sets_grow_one_layer_at_a_time(tmp_path: Path) -> None:
    """Each layer exported into one folder joins the set; saelab reads one layer at a time (read_layer, read_set),
    and a folder of several layers is named as such; a layer that does not fit the set is refused."""
    folder = tmp_path / "set"
    layers = {
        i: _moved(random_transcoder("relu", True, D, seed=i), f"layers.{i}.post_attention_layernorm", f"layers.{i}.mlp")
        for i in (0, 1)
    }  # fmt: skip
    for tc in layers.values():
        export_sae(tc, folder, "circuit_tracer")
    assert detect_format(folder) == "circuit_tracer"
    with pytest.raises(
        SAEError, match=r"the set holds 2 layers \(layer_0.safetensors, layer_1.safetensors\)"
    ):
        import_sae(folder)
    got = circuit_tracer.read_set(folder)
    assert sorted(got) == [0, 1]
    for i, tc in layers.items():
        assert got[i].cfg == tc.cfg
        assert_same_outputs(*outputs(got[i], inputs()), *outputs(tc, inputs()))
    other_model = _moved(layers[1], "layers.2.post_attention_layernorm", "layers.2.mlp", model="other")
    with pytest.raises(SAEError, match="holds a circuit-tracer set with model_name='tiny-llama', and this"):
        export_sae(other_model, folder, "circuit_tracer")
    wider = build(dataclasses.replace(layers[1].cfg, d_sae=2 * F, hookpoint="blocks.2.mlp.hook_in",
                                      target_hookpoint="blocks.2.mlp.hook_out"))  # fmt: skip
    with pytest.raises(SAEError, match=r"set of 64 latents per layer \(layer 0\), and circuit-tracer needs"):
        export_sae(wider, folder, "circuit_tracer")
    assert sorted(circuit_tracer.layers_in(folder)) == [0, 1]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("arch", "d_out", "hookpoints", "why"),
    [
        ("relu", D_OUT, (IN_HP, OUT_HP),
         "d_out=20 differs from d_in=16, and circuit-tracer's SingleLayerTranscoder has one width (d_model) for "
         "input and output; formats that can: saelab, saelens"),
        ("jumprelu", D, ("h.3.ln_2", "h.3.mlp"),
         "circuit-tracer names hooks by layer and TransformerLens hook, which saelab knows for "
         "layers.{i}.post_attention_layernorm -> layers.{i}.mlp (Llama layout) and blocks.{i}.<hook>; "
         "formats that can: saelab, saelens"),
        ("relu", D, ("layers.2.post_attention_layernorm", "layers.3.mlp"),
         "its input is in layer 2 and its output in layer 3, and a circuit-tracer layer file reads and writes one "
         "layer; formats that can: saelab, saelens"),
    ],
)  # fmt: skip
def test_what_circuit_tracer_cannot_hold_is_refused_by_name(
    arch: str, d_out: int, hookpoints: tuple[str, str], why: str, tmp_path: Path
) -> None:
    s = _moved(random_transcoder(arch, False, d_out), *hookpoints)
    line = f"the circuit_tracer format cannot hold this {arch} transcoder ({hookpoints[0]} -> {hookpoints[1]}): {why}"
    with pytest.raises(SAEError, match=f"^{re.escape(line)}$"):
        export_sae(s, tmp_path / "out", "circuit_tracer")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_circuit_tracer_refuses_topk_and_saes(tmp_path: Path) -> None:
    with pytest.raises(
        SAEError, match=r"^the circuit_tracer format cannot hold a topk SAE \(it holds relu, "
    ):
        export_sae(random_transcoder("topk", False, D), tmp_path / "out", "circuit_tracer")
    sae = build(SAEConfig("relu", D, F, hookpoint=IN_HP))
    with pytest.raises(
        SAEError, match=r"circuit-tracer's files hold transcoders \(one layer's MLP input to its"
    ):
        export_sae(sae, tmp_path / "out", "circuit_tracer")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            "threshold",
            "layer_3.safetensors has thresholds below 0: circuit-tracer's JumpReLU passes negative",
        ),
        ("kind", "model_kind='cross_layer_transcoder': saelab reads circuit-tracer's per-layer sets"),
        ("hook", "config.yaml names no feature_output_hook"),
        ("W_dec", r"tensors do not fit: missing \['W_dec'\]"),
    ],
)
def test_circuit_tracer_files_that_do_not_fit_are_named(edit: str, match: str, tmp_path: Path) -> None:
    export_sae(random_transcoder("jumprelu", False, D), tmp_path, "circuit_tracer")
    path, config = tmp_path / "layer_3.safetensors", tmp_path / "config.yaml"
    state = load_file(str(path))
    if edit == "threshold":
        state["activation_function.threshold"][0] = -0.5
    if edit == "W_dec":
        del state["W_dec"]
    save_file(state, str(path))
    doc = yaml.safe_load(config.read_text())
    if edit == "kind":
        doc["model_kind"] = "cross_layer_transcoder"
    if edit == "hook":
        del doc["feature_output_hook"]
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(SAEError, match=f"circuit_tracer checkpoint in {re.escape(str(tmp_path))}: {match}"):
        import_sae(tmp_path)


# circuit-tracer's own code in .venv-peers/circuittracer: its per-layer loader reads each layer we write, its set
# loader a set of two layers we wrote one at a time, and we read the layer files its SingleLayerTranscoder saves.
CT_HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}
CT_KINDS = {
    "relu": ("relu", False),
    "relu_skip": ("relu", True),
    "jumprelu": ("jumprelu", False),
    "jumprelu_skip": ("jumprelu", True),
}
CT_SET = {0: ("relu", True), 1: ("jumprelu", False)}


def _ct_set_layer(i: int) -> sae_lib.SAE:
    arch, skip = CT_SET[i]
    return _moved(
        random_transcoder(arch, skip, D, seed=i), f"layers.{i}.post_attention_layernorm", f"layers.{i}.mlp"
    )


@pytest.fixture(scope="session")
def circuit_tracer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeerRun]:
    """circuit-tracer's script, run once over every job (no run where its environment is missing)."""
    venv = ROOT / ".venv-peers" / "circuittracer"
    if not (venv / ".installed").exists():
        return {}
    root = tmp_path_factory.mktemp("ct-peer")
    save_file({"x": inputs()}, str(root / "x.safetensors"))
    jobs: list[dict[str, Any]] = []
    for arch, skip, d_out in HOLDS["circuit_tracer"]:
        tag = _tag(arch, skip)
        export_sae(random_transcoder(arch, skip, d_out), root / f"ours_{tag}", "circuit_tracer")
        jobs.append({"mode": "load", "kind": "layer", "layer": 3, "folder": str(root / f"ours_{tag}"),
                     "out": str(root / f"ours_{tag}.out"), "seed": 0})  # fmt: skip
    for i in CT_SET:
        export_sae(_ct_set_layer(i), root / "ours_set", "circuit_tracer")
    jobs.append({"mode": "load", "kind": "set", "folder": str(root / "ours_set"), "out": str(root / "ours_set.out"),
                 "seed": 0})  # fmt: skip
    for seed, kind in enumerate(CT_KINDS):
        jobs.append({"mode": "save", "kind": kind, "layer": 3, "hooks": CT_HOOKS, "folder": str(root / f"theirs_{kind}"),
                     "out": str(root / f"theirs_{kind}.out"), "seed": seed})  # fmt: skip
    jobs.append({"mode": "save", "kind": "set", "set_kind": "jumprelu_skip", "n_layers": 2, "hooks": CT_HOOKS,
                 "folder": str(root / "theirs_set"), "out": str(root / "theirs_set.out"), "seed": 9})  # fmt: skip
    spec = {"x": str(root / "x.safetensors"), "d_sae": F, "hookpoint": IN_HP, "model": MODEL, "jobs": jobs}
    (root / "jobs.json").write_text(json.dumps(spec))
    cmd = [str(venv / "bin" / "python"), "tests/peer_scripts/peer_circuittracer.py", str(root / "jobs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode, log = -1, f"timed out after {PEER_TIMEOUT_S} s: {err}"
    return {"circuittracer": PeerRun(root, returncode, log)}


def _assert_same_skip(skip: torch.Tensor, s: sae_lib.SAE) -> None:
    assert s.W_skip_DO is not None
    ref = (inputs() @ s.W_skip_DO).detach()
    torch.testing.assert_close(skip, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.peers
@pytest.mark.parametrize(("arch", "skip", "d_out"), HOLDS["circuit_tracer"])
def test_circuit_tracer_reads_our_layer_file(
    arch: str, skip: bool, d_out: int, circuit_tracer_run: dict[str, PeerRun]
) -> None:
    theirs = peer_run(circuit_tracer_run, "circuittracer").out(f"ours_{_tag(arch, skip)}")
    ours = random_transcoder(arch, skip, d_out)
    assert_same_outputs(theirs["latents"], theirs["x_hat"], *outputs(ours, inputs()))
    if skip:
        _assert_same_skip(theirs["skip"], ours)


@pytest.mark.peers
def test_circuit_tracer_loads_the_set_we_wrote_layer_by_layer(circuit_tracer_run: dict[str, PeerRun]) -> None:
    run = peer_run(circuit_tracer_run, "circuittracer")
    theirs = run.out("ours_set")
    seen = json.loads((run.folder / "ours_set.out.json").read_text())
    assert (seen["n_layers"], seen["feature_input_hook"], seen["feature_output_hook"]) == (
        2,
        *CT_HOOKS.values(),
    )
    assert seen["config"]["model_name"] == MODEL
    for i, (_, skip) in CT_SET.items():
        ours = _ct_set_layer(i)
        assert_same_outputs(theirs[f"latents_{i}"], theirs[f"x_hat_{i}"], *outputs(ours, inputs()))
        if skip:
            _assert_same_skip(theirs[f"skip_{i}"], ours)


@pytest.mark.peers
@pytest.mark.parametrize("kind", CT_KINDS)
def test_we_read_the_layer_files_circuit_tracer_saves(
    kind: str, circuit_tracer_run: dict[str, PeerRun]
) -> None:
    run = peer_run(circuit_tracer_run, "circuittracer")
    folder = run.folder / f"theirs_{kind}"
    assert detect_format(folder) == "circuit_tracer"
    ours, theirs = import_sae(folder), run.out(f"theirs_{kind}")
    arch, skip = CT_KINDS[kind]
    assert (ours.cfg.architecture, ours.cfg.skip, ours.cfg.d_out, ours.cfg.model) == (arch, skip, D, MODEL)
    assert (ours.cfg.hookpoint, ours.cfg.target_hookpoint) == (
        "layers.3.post_attention_layernorm",
        "layers.3.mlp",
    )
    assert_same_outputs(*outputs(ours, inputs()), theirs["latents"], theirs["x_hat"])
    if skip:
        ref = theirs["skip"]
        assert ours.W_skip_DO is not None
        torch.testing.assert_close(
            inputs() @ ours.W_skip_DO.detach(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())
        )


@pytest.mark.peers
def test_we_read_the_sets_circuit_tracer_saves(circuit_tracer_run: dict[str, PeerRun]) -> None:
    """A two-layer set saved by circuit-tracer's TranscoderSet: read layer by layer (read_set); import_sae, which
    reads one transcoder, names the layers instead."""
    run = peer_run(circuit_tracer_run, "circuittracer")
    folder, theirs = run.folder / "theirs_set", run.out("theirs_set")
    got = circuit_tracer.read_set(folder)
    assert sorted(got) == [0, 1]
    for i, tc in got.items():
        assert (tc.cfg.architecture, tc.cfg.skip) == ("jumprelu", True)
        assert (tc.cfg.hookpoint, tc.cfg.target_hookpoint) == (
            f"layers.{i}.post_attention_layernorm",
            f"layers.{i}.mlp",
        )
        assert_same_outputs(*outputs(tc, inputs()), theirs[f"latents_{i}"], theirs[f"x_hat_{i}"])
    with pytest.raises(
        SAEError, match=r"the set holds 2 layers \(layer_0.safetensors, layer_1.safetensors\)"
    ):
        import_sae(folder)
