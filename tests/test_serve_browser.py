"""The feature browser end to end in headless Chromium (Debian's chromium, driven by Playwright; see browser.py).

Open the list, search an explanation, open the latent, check its highlighted tokens (activation colour and a hover
value) and its scores, screenshot the page; the explanation holding a <script> tag shows as text and runs nothing.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from browser import CHROMIUM_ARGS, require_browser
from test_serve import SCRIPT, runs, url  # noqa: F401  (fixtures)

from saelab.explain import load_explanations


@pytest.fixture()
def page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    exe = require_browser()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 900},
        )
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def test_search_open_latent_and_screenshot(
    page: object,
    url: str,  # noqa: F811
    runs: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    import matplotlib.image as mpimg
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url + "run/a/")
    rows = page.locator("tr.latent-row")
    assert rows.count() > 1
    # search an explanation: the list narrows to the latent explained with a script tag, shown as text
    page.fill("#search", "alert(1)")
    page.click("#apply")
    page.wait_for_load_state("load")
    latent = load_explanations(runs[0] / "explain" / "explanations.jsonl")[0].latent
    expect(rows).to_have_count(1)
    expect(page.locator("tr.latent-row .explanation").first).to_contain_text("<script>alert(1)</script>")
    page.click("a.latent-link")
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/run/a/latent/{latent}")
    expect(page.locator("#explanations")).to_contain_text(SCRIPT)
    # highlighted tokens: the activation colour and the value on hover
    acts = page.locator("span.act")
    assert acts.count() > 0
    first = acts.first
    assert float(first.get_attribute("title") or "nan") > 0
    assert "(255, 120, 0" in first.evaluate("e => getComputedStyle(e).backgroundColor")
    first.hover()
    # scores and judgements
    assert page.locator("#scores tr.score-row").count() > 0
    assert page.locator("td.judgement.correct, td.judgement.incorrect").count() > 0
    assert page.locator("#histogram rect").count() > 0
    png = tmp_path / "latent.png"
    page.screenshot(path=str(png), full_page=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] >= 900 and float(np.asarray(pixels)[..., :3].std()) > 0.05  # not one flat colour
    orange = (
        (pixels[..., 0] > 0.9) & (pixels[..., 1] > 0.4) & (pixels[..., 1] < 0.85) & (pixels[..., 2] < 0.6)
    )
    assert orange.sum() > 50, "no highlighted token drawn"
    assert dialogs == [], "a script from run data ran"
