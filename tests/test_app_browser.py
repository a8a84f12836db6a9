"""The workbench in a real browser: `saelab app` serves the tiny-model runs of test_app.py,
headless Chromium (Playwright) opens every page, clicks into a feature, searches a token,
reads an explanation, runs its own text, steps Back through latents, steers a generation,
and saves a screenshot of each page to $SAELAB_ARTIFACTS (default test-artifacts/screenshots
at the repository root).

Streamlit renders over a websocket after the page loads, so every step waits for the
content it expects before looking or taking a screenshot."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_app import HALF, PLAIN, RUN, build_runs

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SAELAB_ARTIFACTS") or REPO / "test-artifacts" / "screenshots")
TIMEOUT_MS = 30_000
SCROLLERS = '[data-testid="stMain"], [data-testid="stMainBlockContainer"]'

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, limit: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"saelab app exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"saelab app did not answer at {url} within {limit:.0f} s")


@pytest.fixture(scope="module")
def runs_dir_for_browser(tmp_path_factory, model_harvest, trained_run):
    return build_runs(tmp_path_factory.getbasetemp() / "app", model_harvest, trained_run)


@pytest.fixture(scope="module")
def server(runs_dir_for_browser):
    runs = runs_dir_for_browser
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab", "app", str(runs), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: streamlit runs as a child of saelab
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        yield pg
        browser.close()


def settle(pg) -> None:
    """Wait until the script run is over: no 'Running…' status widget, no stale elements."""
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS
    )
    assert pg.locator('[data-testid="stException"]').count() == 0


def shot(pg, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main container, so the window is made
    as tall as that container's content first."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = pg.viewport_size
    height = pg.evaluate(
        "() => Math.max(document.body.scrollHeight, ...Array.from("
        f"document.querySelectorAll('{SCROLLERS}'), e => e.scrollHeight))"
    )
    pg.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, 12_000)})
    pg.wait_for_timeout(300)  # charts re-layout to the new window
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    pg.set_viewport_size(size)


def visit(pg, server: str, path: str, expect: str) -> None:
    pg.goto(f"{server}/{path}")
    pg.get_by_text(expect, exact=False).first.wait_for()
    settle(pg)


def test_every_page_in_chromium(page, server):
    pg = page
    visit(pg, server, f"?run={RUN}", "Selected runs")
    pg.locator('[data-testid="stDataFrame"]').wait_for()
    shot(pg, "runs")

    # The sidebar navigation leads to the feature browser of the chosen run.
    pg.get_by_role("link", name="Feature browser").click()
    pg.get_by_role("heading", name="Latent 0").wait_for()
    settle(pg)
    pg.get_by_role("button", name="next ▶").click()
    pg.get_by_role("heading", name="Latent 1").wait_for()
    settle(pg)
    neighbour = pg.locator('[class*="st-key-nb_"] button').first
    target = neighbour.inner_text().split("·")[0].strip().lstrip("#")
    neighbour.click()
    pg.get_by_role("heading", name=f"Latent {target}").wait_for()
    settle(pg)

    pg.get_by_text("Search latents by token or text").click()
    box = pg.locator(".st-key-search_query input")
    box.fill("the")
    box.press("Enter")
    hit = pg.locator('[class*="st-key-hit_"] button').first
    hit.wait_for()
    latent = hit.inner_text().split("·")[0].strip().lstrip("#")
    hit.click()
    pg.get_by_role("heading", name=f"Latent {latent}").wait_for()
    settle(pg)
    pg.locator(".js-plotly-plot").first.wait_for()
    assert pg.locator("span[data-v]").count() > 20  # highlighted context tokens
    shot(pg, "features")

    visit(pg, server, f"dead?run={RUN}", "Dead and rarest latents")
    pg.locator(".js-plotly-plot").nth(1).wait_for()
    shot(pg, "dead")

    visit(pg, server, f"darkmatter?run={RUN}", "Largest nonlinear error")
    pg.locator(".js-plotly-plot").nth(2).wait_for()
    shot(pg, "darkmatter")

    visit(pg, server, "compare", "FVU")
    pg.locator(".js-plotly-plot").first.wait_for()
    shot(pg, "compare")

    visit(pg, server, f"prompt?run={RUN}", "Highlight a latent")
    pg.locator('[data-testid="stDataFrame"]').wait_for()
    shot(pg, "prompt")


def test_messages_in_chromium(page, server):
    pg = page
    visit(pg, server, f"features?run={PLAIN}", "saelab index")
    shot(pg, "features-no-index")
    visit(pg, server, f"prompt?run={HALF}", "needs a finished run")
    visit(pg, server, "?run=../../etc", "outside the runs directory")
    shot(pg, "runs-escape-refused")


def _tooltip(pg, locator) -> str:
    """The CSS tooltip (::after) of a hovered token, as the browser computes it."""
    locator.hover()
    return pg.evaluate(
        "el => getComputedStyle(el, '::after').content", locator.element_handle()
    ).strip('"')


def test_feature_page_lab_widgets_in_chromium(page, server, runs_dir_for_browser):
    pg = page
    exp = runs_dir_for_browser / RUN / "explanations.jsonl"
    exp.write_text(
        json.dumps({"latent": 3, "explanation": "calls def __init__ [here](http://x.y)",
                    "score": 0.8, "n_scored": 40, "explainer": "hand-written"}) + "\n"
    )  # fmt: skip
    try:
        visit(pg, server, f"features?run={RUN}&latent=3", "Explanation:")
        body = pg.locator('[data-testid="stMarkdownContainer"]', has_text="Explanation:").first
        shown = body.inner_text().replace("\u2060", "")  # the joiner that stops autolinks
        assert "calls def __init__ [here](http://x.y) (score 0.80)" in shown
        assert body.locator("a").count() == 0  # no live link from the user's text
        token = pg.locator("span[data-v]").first
        assert _tooltip(pg, token) == token.get_attribute("data-v")  # instant CSS tooltip
        shot(pg, "features-explained")

        box = pg.locator(".st-key-own_text input")
        box.fill("In the beginning God created the heaven")
        box.press("Enter")
        pg.get_by_text("colours on the scale of the top contexts").wait_for(timeout=4 * TIMEOUT_MS)
        settle(pg)

        pg.get_by_role("button", name="next ▶").click()
        pg.get_by_role("heading", name="Latent 4").wait_for()
        settle(pg)
        pg.go_back()  # the browser's Back returns to the previous latent
        pg.get_by_role("heading", name="Latent 3").wait_for()
        settle(pg)

        pg.get_by_text("Search latents by token or text").click()
        query = pg.locator(".st-key-search_query input")
        query.fill("def __init__")
        query.press("Enter")
        pg.get_by_text("def __init__", exact=False).first.wait_for()  # shown as typed
        settle(pg)
    finally:
        exp.unlink()


def test_steer_page_in_chromium(page, server, runs_dir_for_browser):
    from saelab import steering
    from saelab.models import load_model

    pg = page
    visit(pg, server, f"steer?run={RUN}", "Pick one or more latents")
    box = pg.locator(".st-key-steer_ids input")
    box.fill("3")
    box.press("Enter")
    pg.get_by_text("With the intervention").wait_for(timeout=4 * TIMEOUT_MS)  # loads the model
    settle(pg)
    codes = pg.locator('[data-testid="stCode"]')
    model, sae = load_model("tiny"), steering.load_sae(runs_dir_for_browser / RUN).eval()
    prompt = "In the beginning God created"
    base = steering.generate(model, prompt, [], 20, 0, 1.0)
    steered = steering.generate(model, prompt, [steering.add(sae, [3], 8.0)], 20, 0, 1.0)
    flat = lambda t: " ".join(t.split())  # noqa: E731 - the code block wraps lines
    assert flat(codes.nth(0).inner_text()) == flat(prompt + base)
    assert flat(codes.nth(1).inner_text()) == flat(prompt + steered)
    pg.locator('[data-testid="stDataFrame"]').wait_for()
    shot(pg, "steer")
