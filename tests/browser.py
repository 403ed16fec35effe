"""Headless Chromium for the report-render tests: Debian's chromium driven by playwright's bundled driver.

No browser download (`playwright install` is never run): the tests use /usr/bin/chromium (or $SAELAB_CHROMIUM),
which `.ci/run` installs with apt. Without it the tests skip with the reason, unless SAELAB_REQUIRE_BROWSER=1
(`make test` sets it), where they fail.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return os.environ.get("SAELAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """The chromium executable, or skip (fail under SAELAB_REQUIRE_BROWSER=1) with the reason."""
    reason = None
    path = chromium_path()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and path is None:
        reason = "chromium not found (apt-get install -y chromium, or set SAELAB_CHROMIUM)"
    if reason is not None:
        if os.environ.get("SAELAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (SAELAB_REQUIRE_BROWSER=1 requires it)")
        pytest.skip(reason)
    assert path is not None
    return path


@dataclass(frozen=True)
class Rendered:
    png: Path
    """Full-page screenshot."""
    pixels: np.ndarray
    """The screenshot as an H x W x channels float array in [0, 1]."""
    images: list[tuple[int, int, int, int, int]]
    """Each <img>: (x, y, width, height, naturalWidth) in page pixels."""


@contextlib.contextmanager
def chromium_page(width: int = 1200) -> Iterator[Any]:
    """A page of Debian's Chromium, headless, with a fresh profile (skips or fails as `require_browser` says)."""
    from playwright.sync_api import sync_playwright

    exe = require_browser()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": width, "height": 900},
        )
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def render(html: Path, png: Path, width: int = 1200) -> Rendered:
    """Open `html` in headless Chromium, screenshot the full page to `png`, locate every <img>."""
    import matplotlib.image as mpimg

    with chromium_page(width) as page:
        page.goto(html.resolve().as_uri())
        page.wait_for_load_state("load")
        boxes = page.eval_on_selector_all(
            "img",
            "els => els.map(e => { const r = e.getBoundingClientRect();"
            " return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height, e.naturalWidth]; })",
        )
        page.screenshot(path=str(png), full_page=True)
    pixels = mpimg.imread(io.BytesIO(png.read_bytes()), format="png")
    return Rendered(png, pixels, [tuple(round(v) for v in b) for b in boxes])  # type: ignore[misc]


def region_std(pixels: np.ndarray, box: tuple[int, int, int, int, int]) -> float:
    """Pixel standard deviation (RGB) inside one image's box of the screenshot: ~0 for a blank plot."""
    x, y, w, h, _ = box
    crop = pixels[y : y + h, x : x + w, :3]
    return float(crop.std()) if crop.size else 0.0
