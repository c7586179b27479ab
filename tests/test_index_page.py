"""results/index.html: every link resolves and every figure loads, on disk and in a real headless browser."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from rlhf_lib.index_page import INDEX_FILE, findings_rows, main, write_index

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
HOW_TO_ENABLE = ("the browser test needs Debian's chromium at /usr/bin/chromium and Python playwright "
                 "(`apt-get install -y chromium && .venv/bin/pip install playwright`; .ci/run installs both)")


class LinkCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"])


def collect(page: Path) -> LinkCollector:
    collector = LinkCollector()
    collector.feed(page.read_text(encoding="utf-8"))
    return collector


def local_targets(page: Path) -> list[str]:
    collector = collect(page)
    return [href for href in collector.links + collector.images if not href.startswith("#")]


def write_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 1.5))
    axes.plot([0, 1], [0, 1])
    figure.savefig(path)
    plt.close(figure)


@pytest.fixture()
def results_tree(tmp_path: Path) -> Path:
    """A results folder as run_all.py leaves it: SUMMARY.md, a cross-size figure, one analysed size, one not."""
    results = tmp_path / "my results"  # a space: links must be escaped, not broken
    micro = results / "micro"
    micro.mkdir(parents=True)
    (results / "SUMMARY.md").write_text("# Results summary\n")
    write_png(results / "fig_win_rate_sizes.png")
    write_png(micro / "fig_win_rate.png")
    (micro / "01_data.html").write_text("<html><body>data</body></html>")
    (micro / "RUN.md").write_text("command: python run_all.py --sizes micro\n")
    (micro / "run_all.log").write_text("==> micro/data\n")
    findings = {
        "win_rate_ppo_vs_sft": {"value": 62.5, "low": 40.9, "high": 80.0, "n": 16, "n_unit": "eval prompts",
                                "unit": "percent", "paper": None, "verdict": "inconclusive",
                                "description": "held-out labelers prefer PPO to SFT"},
        "rm_accuracy_heldout": {"value": 66.1, "low": 58.0, "high": 73.2, "n": 40, "n_unit": "prompts",
                                "unit": "percent", "paper": 69.6, "verdict": "agrees", "description": "RM accuracy"},
        "missing": ["hallucination_rate_sft_minus_gpt"],
        "about": {"preset": "micro", "seed": 0, "written_utc": "2026-12-05T12:00:00+00:00"},
    }
    (micro / "findings.json").write_text(json.dumps(findings))
    tiny = results / "tiny"
    tiny.mkdir()
    (tiny / "01_data.html").write_text("<html><body>only data so far</body></html>")
    return results


def test_findings_rows_show_value_interval_n_paper_and_verdict():
    rows = findings_rows({"rm_accuracy_heldout": {"value": 66.1, "low": 58.04, "high": 73.2, "n": 40,
                                                  "n_unit": "prompts", "unit": "percent", "paper": 69.6,
                                                  "verdict": "agrees"},
                          "missing": ["x"], "about": {}})
    assert rows == [{"metric": "rm_accuracy_heldout", "description": "", "value": "66.1 [58.0, 73.2] percent",
                     "n": "40 prompts", "paper": "69.6", "verdict": "agrees"}]


def test_index_links_every_rendered_file_and_each_resolves(results_tree: Path):
    page = write_index(results_tree)
    assert page == results_tree / INDEX_FILE
    targets = local_targets(page)
    for expected in ("SUMMARY.md", "fig_win_rate_sizes.png", "micro/fig_win_rate.png", "micro/01_data.html",
                     "micro/RUN.md", "micro/findings.json", "micro/run_all.log", "tiny/01_data.html"):
        assert expected in targets, f"{expected} is not linked from the index page"
    for href in targets:
        assert (results_tree / unquote(href)).is_file(), f"{href} does not resolve"
    text = page.read_text()
    assert "62.5 [40.9, 80.0] percent" in text and "16 eval prompts" in text
    assert "hallucination_rate_sft_minus_gpt" in text  # a missing finding is named, not hidden
    assert "No findings.json under tiny/" in text


def test_cli_rejects_a_missing_folder(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_committed_index_page_resolves_on_disk():
    page = REPO / "results" / INDEX_FILE
    assert page.exists(), "results/index.html is missing: run `python -m rlhf_lib.index_page results`"
    for href in local_targets(page):
        assert (page.parent / unquote(href)).is_file(), f"results/index.html links {href}, which is not committed"


def unavailable(reason: str) -> None:
    """Skip, with how to enable the test; CI sets RLHF_REQUIRE_BROWSER=1, so there a missing browser fails."""
    if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; {HOW_TO_ENABLE}")
    pytest.skip(f"{reason}; {HOW_TO_ENABLE}")


@pytest.fixture()
def browser() -> Iterator:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture()
def serve():
    """Serve a folder on 127.0.0.1 (a free port) for as long as the test runs; yields a function folder -> URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def check_in_browser(browser, url: str) -> int:
    """Open the index page; every link answers 200 and every image has decoded pixels. Returns links checked."""
    page = browser.new_page()
    response = page.goto(url + INDEX_FILE)
    assert response is not None and response.ok
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    checked = 0
    for href in hrefs:
        if urlparse(href).fragment and href.split("#")[0] == url + INDEX_FILE:
            anchor = urlparse(href).fragment
            assert page.locator(f"[id='{anchor}']").count() == 1, f"anchor #{anchor} has no target"
            continue
        answer = page.request.get(href)
        assert answer.status == 200, f"{href} answered {answer.status}"
        checked += 1
    page.evaluate("() => Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    broken = page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert broken == [], f"images that did not load: {broken}"
    page.close()
    return checked


def test_index_page_in_a_real_browser(results_tree: Path, browser, serve):
    write_index(results_tree)
    assert check_in_browser(browser, serve(results_tree)) >= 8


def test_committed_index_page_in_a_real_browser(browser, serve, tmp_path: Path):
    shutil.copytree(REPO / "results", tmp_path / "results")
    assert check_in_browser(browser, serve(tmp_path / "results")) > 0
