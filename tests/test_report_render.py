"""Reports rendered in headless Chromium: the page screenshots to PNG and every plot in it shows something.

A plot counts as present when its <img> decoded (naturalWidth > 0) and the screenshot's pixels inside its box
vary (a blank or failed plot is one flat colour). The blank control shows the check can fail.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from browser import region_std, render, require_browser
from test_compare import fake_run
from test_report_predictions import two_models

from saelab.cli import main

MIN_STD = 0.03
"""Pixel std (0-1 scale) a real plot exceeds: white background with dark axes, text and coloured marks."""


def assert_plots_rendered(html: Path, png: Path, expected: int) -> None:
    page = render(html, png)
    assert png.stat().st_size > 10_000
    assert len(page.images) == expected == html.read_text().count("data:image/png;base64,")
    for box in page.images:
        assert box[4] > 0, f"image at {box[:2]} did not decode"
        assert box[2] > 100 and box[3] > 100, f"image at {box[:2]} is drawn too small: {box}"
        assert region_std(page.pixels, box) > MIN_STD, f"image at {box[:2]} is blank"


def test_predictions_report_renders_with_plots(tmp_path: Path) -> None:
    csv = two_models(tmp_path)
    assert main(["report", "--predictions", str(csv), "--out", str(tmp_path / "rep")]) == 0
    assert_plots_rendered(tmp_path / "rep" / "report.html", tmp_path / "page.png", expected=3)


def test_blank_plot_is_caught(tmp_path: Path) -> None:
    fig = plt.figure(figsize=(4, 3))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    blank = base64.b64encode(buf.getvalue()).decode()
    html = tmp_path / "blank.html"
    html.write_text(
        f"<!doctype html><html><body><h1>t</h1><img src='data:image/png;base64,{blank}'></body></html>"
    )
    page = render(html, tmp_path / "blank.png")
    assert len(page.images) == 1
    assert region_std(page.pixels, page.images[0]) < 0.005
    assert float(np.asarray(page.pixels).std()) > 0  # the heading is drawn, only the plot is blank


def test_missing_chromium_skips_unless_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAELAB_CHROMIUM", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    monkeypatch.delenv("SAELAB_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_browser()
    monkeypatch.setenv("SAELAB_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="SAELAB_REQUIRE_BROWSER=1 requires it"):
        require_browser()


def test_compare_report_renders_with_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f1 = rng.uniform(0.2, 0.8, 20)
    a = fake_run(tmp_path / "a", f1, sae=(10.0, 0.7))
    b = fake_run(tmp_path / "b", np.clip(f1 + 0.1, 0, 1), sae=(20.0, 0.8))
    c = fake_run(tmp_path / "c", np.clip(f1 - 0.1, 0, 1), sae=(15.0, 0.75))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), str(c), "--out", str(out), "--compare.n-boot", "200"]) == 0
    assert len((out / "ranking.csv").read_text().splitlines()) == 1 + 3  # header, one row per run
    html = out / "report.html"
    assert_plots_rendered(
        html, tmp_path / "page.png", expected=html.read_text().count("data:image/png;base64,")
    )


@pytest.mark.bad_input
def test_markdown_escapes_html_in_text(tmp_path: Path) -> None:
    """Markdown viewers render raw HTML: a tag in a paragraph, a heading or a table cell (an LLM's explanation, a run
    name) reaches report.md escaped, as it reaches report.html; Markdown's own marks are kept."""
    from saelab.report.doc import Doc, write_documents

    script = "<script>alert(1)</script>"
    doc = Doc(f"run {script}")
    doc.heading(f"h {script}")
    doc.para(f"`code` and **bold** & {script}")
    doc.table(["explanation", "a|b"], [[script, "x & y"], ["F1 > 0.3", "<b>"]])
    md_path, html_path = write_documents(doc, tmp_path)
    md = md_path.read_text()
    assert "<script" not in md and "<script" not in html_path.read_text()
    assert "# run &lt;script>alert(1)&lt;/script>" in md and "## h &lt;script>" in md
    assert "`code` and **bold** &amp; &lt;script>" in md
    assert "| F1 > 0.3 | &lt;b> |" in md
    assert "| explanation | a\\|b |" in md and "| &lt;script>alert(1)&lt;/script> | x &amp; y |" in md
