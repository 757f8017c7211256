"""The report of a real (small) run opened in a real browser: Debian's headless Chromium, driven by Playwright,
loads index.html from file:// and every image must load, every link must resolve, the console must stay clean;
a full-page screenshot is taken. `make test` installs /usr/bin/chromium where it is missing."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.report import build_report

from .helpers import explain_on_local_ray

ray = pytest.importorskip("ray")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.timeout(600)
CHROMIUM = Path("/usr/bin/chromium")
# Without these a headless Chromium on a closed network waits on updaters, sync and QUIC probes.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def report(tmp_path_factory, artifact_cache) -> Path:
    """A real pipeline run on the embedded sample (vgg11, 32x32, random weights, several shards) and its report."""
    tmp = tmp_path_factory.mktemp("browser")
    config = load_config({"dataset": "sample", "model": "vgg11", "weights": "random", "size": 32, "batch_size": 4,
                          "shard_size": 4, "out": str(tmp / "run"), "cache": str(artifact_cache)})
    explain_on_local_ray(config)
    return build_report(tmp / "run", per_class=2, gallery=6)


def _local_file(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file", f"not a local link: {url}"
    return Path(unquote(parsed.path))


def test_report_opens_in_chromium(report, tmp_path):
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium"
    problems: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            timeout=TIMEOUT_MS, viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(report.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.currentSrc, i.complete, i.naturalWidth])")
            links = page.evaluate("Array.from(document.querySelectorAll('a[href]'), a => a.getAttribute('href'))")
            anchors = set(page.evaluate("Array.from(document.querySelectorAll('[id]'), e => e.id)"))
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert len(images) > 10  # tiles (image, heat map, overlay), plots, the legend
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(_local_file(src).is_relative_to(report.parent) for src, _, _ in images)
    assert links
    for href in links:
        if href.startswith("#"):
            assert href[1:] in anchors, f"link to a missing anchor: {href}"
        else:
            assert (report.parent / unquote(href)).is_file(), f"broken link: {href}"
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[0] > 900 and picture.shape[1] >= 1280  # the whole page, not a blank viewport
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 500  # photographs and heat maps, not a blank page
