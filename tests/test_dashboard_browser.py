"""The HTML report in a real headless browser (Debian's chromium through selenium).

The pages are opened from disk (file://), as a researcher would. Checked: the feature index
loads and its filters work; a feature page draws highlighted tokens with values on hover
and a whole trace; data full of HTML/JS injection strings shows as text (no injected
element in the DOM, no alert). Screenshots are saved under the test's tmp dir (or
$RANK1_SCREENSHOT_DIR) and their paths printed.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install -y chromium
chromium-driver`); skipped, saying so, when they are not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rank1_core.config import ReportConfig
from rank1_core.report import build_report
from rank1_core.report.synthetic import EVIL, SyntheticSpec, make_synthetic_run

from rank1_core.report.screenshot import browser_paths

CHROMIUM, CHROMEDRIVER = browser_paths()
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")

# Recorded by a script that runs before any page script: every alert/confirm/prompt call.
SPY = """
window.__xss = [];
['alert', 'confirm', 'prompt'].forEach(function (k) {
  window[k] = function (m) { window.__xss.push(k + ':' + String(m)); };
});
"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run = make_synthetic_run(str(root / "run"), SyntheticSpec(evil=True, docs=6, doc_len=120))
    build_report(run, ReportConfig(figure_dpi=70), root / "run" / "report", log=lambda m: None)
    return root / "run" / "report"


