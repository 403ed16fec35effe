"""Transcoders and skip transcoders (issue 20): every registered architecture reads one hookpoint and reconstructs
another, its loss against the target; the skip path; folding the two training scales; training on planted pairs;
the config a checkpoint records, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from saelab.activations.paired import PairedTensorSource
from saelab.config import ConfigError, ResampleConfig, TrainConfig
from saelab.sae import base as sae_lib
from saelab.sae.base import LossInputs, SAEConfig, SAEError, build
from saelab.sae.registry import REGISTRY
from saelab.train.trainer import TrainError, sae_config, train_many

D_IN, D_OUT, F = 12, 20, 48


def tc_config(arch: str, skip: bool = False) -> SAEConfig:
    cfg = TrainConfig(architecture=arch, k=6, expansion=F // D_IN, target_hookpoint="t", skip=skip)
    return sae_config(cfg, D_IN, "in", "m", ("t", D_OUT))


def randomised(cfg: SAEConfig, seed: int = 0) -> sae_lib.SAE:
    """A transcoder with every parameter and buffer away from its start (thresholds positive)."""
    torch.manual_seed(seed)
    sae = build(cfg)
    with torch.no_grad():
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            if name == "log_threshold_F":
                t.copy_(torch.rand_like(t).mul(0.5).add(0.05).log())
            elif name == "threshold":
                t.fill_(0.3)
            else:
                t.copy_(torch.randn_like(t) * (0.3 if t.dim() == 2 else 1.0))
    return sae


def planted_pairs(n: int = 6000, linear: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: sparse combinations of input directions plus a mean; y: the same coefficients on other (output)
    directions, plus `linear` times a fixed dense linear map of x (what a skip path can carry)."""
    g = torch.Generator().manual_seed(seed)
    n_feat, active = 40, 3
    dirs_in = torch.nn.functional.normalize(torch.randn(n_feat, D_IN, generator=g), dim=1)
    dirs_out = torch.nn.functional.normalize(torch.randn(n_feat, D_OUT, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 4 + 1
    x = torch.einsum("nk,nkd->nd", coef, dirs_in[idx]) * 5 + 3 * torch.randn(D_IN, generator=g)
    y = torch.einsum("nk,nkd->nd", coef, dirs_out[idx]) * 2 + 1 * torch.randn(D_OUT, generator=g)
    if linear:
        y = y + linear * (x - x.mean(0)) @ (torch.randn(D_IN, D_OUT, generator=g) / D_IN**0.5)
    return x, y


def fvu(sae: sae_lib.SAE, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        y_hat = sae.reconstruct(x)[0]
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", list(REGISTRY))
@pytest.mark.parametrize("skip", [False, True])
def test_every_architecture_as_a_transcoder_writes_the_target_width_and_forward_is_decode_encode_plus_skip(
    arch: str, skip: bool
) -> None:
    sae = randomised(tc_config(arch, skip)).eval()
    x = torch.randn(32, D_IN) * 2
    out = sae(x)
    assert out.x_hat_BD.shape == (32, D_OUT)
    expected = sae.decode(sae.encode(x)) + (x @ sae.W_skip_DO if skip else 0)
    torch.testing.assert_close(out.x_hat_BD, expected)
    torch.testing.assert_close(sae.reconstruct(x)[0], expected)
    assert (sae.W_skip_DO is not None) == skip
    with pytest.raises(SAEError, match="transcoder reads d_in=12"):
        sae.encode(torch.randn(4, D_OUT))


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_the_training_loss_is_against_the_target_with_the_skip_path_learning(arch: str) -> None:
    sae = randomised(tc_config(arch, skip=True)).train()
    sae.use_sparse_kernels(False)  # the dense reference path: latents from train_latents, decoded densely
    x, y = torch.randn(64, D_IN) * 2, torch.randn(64, D_OUT)
    inputs = LossInputs(torch.zeros(F, dtype=torch.bool), 6, 0.0, 0.1, 0.1, None, y)
    loss = sae.training_loss(x, inputs)
    with torch.no_grad():
        y_hat = sae.decode_dense(sae.train_latents(sae.linear(x))) + x @ sae.W_skip_DO
    torch.testing.assert_close(loss.mse, (y - y_hat).pow(2).sum(-1).mean())
    loss.total.backward()
    assert sae.W_skip_DO.grad is not None and sae.W_skip_DO.grad.abs().sum() > 0
    with pytest.raises(SAEError, match="given no target"):
        sae.training_loss(x, inputs._replace(target_BD=None))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_kernels_give_a_transcoder_the_dense_paths_loss_and_gradients(arch: str) -> None:
    x, y = torch.randn(64, D_IN) * 2, torch.randn(64, D_OUT)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True  # AuxK on: its residual is the target's
    grads = []
    for sparse in (True, False):
        sae = randomised(tc_config(arch, skip=True)).train()
        sae.use_sparse_kernels(sparse)
        loss = sae.training_loss(x, LossInputs(dead, 8, 1 / 32, target_BD=y))
        loss.total.backward()
        grads.append((loss.total.detach(), {n: p.grad for n, p in sae.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], msg=name)


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_folding_the_two_training_scales_gives_raw_targets_from_raw_inputs(arch: str) -> None:
    """The pitfall of METRICS.md for two scales: the folded transcoder on raw x equals the unfolded one on
    x * s_in, divided by s_out, latents included."""
    sae = randomised(tc_config(arch, skip=True)).eval()
    x = torch.randn(64, D_IN) * 7
    s_in, s_out = 0.37, 2.9
    with torch.no_grad():
        y_scaled, _ = sae.reconstruct(x * s_in)
        z_scaled = sae.dense_latents(x * s_in)
    sae.fold_scales(s_in, s_out)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x)[0], y_scaled / s_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.dense_latents(x), z_scaled / s_out, rtol=1e-4, atol=1e-4)


def train_pairs(cfgs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor) -> list[sae_lib.SAE]:
    source = PairedTensorSource(x, y, hookpoints=["in", "out"])
    results = train_many(source, cfgs, 0, slots=[0] * len(cfgs), target_slots=[1] * len(cfgs))
    return [r.sae for r in results]


def test_a_transcoder_learns_a_planted_map_and_a_skip_transcoder_carries_its_linear_part() -> None:
    x, y = planted_pairs(8000, linear=3.0)
    (x, xt), (y, yt) = x.split([6000, 2000]), y.split([6000, 2000])  # held-out pairs of the same maps
    base = TrainConfig(k=3, expansion=4, lr=4e-3, batch_size=256, epochs=6, target_hookpoint="out",
                       checkpoint_every=0, log_every=1000)  # fmt: skip
    plain, skip = train_pairs([base, dataclasses.replace(base, skip=True)], x, y)
    assert plain.cfg.d_out == D_OUT and plain.cfg.target_hookpoint == "out" and skip.cfg.skip
    f_plain, f_skip = fvu(plain, xt, yt), fvu(skip, xt, yt)
    assert f_plain < 0.6  # far below 1 (predicting the mean): the sparse map is learnt from the input
    assert f_skip < 0.5 * f_plain  # the dense linear part goes through the skip path, not the 3 latents
    l0 = float((skip.encode(xt).top_acts_BK > 0).sum(1).float().mean())
    assert l0 <= 3


def test_a_transcoders_checkpoint_records_both_hookpoints_d_out_and_the_skip(tmp_path: Path) -> None:
    sae = randomised(tc_config("jumprelu", skip=True))
    sae_lib.save(sae, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_out"], cfg["hookpoint"], cfg["target_hookpoint"], cfg["skip"]) == (
        D_IN, D_OUT, "in", "t", True,
    )  # fmt: skip
    back = sae_lib.load(tmp_path / "tc")
    x = torch.randn(8, D_IN)
    torch.testing.assert_close(back.reconstruct(x)[0], sae.eval().reconstruct(x)[0])
    # an SAE's cfg.json (and so its params hash) has no transcoder fields
    plain = build(SAEConfig("topk", 8, 32, k=4, hookpoint="h"))
    assert set(plain.cfg.to_json()) == {"architecture", "d_in", "d_sae", "hookpoint", "model", "k"}


@pytest.mark.bad_input
def test_transcoder_settings_without_a_target_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"give --train.target-hookpoint too"):
        TrainConfig(skip=True)
    with pytest.raises(ConfigError, match=r"resample.method none"):
        TrainConfig(target_hookpoint="layers.1.mlp", resample=ResampleConfig(method="anthropic"))
    with pytest.raises(SAEError, match="config needs d_out > 0"):
        SAEConfig("topk", 8, 32, k=4, skip=True)
    x = torch.randn(600, 8)
    with pytest.raises(TrainError, match="trains on \\(input, target\\) pairs"):
        train_many(x, [TrainConfig(k=4, batch_size=128, target_hookpoint="out")], 0)


# --- evaluation on the tiny model ------------------------------------------------------------------------------

IN_HP, UP_HP, MLP_HP = (
    "model.layers.1.post_attention_layernorm",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp",
)


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path):
    from saelab.models.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def windows(lm, corpus_file: Path):
    from saelab.config import DataConfig
    from saelab.data.windows import read_held_out

    return read_held_out(DataConfig(dataset=str(corpus_file), ctx_len=32), lm.tokenizer, 0).windows


