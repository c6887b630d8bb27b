"""The web page at / in headless Chromium (Debian's /usr/bin/chromium driven by playwright's Python package):
upload a reference video, watch the ingest finish and the appearance map appear, drive the identity from a video
file over the websocket, check that synthesized frames arrive and are drawn (the output canvas is not blank), and
save a screenshot to docs/live_page.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from server_helpers import LiveServer, make_settings, mp4

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--autoplay-policy=no-user-gesture-required", "--mute-audio"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from engine.synthetic import random_identity, sequence

    d = tmp_path_factory.mktemp("browser")
    reference, driving = d / "reference.mp4", d / "driving.mp4"
    reference.write_bytes(mp4(sequence(random_identity(1), 16, seed=1, size=128).images))
    # 4 s: long enough for the page to send a few dozen frames at 15 fps.
    driving.write_bytes(mp4(sequence(random_identity(2), 100, seed=2, size=128).images))
    return reference, driving


def test_page_uploads_drives_and_draws(tmp_path: Path, videos: tuple[Path, Path]) -> None:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip("no /usr/bin/chromium (make setup installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    reference, driving = videos
    with LiveServer(make_settings(tmp_path / "data")) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(server.url + "/")
            assert page.title() == "ACA Avatar Server"

            page.set_input_files("#reference-file", str(reference))
            page.fill("#identity-name", "browser test")
            page.click("#upload-button")
            page.wait_for_selector("#appearance-map:not([hidden])", timeout=120_000)
            assert "ready" in page.inner_text("#identity-status")
            assert page.evaluate("document.getElementById('appearance-map').naturalWidth") > 0

            page.set_input_files("#driving-file", str(driving))
            page.click("#start-button")
            page.wait_for_function("window.acaStats.drawn >= 10", timeout=60_000)
            stats = page.evaluate("window.acaStats")
            assert stats["sent"] >= stats["received"] >= 10, stats
            assert stats["errors"] == 0, stats

            # The output canvas shows a synthesized face: pixels vary (not one flat colour, not the blank canvas).
            pixels = np.array(page.evaluate(
                "Array.from(document.getElementById('output-canvas').getContext('2d')"
                ".getImageData(0, 0, 256, 256).data)"), dtype=np.uint8).reshape(256, 256, 4)
            assert pixels[..., 3].min() == 255
            assert pixels[..., :3].std() > 10
            assert "fps" in page.inner_text("#live-stats") and "latency" in page.inner_text("#live-stats")
            page.screenshot(path=str(ROOT / "docs" / "live_page.png"))

            # The file ends (or Stop): the page sends "end" and the server closes normally.
            if page.is_enabled("#stop-button"):
                page.click("#stop-button")
            page.wait_for_function("window.acaStats.closed !== null", timeout=30_000)
            assert page.evaluate("window.acaStats.closed.code") == 1000
        finally:
            browser.close()
