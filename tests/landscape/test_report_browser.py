"""The HTML report: self-contained, deterministic, and it really renders in headless Chromium.

The browser half needs /usr/bin/chromium (.ci/run installs it) and Playwright's Python
package; it is skipped only when the browser cannot be started at all.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import plotly.offline
import pytest

from landscape.draw.report import contour_figure, report_html, surface_figure, table_html
from landscape.surface import Surface

CHROMIUM = "/usr/bin/chromium"
# Offline, quiet Chromium; SwiftShader gives WebGL without a GPU, which 3D plotly surfaces need.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def quadratic(scale: float, method: str, n: int = 21) -> Surface:
    alphas, betas = np.linspace(-1.0, 1.0, n), np.linspace(-1.0, 1.0, n)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")  # (nx, ny)
    loss = 0.3 + scale * (grid_a**2 + 0.5 * grid_b**2)
    return Surface(alphas, betas, loss, 1.0 / (1.0 + loss), {"method": method, "directions": "gradient"})


SURFACES = {"pt": quadratic(3.0, "pt"), "ptp-rn": quadratic(1.5, "ptp-rn"), "ptp-adv": quadratic(0.8, "ptp-adv")}
TABLES = {
    "Sharpness (mean ± 95% CI over seeds)": [
        {"method": "pt", "grid_sharpness": 3.1, "ci": "[2.8, 3.4]", "n": 5},
        {"method": "ptp-adv", "grid_sharpness": 0.41, "ci": "[0.35, 0.47]", "n": 5}],
    "Tests": "| comparison | p (Welch) |\n|---|---|\n| pt vs ptp-adv | 0.003 |",
}
METADATA = {"model": "minilm", "task": "rotten_tomatoes", "directions": "gradient (filter-normalized)",
            "seed": 0, "examples": 256, "date": "2024-01-01"}
FIGURES = 2  # one figure of 3D scenes (one per method) + one figure of contours


def make_report(**kwargs) -> str:
    return report_html(SURFACES, TABLES, METADATA, **kwargs)


def without_plotly_js(page: str) -> str:
    """The page minus the inline plotly.js bundle (whose source mentions CDNs, NaN, ...)."""
    bundle = plotly.offline.get_plotlyjs()
    assert page.count(bundle) == 1, "plotly.js must be inlined exactly once"
    return page.replace(bundle, "")


def test_report_is_self_contained_and_deterministic() -> None:
    full = make_report()
    assert full == make_report()  # fixed div ids, no timestamps
    page = without_plotly_js(full)
    assert page.count("<script") >= FIGURES + 1 and "Plotly.newPlot" in page
    assert not re.search(r"<script[^>]+src=", page), "external script"
    assert "cdn.plot.ly" not in page and "<link" not in page
    for value in ("minilm", "rotten_tomatoes", "[2.8, 3.4]", "pt vs ptp-adv", "0.003", "ptp-adv"):
        assert value in page
    assert "accuracy=%{customdata" in page  # hover carries accuracy


def test_missing_points_become_gaps() -> None:
    surface = quadratic(1.0, "pt")
    surface.loss[0, :3] = np.nan
    surface.accuracy[0, :3] = np.nan
    page = report_html({"pt": surface})
    assert "NaN" not in without_plotly_js(page)  # JSON null, which plotly draws as a gap


def test_many_methods_wrap_three_per_row() -> None:
    many = {f"method{k}": quadratic(0.5 + k, f"method{k}") for k in range(5)}
    surfaces, contours = surface_figure(many, (0.3, 6.0)), contour_figure(many, (0.3, 6.0))
    assert len(surfaces.data) == 5 and surfaces.layout.scene5.domain.y[1] < surfaces.layout.scene1.domain.y[0]
    assert surfaces.layout.height > surface_figure(SURFACES, (0.3, 6.0)).layout.height
    assert [t.showscale for t in surfaces.data] == [True] + [False] * 4  # one shared colour bar
    assert sum(trace.type == "contour" for trace in contours.data) == 5
    with pytest.raises(ValueError, match="1D surface"):
        report_html({"pt": Surface(np.linspace(-1, 1, 5), np.zeros(1), np.ones((5, 1)), np.ones((5, 1)))})


def test_table_html_formats() -> None:
    html_table = table_html([{"a": 1.23456789, "b": math.nan, "c": "<x>"}])
    assert "<th>a</th>" in html_table and "1.235" in html_table and "–" in html_table and "&lt;x&gt;" in html_table
    markdown = table_html("| x | y |\n|:--|--:|\n| 1 | 2 |")
    assert markdown.count("<tr>") == 2 and "<td>2</td>" in markdown
    assert table_html("<table><tr><td>kept</td></tr></table>").startswith("<table>")
    assert table_html("free text").startswith("<pre>")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing; install it with `apt-get install -y chromium` (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright's Python package is missing; pip install playwright")
    try:
        manager = sync_playwright().start()
        chromium = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as error:  # driver or browser failed to start: nothing to test with
        pytest.skip(f"headless Chromium could not start: {str(error).splitlines()[0]}")
    yield chromium
    chromium.close()
    manager.stop()


def test_report_renders_offline_in_chromium(browser, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    report.write_text(make_report())
    page = browser.new_page(viewport={"width": 1300, "height": 1600})
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {FIGURES}",
                           timeout=20_000)
    page.wait_for_timeout(500)  # let WebGL finish its first frame

    assert page.locator(".js-plotly-plot").count() == FIGURES
    for index in range(FIGURES):
        assert page.locator(".js-plotly-plot").nth(index).locator(".main-svg").count() > 0
    assert page.locator("#surfaces canvas").count() > 0, "no WebGL canvas for the 3D surfaces"
    assert page.locator("#surfaces .gl-container").count() == 1
    assert "WebGL is not supported" not in page.inner_text("body")
    assert page.locator("#contours .contour").count() == len(SURFACES)
    assert errors == [], f"console errors: {errors}"
    foreign = [url for url in requests if not url.startswith(("file:", "data:", "about:"))]
    assert foreign == [], f"network requests: {foreign}"

    _assert_hover_shows_accuracy(page)
    _assert_surfaces_drawn(page, tmp_path)
    page.close()


def _assert_surfaces_drawn(page, tmp_path: Path) -> None:
    """The 3D panels really contain the surface: dark viridis pixels (low loss) left of the colour bar."""
    from PIL import Image

    shot = tmp_path / "surfaces.png"
    page.locator("#surfaces").screenshot(path=str(shot))
    image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(int)  # (H, W, 3)
    panels = image[:, : int(image.shape[1] * 0.85)]  # exclude the colour bar, which is SVG
    red, green, blue = panels[..., 0], panels[..., 1], panels[..., 2]
    dark_purple = (red < 110) & (green < 80) & (blue > 60) & (blue > green + 20)
    assert dark_purple.mean() > 0.01, f"3D surfaces look empty ({dark_purple.mean():.4f} of pixels are surface)"


def _assert_hover_shows_accuracy(page) -> None:
    """Hovering over the first 3D scene shows α, β, loss and accuracy of the point under the mouse."""
    box = page.locator("#surfaces").bounding_box()
    # gl3d puts its label in a .hovertext group of its own svg, outside .hoverlayer.
    hover_js = "Array.from(document.querySelectorAll('#surfaces .hovertext')).map(e => e.textContent).join('')"
    pattern = r"ptα=(-?[\d.]+)β=(-?[\d.]+)loss=([\d.]+)accuracy=([\d.]+)"
    # Inside scene 1 (x < 0.32 of the width); retried because SwiftShader's first frames are slow.
    for fx, fy in ((0.15, 0.5), (0.2, 0.6), (0.1, 0.5), (0.15, 0.4), (0.2, 0.4)) * 3:
        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
        page.wait_for_timeout(250)
        match = re.search(pattern, page.evaluate(hover_js))
        if match:
            alpha, beta, loss, accuracy = map(float, match.groups())
            surface = SURFACES["pt"]
            i, j = np.argmin(np.abs(surface.alphas - alpha)), np.argmin(np.abs(surface.betas - beta))
            assert loss == pytest.approx(surface.loss[i, j], abs=1e-4)
            assert accuracy == pytest.approx(surface.accuracy[i, j], abs=1e-3)
            return
    pytest.fail("no hover label with α, β, loss and accuracy appeared over the first 3D surface")