def exact_linear_transcoder(lm, target: str = UP_HP) -> sae_lib.SAE:
    """A skip transcoder equal to up_proj (a linear map of the norm's output): W_skip = W_up^T, latents off."""
    up = dict(lm.model.named_modules())[target].weight.detach()  # [O, D]
    cfg = SAEConfig("topk", up.shape[1], 64, k=4, hookpoint=IN_HP, target_hookpoint=target, d_out=up.shape[0],
                    skip=True)  # fmt: skip
    sae = build(cfg)
    with torch.no_grad():
        sae.W_skip_DO.copy_(up.T)
        sae.b_enc_F.fill_(-1e4)  # no latent fires: the prediction is the skip path alone
        sae.b_dec_D.zero_()
    return sae.eval()


def test_a_transcoder_equal_to_its_target_module_scores_one_and_zero_fvu(lm, windows) -> None:
    from saelab.config import EvalConfig
    from saelab.eval.transcoder import evaluate_models

    exact = exact_linear_transcoder(lm)
    off = exact_linear_transcoder(lm)
    with torch.no_grad():
        off.W_skip_DO.mul_(0.5)  # half the module's output: a worse replacement
    cfg = EvalConfig(n_windows=4, n_ce_windows=2, batch_size=4, ce_batch_size=2)
    (good, half), reads = evaluate_models(lm, [exact, off], windows, IN_HP, cfg)
    assert reads[0].input == IN_HP and reads[0].target == UP_HP
    assert good.explained_variance == pytest.approx(1.0, abs=1e-5) and good.mse < 1e-8
    assert good.ce_sae == pytest.approx(good.ce_clean, abs=1e-5) and good.kl_sae == pytest.approx(0, abs=1e-5)
    assert good.ce_loss_score == pytest.approx(1.0, abs=1e-4)
    assert good.l0 == 0 and good.dead_fraction == 1.0
    # halving the output: FVU = 0.25 * E||y||^2 / Var(y) > 0 and a KL away from 0; one zero ablation for both
    assert half.explained_variance < 0.99
    assert half.kl_sae > 1e-7 and half.kl_sae > 10 * abs(good.kl_sae)
    assert half.ce_zero_ablation == good.ce_zero_ablation != good.ce_clean


