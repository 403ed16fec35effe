"""Property-based tests (hypothesis) of config parsing: any value typed on the command line is either taken as it
is, or refused with an error that names the setting, before any work; configs survive the manifest round trip.

The accepted ranges below are written from the settings' documentation, independently of the checks in
saelab/config/, so a check that lets a bad value through (or refuses a good one) fails here."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from saelab.cli import main
from saelab.config import (
    CacheConfig,
    ConfigError,
    JumpReLUConfig,
    MatryoshkaConfig,
    ResampleConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    from_dict,
    to_dict,
)

pytestmark = pytest.mark.bad_input


def finite(v: float) -> bool:
    return math.isfinite(v)


# (stage, flag, the setting's name in errors, value kind, accepted when)
FIELDS: list[tuple[str, str, str, str, Callable[[float], bool]]] = [
    ("train", "--train.k", "train.k", "int", lambda v: v > 0),
    ("train", "--train.expansion", "train.expansion", "int", lambda v: v >= 1),
    ("train", "--train.batch-size", "train.batch_size", "int", lambda v: v > 0),
    ("train", "--train.lr", "train.lr", "float", lambda v: finite(v) and v > 0),
    ("train", "--train.auxk-coef", "train.auxk_coef", "float", lambda v: finite(v) and v >= 0),
    ("train", "--train.l1-coef", "train.l1_coef", "float", lambda v: finite(v) and v >= 0),
    (
        "train",
        "--train.jumprelu.bandwidth",
        "train.jumprelu.bandwidth",
        "float",
        lambda v: finite(v) and v > 0,
    ),
    ("train", "--train.resample.every", "train.resample.every", "int", lambda v: v > 0),
    ("cache", "--cache.n-tokens", "cache.n_tokens", "int", lambda v: v >= 0),
    ("cache", "--cache.buffer-nnz", "cache.buffer_nnz", "int", lambda v: v >= 16),
    ("sample", "--sample.n-latents", "sample.n_latents", "int", lambda v: v > 0),
    ("eval", "--eval.dense-threshold", "eval.dense_threshold", "float", lambda v: 0 < v <= 1),
    ("explain", "--llm.concurrency", "llm.concurrency", "int", lambda v: v > 0),
    ("explain", "--llm.temperature", "llm.temperature", "float", lambda v: finite(v) and v >= 0),
]

VALUES = {
    "int": st.integers(-(10**9), 10**9) | st.sampled_from([-1, 0, 1, 15, 16]),
    "float": st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1.0, 1e-12, -1e-12]),
}


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, err.getvalue()


@st.composite
def field_and_value(draw: st.DrawFn) -> tuple[tuple[str, str, str, str, Callable[[float], bool]], float]:
    field = draw(st.sampled_from(FIELDS))
    return field, draw(VALUES[field[3]])


EDGES = [
    (f, v)
    for f in FIELDS
    for v in ((0, -1, 10**9) if f[3] == "int" else (math.inf, -math.inf, math.nan, 0.0))
]


def with_edges(test: Callable[..., None]) -> Callable[..., None]:
    """Every field's edge values (infinities, nan, zero, -1) as explicit examples, whatever hypothesis draws."""
    for edge in EDGES:
        test = example(edge)(test)
    return test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@with_edges
@given(field_and_value())
def test_a_value_on_the_command_line_is_taken_or_refused_by_name(
    tmp_path_factory: pytest.TempPathFactory, fv
) -> None:  # type: ignore[no-untyped-def]
    (stage, flag, name, _, ok), value = fv
    missing = "/nonexistent-saelab-run"
    rc, err = run_cli([stage, "--run-dir", missing, flag, repr(value)])
    if ok(value):
        # parsed: the stage starts and stops at the missing run (no config error)
        assert rc == 1 and "manifest.json not found" in err, (value, err)
    else:
        assert rc == 2 and name in err, (value, err)


@settings(max_examples=60, deadline=None)
@given(
    st.builds(
        TrainConfig,
        architecture=st.sampled_from(["topk", "relu", "batchtopk", "jumprelu", "matryoshka"]),
        expansion=st.integers(1, 64),
        k=st.integers(1, 512),
        lr=st.floats(1e-7, 1.0),
        batch_size=st.integers(1, 8192),
        epochs=st.integers(1, 10),
        l1_coef=st.floats(0, 10),
        resample=st.builds(ResampleConfig, method=st.sampled_from(["none", "anthropic", "consistency"])),
        jumprelu=st.builds(JumpReLUConfig, bandwidth=st.floats(1e-4, 1.0)),
        matryoshka=st.sampled_from([MatryoshkaConfig(), MatryoshkaConfig((0.25, 1.0))]),
    ),
    st.builds(
        CacheConfig,
        n_tokens=st.integers(0, 10**9),
        quantiles=st.lists(st.floats(0, 1), min_size=1, max_size=8).map(tuple),
    ),
    st.builds(
        SampleConfig,
        n_latents=st.integers(1, 10**5),
        latents=st.lists(st.integers(0, 10**6), max_size=5).map(tuple),
    ),
)
def test_configs_survive_the_manifest_round_trip(
    train: TrainConfig, cache: CacheConfig, sample: SampleConfig
) -> None:
    cfg = RunConfig(train=train, cache=cache, sample=sample)
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_an_unknown_setting_in_a_manifest_is_named() -> None:
    data = to_dict(RunConfig())
    data["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="learning_rate"):
        from_dict(RunConfig, data)


def test_a_manifest_with_flat_architecture_settings_is_named() -> None:
    """A manifest from before the per-architecture sections (train.jumprelu_bandwidth, train.resample_every):
    a ConfigError naming the keys, as for any unknown setting, and one inside a section names it too."""
    data = to_dict(RunConfig())
    data["train"]["jumprelu_bandwidth"] = 0.05
    with pytest.raises(ConfigError, match=r"unknown TrainConfig fields \['jumprelu_bandwidth'\]"):
        from_dict(RunConfig, data)
    data = to_dict(RunConfig())
    data["train"]["resample"] = "anthropic"
    with pytest.raises(ConfigError, match=r"TrainConfig\.resample is a section of settings .*'anthropic'"):
        from_dict(RunConfig, data)
    data = to_dict(RunConfig())
    data["train"]["resample"]["every_steps"] = 10
    with pytest.raises(ConfigError, match=r"unknown ResampleConfig fields \['every_steps'\]"):
        from_dict(RunConfig, data)
