"""SCR and TPP against SAEBench's own code (sae-bench 0.6.0 in .venv-peers/saebench, `make peers`), on the same SAE,
model, data and seeds: the bundled model, a TopK SAE trained here at layer 15, the bundled SCR pair and TPP topics.

saelab computes the per-token activations once (the masked positions zeroed, SAEBench's convention) and hands
them to tests/peer_scripts/peer_saebench_scr.py, which runs SAEBench's probe training, attribution, ablation and
metric code on them (`run_eval_single_dataset`, `get_scr_plotting_dict`, `create_tpp_plotting_dict`), with the SAE
exported to SAELens's format and loaded by SAELens. The model forward itself is not compared: SAEBench collects
activations through TransformerLens from the hub, which nothing here may reach.

What must agree, and how closely:
1. Given SAEBench's trained probes, saelab's SCR per pair and n equals SAEBench's: both test every probe on the
   whole test set, so the same probe gives the same accuracies, equal to 1e-6 (SAEBench averages them in float32);
   the score divides their differences by acc_oracle - acc_biased, which can be 1/28, hence relative 1e-5 (`masked`: SAEBench with an encode that is 0
   at masked positions, which its ablation assumes; see `saelab.eval.scr_probes`).
2. SAEBench's attribution of the SCR probes equals saelab's `latent_effects` (relative 1e-4: float32 sums in
   another order), and for every probe its pooled activations ablated at n = 10 equal saelab's `ablate` (1e-4 of
   their scale): the identity saelab's pooled ablation rests on, on real activations.
3. TPP with SAEBench's probes, and SCR and TPP end to end (each library training its own probes: SAEBench keeps
   the best test epoch, saelab the last), agree within the reseed noise: |mean difference over the seeds| <=
   3 * sqrt(sd_a^2 / k + sd_b^2 / k) + 0.05. SAEBench draws TPP's negatives afresh (torch.randperm) for every
   accuracy it measures, and saelab once per seed, so these numbers differ by sampling alone; 3 standard errors
   of the difference of means, measured from the seeds themselves, is what "the same up to noise" means with k
   seeds, and 0.05 (1.6 texts of a 32-text TPP test set) covers a standard deviation estimated from 3 seeds
   coming out near 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.eval.scr_probes import LinearProbe, ablate, latent_effects, rows_of, top_n
from saelab.eval.scr_tpp import Features, ScrTppSettings, _scr_pair, _texts, _tpp, build_data, run_scr_tpp

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-peers" / "saebench"
SCRIPT = ROOT / "tests" / "peer_scripts" / "peer_saebench_scr.py"
SEEDS = (0, 1, 2)
N_CHECK = 10
TPP_KEYS = ("0", "1", "2", "6", "9")
"""SAEBench's TPP class keys for bias_in_bios class set 1, standing for the five Wikipedia topics in order."""
SCR_KEYS = {
    ("gender", "positives"): "male / female",
    ("gender", "negatives"): "female_data_only",
    ("profession", "positives"): "professor / nurse",
    ("profession", "negatives"): "nurse_data_only",
    ("biased", "positives"): "male_professor / female_nurse",
    ("biased", "negatives"): "female_nurse_data_only",
}
"""saelab's SCR sets -> SAEBench's keys for them."""

pytestmark = pytest.mark.slow


def require_env() -> None:
    if not (VENV / ".installed").exists():
        msg = ".venv-peers/saebench is missing or unfinished; `make peers` builds it"
        if os.environ.get("SAELAB_REQUIRE_PEERS") == "1":
            pytest.fail(f"{msg} (SAELAB_REQUIRE_PEERS=1 requires it)")
        pytest.skip(msg)


def token_acts(lm: Any, hookpoint: str, ids: list[list[int]], s: ScrTppSettings) -> torch.Tensor:
    """[N, ctx_len, D] activations, zero where pooling leaves a position out (first positions, special, padding)."""
    from saelab.models.loading import capture, forward_until

    special = sorted(set(lm.tokenizer.all_special_ids))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = []
    for start in range(0, len(ids), s.batch_size):
        batch = ids[start : start + s.batch_size]
        tokens = torch.full((len(batch), s.ctx_len), pad, dtype=torch.long)
        keep = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, x in enumerate(batch):
            tokens[row, : len(x)] = torch.as_tensor(x)
            keep[row, s.exclude_first : len(x)] = True
        keep &= ~torch.isin(tokens, torch.as_tensor(special))
        with torch.inference_mode(), capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, tokens)
        out.append(store[hookpoint].float() * keep[..., None])
    return torch.cat(out)