@pytest.mark.bad_input
def test_a_transcoder_whose_target_the_model_lacks_or_is_not_d_out_wide_is_refused_in_one_line(
    lm, windows
) -> None:
    from saelab.config import EvalConfig
    from saelab.eval.transcoder import evaluate_models

    cfg = EvalConfig(n_windows=2, n_ce_windows=1)
    sae = exact_linear_transcoder(lm)
    lacks = build(dataclasses.replace(sae.cfg, target_hookpoint="model.layers.1.mlp.nothing"))
    with pytest.raises(SAEError, match=r"target hookpoint .model.layers.1.mlp.nothing. is not a module"):
        evaluate_models(lm, [lacks], windows, IN_HP, cfg)
    wrong = build(dataclasses.replace(sae.cfg, target_hookpoint=MLP_HP))  # 32 wide, d_out 64
    with pytest.raises(SAEError, match=r"model.layers.1.mlp is 32 wide but the transcoder's d_out is 64"):
        evaluate_models(lm, [wrong], windows, IN_HP, cfg)


@pytest.mark.bad_input
def test_a_transcoder_where_an_sae_is_expected_or_with_an_end_its_file_does_not_name_is_refused(
    lm, windows, tmp_path: Path
) -> None:
    """The MLP's input and output are both 32 wide here, so only the model's kind can stop SAE metrics (the
    prediction of the MLP's output scored against its input). A sparsify transcoder names only the module it
    rebuilds: outside the Llama layout its input is unknown, and evaluation says where to write it."""
    from saelab.config import EvalConfig
    from saelab.eval.core import evaluate_many
    from saelab.eval.transcoder import evaluate_models
    from saelab.sae.formats import export_sae, import_sae

    cfg = EvalConfig(n_windows=2, n_ce_windows=1)
    tc = build(SAEConfig("topk", 32, 64, k=4, hookpoint=IN_HP, target_hookpoint=MLP_HP, d_out=32)).eval()
    line = f"a transcoder ({IN_HP} -> {MLP_HP}) was given where an SAE of {IN_HP} is expected; `saelab eval`"
    with pytest.raises(SAEError, match=f"^{re.escape(line)}"):
        evaluate_many(lm, [tc], windows, IN_HP, cfg)
    export_sae(tc, tmp_path / "h.1.c_fc", "sparsify")
    doc = json.loads((tmp_path / "h.1.c_fc" / "cfg.json").read_text())
    del doc["input_hookpoint"]
    (tmp_path / "h.1.c_fc" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(SAEError, match=r"^the transcoder's input hookpoint is not recorded in its checkpoint; "
                                       r"write it into the file \(sparsify: `input_hookpoint`"):  # fmt: skip
        evaluate_models(lm, [import_sae(tmp_path / "h.1.c_fc")], windows, IN_HP, cfg)


def test_matched_l0_compares_only_models_reconstructing_the_same_hookpoint() -> None:
    from saelab.eval.matched_l0 import mark_dominated

    entries = [
        {"name": "tc", "l0": 32, "explained_variance": 0.6, "reconstructs": "mlp"},
        {"name": "sae-mlp", "l0": 32, "explained_variance": 0.5, "reconstructs": "mlp"},
        {
            "name": "sae-in",
            "l0": 16,
            "explained_variance": 0.4,
            "reconstructs": "norm",
        },  # better L0, other target
    ]
    flags = {e["name"]: e["dominated_ev"] for e in mark_dominated(entries)}
    assert flags == {"tc": False, "sae-mlp": True, "sae-in": False}


@pytest.mark.bad_input
def test_a_transcoder_a_format_cannot_hold_is_refused_by_the_converter_in_one_line(
    tmp_path: Path, capsys
) -> None:
    """A TopK skip transcoder 12 -> 20 wide: SAELens has no TopK transcoder, sparsify's write their input's width,
    dictionary_learning has none (tests/test_transcoder_formats.py: what each format holds)."""
    from saelab.cli import main

    sae_lib.save(randomised(tc_config("topk", skip=True)), tmp_path / "tc")
    why = {
        "saelens": "SAELens has no topk transcoder",
        "sparsify": "d_out=20 differs from d_in=12",
        "dictionary_learning": "dictionary_learning has no transcoder layout",
    }
    for fmt, reason in why.items():
        assert (
            main(["convert", "--src", str(tmp_path / "tc"), "--dst", str(tmp_path / fmt), "--to", fmt]) == 1
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"saelab: SAEError: the {fmt} format cannot hold this topk transcoder (in -> t, skip): {reason}"
        ), err
        assert err[0].endswith("formats that can: saelab")
        assert not (tmp_path / fmt).exists()


def tiny_run_args(model: Path, corpus: Path) -> list[str]:
    return [
        "--model.name", str(model), "--data.dataset", str(corpus), "--data.ctx-len", "32",
        "--collect.n-train-tokens", "1024", "--collect.batch-size", "4",
        "--collect.hookpoint", "layers.1.post_attention_layernorm",
    ]  # fmt: skip


TINY_TRAIN = ["--train.batch-size", "128", "--train.stream-buffer-rows", "512", "--train.epochs", "1"]


@pytest.mark.bad_input
def test_a_stored_run_or_a_target_the_model_lacks_is_refused_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys
) -> None:
    from saelab.cli import main

    stored = tmp_path / "stored"
    assert main(["collect", "--run-dir", str(stored), *tiny_run_args(tiny_model_dir, corpus_file)]) == 0
    capsys.readouterr()
    assert (
        main(["train", "--run-dir", str(stored), *TINY_TRAIN, "--train.target-hookpoint", "layers.1.mlp"])
        == 1
    )
    err = [
        ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("saelab: ")
    ]  # not progress bars
    assert len(err) == 1 and "--collect.format stream" in err[0]
    assert not (stored / "sae").exists()
    args = [
        *tiny_run_args(tiny_model_dir, corpus_file),
        *TINY_TRAIN,
        "--train.target-hookpoint",
        "layers.1.nothing",
    ]
    assert main(["train", "--run-dir", str(tmp_path / "new"), "--collect.format", "stream", *args]) == 1
    err = [
        ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("saelab: ")
    ]  # not progress bars
    assert len(err) == 1 and "'layers.1.nothing' is not a module of this model" in err[0]