@pytest.fixture(scope="module")
def browser():
    from rank1_core.report.screenshot import chromium

    with chromium() as drv:
        drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SPY})
        yield drv


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("RANK1_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def open_page(drv, path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(path.as_uri())
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def screenshot(drv, path: Path, capsys, full: bool = True) -> None:
    if full:
        h = drv.execute_script("return document.documentElement.scrollHeight")
        drv.set_window_size(1400, min(max(int(h) + 40, 700), 2400))
    assert drv.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\n[screenshot] {path}")
    drv.set_window_size(1400, 1000)


def assert_no_injection(drv) -> None:
    """Nothing from the data became markup or ran."""
    js = drv.execute_script
    assert js("return window.__xss") == []
    assert js("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    # no element carries an event-handler attribute (the pages set none)
    assert js("return Array.from(document.querySelectorAll('*')).flatMap(e => Array.from(e.attributes))"
              ".filter(a => a.name.startsWith('on')).map(a => a.name)") == []
    scripts = js("return Array.from(document.scripts).map(s => s.type === 'application/json' ? 'json' "
                 ": s.getAttribute('src'))")
    for s in scripts:
        assert s == "json" or (s and (s.startswith("assets/") or s.startswith("../../assets/")
                                      or s.startswith("../../traces/"))), scripts
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        drv.switch_to.alert.text  # noqa: B018


def visible_rows(drv) -> list[dict]:
    return drv.execute_script("""
      return Array.from(document.querySelectorAll('#rows tr')).filter(tr => !tr.hidden).map(tr => ({
        id: tr.cells[0].textContent, source: tr.dataset.source, expl: tr.cells[3].firstChild.textContent,
        cell: tr.cells[3].textContent,
        cls: tr.cells[4].textContent, cat: tr.cells[5].textContent}));""")


def test_index_loads_and_filters(browser, report_dir, shots, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    drv = browser
    open_page(drv, report_dir / "features.html")
    spec = SyntheticSpec()
    n_all = spec.layers * 7 + spec.layers * spec.neurons + sum(1 for i in range(spec.sae_latents) if i % 7)
    assert len(visible_rows(drv)) == n_all
    assert drv.find_element(By.ID, "count").text == f"{n_all} of {n_all} features"
    screenshot(drv, shots / "features_index.png", capsys)

    box = drv.find_element(By.ID, "q")
    box.send_keys("gate_proj")
    rows = visible_rows(drv)
    assert [r["id"] for r in rows] == [f"L{l:02d}_gate_proj" for l in range(spec.layers)]
    assert "q=gate_proj" in drv.execute_script("return location.hash")
    box.clear()
    box.send_keys(" ")  # an input event with an empty query
    Select(drv.find_element(By.ID, "source")).select_by_value("sae")
    rows = visible_rows(drv)
    assert rows and all(r["source"] == "sae" for r in rows)
    Select(drv.find_element(By.ID, "cls")).select_by_value("0")
    rows0 = visible_rows(drv)
    assert rows0 and len(rows0) < len(rows) and all(r["cls"] == "0 clear" for r in rows0)
    cat = Select(drv.find_element(By.ID, "cat"))
    cat.select_by_visible_text("Numbers and Quantities")
    assert all(r["cat"] == "Numbers and Quantities" for r in visible_rows(drv))
    drv.find_element(By.ID, "clear-filters").click()
    assert len(visible_rows(drv)) == n_all
    drv.find_element(By.ID, "explained").click()
    assert all(r["expl"] != "—" for r in visible_rows(drv)) and len(visible_rows(drv)) < n_all
    drv.find_element(By.ID, "clear-filters").click()
    # sorting by score puts the highest first
    drv.find_element(By.CSS_SELECTOR, "th[data-k=score]").click()
    scores = drv.execute_script("return Array.from(document.querySelectorAll('#rows tr')).map(tr => "
                                "tr.cells[6].textContent).filter(s => s !== '').map(Number)")
    assert scores == sorted(scores, reverse=True)
    # a hash in the URL restores the filters (shareable links)
    drv.get((report_dir / "features.html").as_uri() + "#source=neuron")
    drv.refresh()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert {r["source"] for r in visible_rows(drv)} == {"neuron"}
    assert_no_injection(drv)


def test_index_shows_injection_strings_as_text(browser, report_dir):
    from selenium.webdriver.common.by import By

    drv = browser
    open_page(drv, report_dir / "features.html")
    drv.find_element(By.ID, "q").send_keys("<script>")
    rows = visible_rows(drv)
    assert rows and all("<script>" in r["cell"] for r in rows)
    assert sum(r["expl"] == f"{EVIL[0]} and {EVIL[1]}" for r in rows) == 3  # feature 0 of each source
    cats = drv.execute_script("return Array.from(document.querySelectorAll('#cat option')).map(o => o.textContent)")
    assert f"{EVIL[1]} category" in cats
    assert_no_injection(drv)


def test_feature_page_highlights_tokens(browser, report_dir, shots, capsys):
    from selenium.webdriver.common.by import By

    drv = browser
    open_page(drv, report_dir / "features" / "adapter" / "L00_q_proj.html")
    assert drv.find_element(By.ID, "fid").text == "L00_q_proj"
    # the explanation holds injection strings: shown literally
    assert drv.find_element(By.ID, "explanation").text == f"{EVIL[0]} and {EVIL[1]}"
    info = drv.execute_script("""
      const toks = Array.from(document.querySelectorAll('#ctx-pos .tok, #ctx-neg .tok'));
      const coloured = toks.filter(t => t.style.backgroundColor !== '');
      const pos = Array.from(document.querySelectorAll('#ctx-pos .tok.hit'));
      const neg = Array.from(document.querySelectorAll('#ctx-neg .tok.hit'));
      return {n: toks.length, coloured: coloured.length,
              posHit: pos.map(t => [t.title, t.dataset.v, getComputedStyle(t).backgroundColor]),
              negHit: neg.map(t => [t.title, t.dataset.v, getComputedStyle(t).backgroundColor]),
              texts: toks.map(t => t.textContent),
              trace: document.querySelectorAll('#trace .tok').length,
              traceHit: document.querySelectorAll('#trace .tok.hit').length,
              lists: [document.querySelectorAll('#ctx-pos li').length, document.querySelectorAll('#ctx-neg li').length]};
    """)
    assert info["lists"][0] > 0 and info["n"] > 10 and info["coloured"] > 0
    # every hit token: its value on hover, coloured by sign (orange positive, blue negative)
    for title, v, bg in info["posHit"]:
        assert float(v) > 0 and " = " in title and title.endswith(")") and bg.startswith("rgba(234, 88, 12")
    for title, v, bg in info["negHit"]:
        assert float(v) < 0 and bg.startswith("rgba(28, 126, 214")
    data = drv.execute_script("return JSON.parse(document.getElementById('feature-data').textContent)")
    top = data["pos"][0]
    assert info["posHit"][0][0].split(" = ")[1].startswith(f"{top[2]:.3g}"[:3])
    # injection tokens in contexts are there as text
    assert EVIL[0] in info["texts"] and EVIL[1] in info["texts"]
    # the whole trace: every token of the window, the hit marked
    assert info["trace"] == data["trace"]["end"] - data["trace"]["start"] and info["traceHit"] == 1
    assert drv.find_element(By.CSS_SELECTOR, "svg.hist rect") is not None
    assert_no_injection(drv)
    screenshot(drv, shots / "feature_page.png", capsys)


def test_report_index_and_navigation(browser, report_dir, shots, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser
    drv.get((report_dir / "index.html").as_uri())
    imgs = drv.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert {s for s, _ in imgs} >= {"figures/figure1.png", "figures/figure2.png", "figures/figure3.png"}
    assert all(w > 0 for _, w in imgs), imgs  # every figure loaded from disk
    cells = drv.execute_script("return Array.from(document.querySelectorAll('#table1 td')).map(td => td.textContent)")
    assert '<img src=x onerror=alert(4)>' in cells
    assert_no_injection(drv)
    screenshot(drv, shots / "report_index.png", capsys)
    drv.find_element(By.LINK_TEXT, "Browse every feature").click()
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    drv.find_element(By.LINK_TEXT, "L00_k_proj").click()
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert drv.find_element(By.ID, "fid").text == "L00_k_proj"
    drv.find_element(By.ID, "next").click()
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert drv.find_element(By.ID, "fid").text == "L00_v_proj"
    assert_no_injection(drv)
