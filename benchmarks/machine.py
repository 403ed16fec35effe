"""What a benchmark records about the machine it ran on (its results are ratios measured in one run, but the
load and the CPU say how far to trust them)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine_facts(threads: int, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """CPU, cores, torch threads and version, and the load average before the run and now."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
