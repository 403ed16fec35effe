"""benchmarks/gpu_check.py: without CUDA it skips with one line and exit 0; its measuring path (saelab trained on
the fly, the matmul floor, the ratio between them) runs on CPU with the test model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is for machines without CUDA")
def test_without_cuda_it_skips_with_one_line_and_exit_0() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped: no CUDA device"), proc.stdout


def test_the_measuring_path_runs_on_cpu_with_the_test_model(tiny_model_dir: Path, corpus_file: Path) -> None:
    gpu_check = load_gpu_check()
    res = gpu_check.measure(
        str(tiny_model_dir),
        str(corpus_file),
        "cpu",
        d_sae=128,
        k=4,
        batch=64,
        tokens=256,
        ctx_len=32,
        peer=False,
    )
    floor = res["matmul_floor"]
    assert floor["forward_seconds"] <= floor["forward_backward_seconds"]
    for name, kernels in (("saelab", "auto"), ("saelab_sparse", "sparse")):
        s = res[name]
        assert s["kernels"] == kernels and s["selection"] in ("float32", "bfloat16")
        assert s["d_sae"] == 128 and s["steps"] == 4 and s["trained_tokens"] == 256
        assert s["sae_dtype"] == "torch.float32" and s["trained_tokens_per_second"] > 0
        assert res[f"{name}_over_matmul_floor"] == pytest.approx(
            s["trained_tokens_per_second"] / floor["forward_backward_tokens_per_second"]
        )
