"""Screenshots of report pages with a headless chromium (selenium; a dev dependency).

    rank1 report --run runs/demo --screenshots docs/img

Debian's chromium and chromedriver (`apt-get install -y chromium chromium-driver`), started
with the flags that keep it off the network: no background networking, component updates,
sync or QUIC, and a fresh profile directory.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def browser_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver"))


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A selenium Chrome driver over Debian's chromium, with a throw-away profile."""
    binary, driver = browser_paths()
    if not (binary and driver):
        raise RuntimeError("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rank1-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        drv.set_page_load_timeout(60)
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_ready(drv, timeout: float = 30) -> None:
    """Pages with scripts set body[data-ready=1] when drawn; the report page has none."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, timeout).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && (!document.querySelector('script[src]') "
        "|| document.body.dataset.ready === '1')"))


def capture(drv, url: str, out: Path, width: int = 1400, max_height: int = 2400) -> Path:
    """Full-page screenshot (up to max_height pixels) of one page."""
    drv.set_window_size(width, 1000)
    drv.get(url)
    wait_ready(drv)
    h = int(drv.execute_script("return document.documentElement.scrollHeight"))
    drv.set_window_size(width, min(max(h + 40, 700), max_height))
    out.parent.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(out))
    return out


def report_screenshots(report_dir: Path, out_dir: Path, feature_page: str | None = None) -> list[Path]:
    """index.html, features.html and one feature page (the given one, else the first
    adapter component's) of a report folder, as PNG files in out_dir."""
    report_dir = Path(report_dir).resolve()
    pages = [("report_index.png", report_dir / "index.html"), ("features_index.png", report_dir / "features.html")]
    if feature_page is None:
        first = sorted((report_dir / "features" / "adapter").glob("*.html")) or sorted(report_dir.glob("features/*/*.html"))
        feature_page = str(first[0].relative_to(report_dir)) if first else None
    if feature_page:
        pages.append(("feature_page.png", report_dir / feature_page))
    out = []
    with chromium() as drv:
        for name, path in pages:
            if path.is_file():
                out.append(capture(drv, path.as_uri(), Path(out_dir) / name))
    return out