class Parity:
    def __init__(self, ours: Any, features: Features, data: list[Any], theirs: dict[str, Any],
                 tensors: dict[str, torch.Tensor], settings: ScrTppSettings) -> None:  # fmt: skip
        self.ours, self.features, self.data, self.theirs = ours, features, data, theirs
        self.tensors, self.settings = tensors, settings

    def probe(self, seed: int, kind: str, key: str) -> LinearProbe:
        w = self.tensors[f"{seed}/{kind}/w/{key}"].numpy()
        return LinearProbe(w, float(self.tensors[f"{seed}/{kind}/b/{key}"][0]))


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Parity:
    require_env()
    from saelab.activations.store import collect
    from saelab.config import DataConfig, TrainConfig
    from saelab.data.windows import build_windows
    from saelab.eval.probing_features import pooled_features, tokenize
    from saelab.models.loading import BUNDLED_SMOLLM2, load_model
    from saelab.sae.formats import export_sae
    from saelab.train.trainer import train

    tmp = tmp_path_factory.mktemp("scr-parity")
    lm = load_model(BUNDLED_SMOLLM2)
    hookpoint = "model.layers.15"
    windows = build_windows(DataConfig(max_docs=60, ctx_len=64), lm.tokenizer, seed=0)
    acts = collect(lm, windows, hookpoint, 4000, batch_size=16)
    sae = train(acts.acts_ND, TrainConfig(expansion=2, k=16, epochs=3, batch_size=256, checkpoint_every=0),
                seed=0).sae.eval()  # fmt: skip
    s = ScrTppSettings(n_values=(2, 5, 10, 20, 50, 100, 500), tpp_n_train=32, tpp_n_test=16, ctx_len=64)
    data = [build_data(s, seed) for seed in SEEDS]
    texts = list(dict.fromkeys(t for d in data for t in _texts(*d)))
    row_of = {t: i for i, t in enumerate(texts)}
    ids = tokenize(lm.tokenizer, texts, s.ctx_len)
    per_token = token_acts(lm, hookpoint, ids, s)
    features = Features(pooled_features(lm, sae, hookpoint, ids, s), row_of,
                        sae.W_dec_FD.detach().numpy(), ids)  # fmt: skip
    spec_acts: dict[str, torch.Tensor] = {}
    for seed, (pairs, tpp) in zip(SEEDS, data, strict=True):
        for split in ("train", "test"):
            for (kind, side), key in SCR_KEYS.items():
                rows = [row_of[t] for t in getattr(getattr(getattr(pairs[0], split), kind), side)]
                spec_acts[f"{seed}/scr/{split}/{key}"] = per_token[rows]
            for key, cls in zip(TPP_KEYS, getattr(tpp, split), strict=True):
                spec_acts[f"{seed}/tpp/{split}/{key}"] = per_token[[row_of[t] for t in cls]]
    save_file({k: v.contiguous() for k, v in spec_acts.items()}, tmp / "acts.safetensors")
    export_sae(sae, tmp / "sae", "saelens")
    spec = {"sae_folder": str(tmp / "sae"), "acts": str(tmp / "acts.safetensors"), "seeds": list(SEEDS),
            "n_values": list(s.n_values), "n_check": N_CHECK, "epochs": s.probe.epochs,
            "artifacts": str(tmp / "artifacts"), "out": str(tmp / "out.safetensors"),
            "metrics": str(tmp / "metrics.json")}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([str(VENV / "bin" / "python"), str(SCRIPT), str(tmp / "spec.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = run_scr_tpp(lm, sae, hookpoint, s, SEEDS)
    theirs = json.loads((tmp / "metrics.json").read_text())
    return Parity(ours, features, data, theirs, load_file(str(tmp / "out.safetensors")), s)


def test_scr_with_saebench_probes_equals_saebench(parity: Parity) -> None:
    for seed, (pairs, _) in zip(SEEDS, parity.data, strict=True):
        probes = {
            k: parity.probe(seed, "scr", SCR_KEYS[(k, "positives")])
            for k in ("gender", "profession", "biased")
        }
        ours = _scr_pair(pairs[0], parity.features, parity.settings, seed, probes)
        theirs = parity.theirs[f"{seed}/scr"]["masked"]["metrics"]
        for sc in ours.scores:
            for ours_v, key in ((sc.dir1, "dir1"), (sc.dir2, "dir2"), (sc.metric, "metric")):
                want = theirs[f"scr_{key}_threshold_{sc.n}"]
                assert ours_v == pytest.approx(want, rel=1e-5, abs=1e-6), (seed, sc)
        clean = parity.theirs[f"{seed}/scr"]["masked"]["clean"]
        assert ours.profession_acc == pytest.approx(clean["professor / nurse"], abs=1e-6)
        assert ours.biased_on_profession_acc == pytest.approx(
            clean["male_professor / female_nurse probe on professor / nurse data"], abs=1e-6
        )


def test_attribution_and_ablation_equal_saebench(parity: Parity) -> None:
    f = parity.features
    x_ND, z_NF, w_dec = f.pooled.lm_ND, f.pooled.sae_NF, f.W_dec_FD
    for seed, (pairs, tpp) in zip(SEEDS, parity.data, strict=True):
        for kind in ("gender", "profession"):
            key = SCR_KEYS[(kind, "positives")]
            rows = rows_of(getattr(pairs[0].train, kind), f.row_of)
            ours = latent_effects(z_NF[rows.idx_N], rows.y_N, parity.probe(seed, "scr", key), w_dec, scr=True)
            theirs = parity.tensors[f"{seed}/scr/effect/{key}"].numpy()
            assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
        test_sets = {SCR_KEYS[(k, side)]: getattr(getattr(pairs[0].test, k), side) for k, side in SCR_KEYS}
        test_sets.update(dict(zip(TPP_KEYS, tpp.test, strict=True)))
        for name, effect in ((k, v) for k, v in parity.tensors.items() if k.startswith(f"{seed}/")):
            if "/effect/" not in name:
                continue
            kind, key = name.split("/")[1], name.split("/effect/")[1]
            chosen = top_n(effect.numpy(), N_CHECK)
            for test_key in SCR_KEYS.values() if kind == "scr" else TPP_KEYS:
                rows = [f.row_of[t] for t in test_sets[test_key]]
                theirs = parity.tensors[f"{seed}/{kind}/ablated/{key}/{test_key}"].numpy()
                ours = ablate(x_ND[rows], z_NF[rows], w_dec, chosen)
                assert np.allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max()), (name, test_key)


def _within_noise(ours: list[float], theirs: list[float]) -> tuple[bool, str]:
    k = len(ours)
    se = np.sqrt(np.var(ours, ddof=1) / k + np.var(theirs, ddof=1) / k)
    diff = abs(np.mean(ours) - np.mean(theirs))
    return bool(
        diff <= 3 * se + 0.05
    ), f"saelab {np.mean(ours):+.3f} SAEBench {np.mean(theirs):+.3f} se {se:.3f}"


def test_tpp_with_saebench_probes_and_both_end_to_end_agree_within_the_reseed_noise(parity: Parity) -> None:
    report = []
    for n in parity.settings.n_values:
        with_their_probes = []
        for seed, (_, tpp) in zip(SEEDS, parity.data, strict=True):
            probes = [parity.probe(seed, "tpp", key) for key in TPP_KEYS]
            res = _tpp(tpp, parity.features, parity.settings, seed, probes)
            with_their_probes.append(
                float(np.mean([c.scores[parity.settings.n_values.index(n)].total for c in res]))
            )
        cases = {
            "TPP, SAEBench's probes": (with_their_probes, "tpp", f"tpp_threshold_{n}_total_metric"),
            "TPP end to end": (
                [r.tpp_metric[n] for r in parity.ours.seeds],
                "tpp",
                f"tpp_threshold_{n}_total_metric",
            ),
            "SCR end to end": (
                [r.scr_metric[n] for r in parity.ours.seeds],
                "scr",
                f"scr_metric_threshold_{n}",
            ),
        }
        for case, (ours, kind, key) in cases.items():
            theirs = [parity.theirs[f"{seed}/{kind}"]["masked"]["metrics"][key] for seed in SEEDS]
            plain = [parity.theirs[f"{seed}/{kind}"]["plain"]["metrics"][key] for seed in SEEDS]
            ok, line = _within_noise(ours, theirs)
            report.append(
                f"n={n:3d} {case:24s} {line}  (SAEBench unmasked {np.mean(plain):+.3f}) {'ok' if ok else 'FAR'}"
            )
    sys.stdout.write("\n".join(report) + "\n")
    assert all(line.endswith("ok") for line in report), "\n".join(report)