def test_cache_sample_explain_score_and_report_run_unchanged_on_a_transcoder_run(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    """A transcoder latent fires at its input's position: the latent cache encodes the input hookpoint's
    activations, and the report names the transcoder with both hookpoints."""
    from saelab.cli import main
    from saelab.latents.cache import LatentCache

    run = str(tmp_path / "r")
    train = [
        *TINY_TRAIN,
        "--train.expansion",
        "2",
        "--train.k",
        "4",
        "--train.target-hookpoint",
        "layers.1.mlp",
    ]
    args = [*tiny_run_args(tiny_model_dir, corpus_file), "--collect.format", "stream", *train]
    assert main(["train", "--run-dir", run, *args]) == 0
    assert main(["cache", "--run-dir", run, "--cache.dataset-split", "eval"]) == 0
    sample = ["--sample.n-latents", "3", "--sample.min-examples", "6", "--sample.n-examples-train", "3",
              "--sample.n-examples-test", "3", "--sample.n-non-activating", "3", "--sample.n-non-activating-train",
              "2", "--sample.example-ctx-len", "8", "--sample.n-quantiles", "1", "--sample.n-candidates", "10"]  # fmt: skip
    assert main(["sample", "--run-dir", run, *sample]) == 0
    assert main(["explain", "--run-dir", run, "--explain.explainers", "token_stats"]) == 0
    assert main(["eval", "--run-dir", run, "--eval.n-windows", "2", "--eval.n-ce-windows", "1"]) == 0
    assert main(["report", "--run-dir", run]) == 0
    sae = sae_lib.load(tmp_path / "r" / "sae")
    cache = LatentCache.open(tmp_path / "r" / "latents")
    assert cache.info.d_sae == sae.cfg.d_sae and sae.cfg.is_transcoder
    # the cached latents are the transcoder's latents of the input hookpoint at the same (window, position)
    from saelab.data.windows import TokenWindows
    from saelab.models.loading import capture, forward_until, load_model

    lm = load_model(str(tiny_model_dir))
    windows = TokenWindows.load_run(tmp_path / "r")
    ids = torch.as_tensor(windows.tokens[cache.window_N], dtype=torch.long)
    with torch.inference_mode(), capture(lm.model, [IN_HP]) as store:
        forward_until(lm.model, ids)
    x = store[IN_HP][torch.arange(len(ids)), torch.as_tensor(cache.pos_N, dtype=torch.long)]
    torch.testing.assert_close(torch.as_tensor(cache.dense()), sae.dense_latents(x), rtol=1e-4, atol=1e-4)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "topk transcoder: reads `model.layers.1.post_attention_layernorm`" in report
    assert "reconstructs `model.layers.1.mlp`" in report


@pytest.mark.resume
def test_a_stopped_skip_transcoder_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    from support_train import StepCounter, Stopped

    x, y = planted_pairs(2048, linear=1.0)
    cfg = TrainConfig(k=3, expansion=4, batch_size=256, epochs=2, target_hookpoint="out", skip=True,
                      checkpoint_every=3, log_every=1000)  # fmt: skip

    def run(c: TrainConfig, ckpt: Path, hook: StepCounter | None = None) -> sae_lib.SAE:
        source = PairedTensorSource(x, y, hookpoints=["in", "out"])
        return train_many(source, [c], 0, checkpoint_dirs=[ckpt], step_hook=hook, target_slots=[1])[0].sae

    straight = run(cfg, tmp_path / "a")
    with pytest.raises(Stopped):
        run(cfg, tmp_path / "b", StepCounter(stop_at=7))  # the last checkpoint is at step 6
    resumed = run(dataclasses.replace(cfg, resume=True), tmp_path / "b")
    for name, t in straight.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name  # b_in_D, W_skip and both scales' folding


@pytest.mark.bad_input
def test_eval_extra_saes_reads_a_peers_transcoder_and_names_an_end_its_file_lacks(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys
) -> None:
    """`saelab eval --eval.extra-saes` on a run collected at an SAE's hookpoint: a SAELens transcoder whose file
    does not name its output hookpoint is refused in one line that says where to write it; a sparsify skip
    transcoder in a folder named the sparsify way (`layers.1.mlp`, the input the norm before it) is evaluated
    at its own hookpoints."""
    from saelab.cli import main
    from saelab.sae.formats import export_sae

    run = tmp_path / "run"
    assert main(["collect", "--run-dir", str(run), *tiny_run_args(tiny_model_dir, corpus_file)]) == 0
    eval_args = ["eval", "--run-dir", str(run), "--eval.n-windows", "2", "--eval.n-ce-windows", "1"]
    tc_cfg = SAEConfig("relu", 32, 64, hookpoint="model.layers.1.post_attention_layernorm",
                       target_hookpoint="model.layers.1.mlp", d_out=32, skip=True)  # fmt: skip
    export_sae(build(tc_cfg).eval(), tmp_path / "sl", "saelens")
    doc = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    del doc["metadata"]["hook_name_out"]
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([*eval_args, "--eval.extra-saes", str(tmp_path / "sl")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("saelab: ")]
    assert (
        len(err) == 1 and "the transcoder's target hookpoint is not recorded in its checkpoint" in err[0]
    ), err
    assert "SAELens: `metadata.hook_name_out`" in err[0]
    sparsify_tc = build(dataclasses.replace(tc_cfg, architecture="topk", k=4)).eval()
    folder = tmp_path / "sp" / "layers.1.mlp"
    export_sae(sparsify_tc, folder, "sparsify")
    doc = json.loads((folder / "cfg.json").read_text())
    del doc["input_hookpoint"]
    (folder / "cfg.json").write_text(json.dumps(doc))
    assert main([*eval_args, "--eval.extra-saes", str(folder)]) == 0
    summary = json.loads((run / "manifest.json").read_text())["stages"]["eval"]["summary"]
    assert (summary["kind"], summary["hookpoint"], summary["reconstructs"]) == (
        "skip transcoder", "model.layers.1.post_attention_layernorm", "model.layers.1.mlp",
    )  # fmt: skip
