"""A real browser on the Prefect UI: headless Debian Chromium, driven over the DevTools protocol, opens the
deployed `generate` run and its artifacts, saves screenshots, and checks the artifact keys are on the page.

Setup: `sh tests/ui_setup.sh` (installs Debian's chromium when missing; the fixture runs it for root).
Run: `pytest -m browser` (shares the Prefect server and the deployed run with tests/test_deployments_e2e.py).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import (
    GENERATE_SEEDS,
    REPO,
    DeployedRun,
    LiveServer,
    deployed_generate_run,
    free_port,
    kill_tree,
    live_prefect_server,
)
from websockets.sync.client import ClientConnection, connect

pytestmark = [pytest.mark.server, pytest.mark.browser]
__all__ = ["deployed_generate_run", "live_prefect_server"]  # fixtures shared with the e2e module

log = logging.getLogger(__name__)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]
RENDER_TIMEOUT_S = 60.0


def _chromium_binary() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None and os.geteuid() == 0:
        subprocess.run(["sh", str(REPO / "tests" / "ui_setup.sh")], check=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed; run `sh tests/ui_setup.sh` as root")
    return found


class Page:
    """One browser tab over the Chrome DevTools Protocol: navigate, read the rendered text, click, screenshot."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, *needles: str, timeout: float = RENDER_TIMEOUT_S) -> str:
        """Poll the rendered text until every needle is on the page (the UI is a SPA that fetches after load)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not on the page after {timeout:.0f}s: {missing}; page text starts: {text[:1500]!r}")

    def click_text(self, label: str) -> None:
        """Click the innermost visible element whose own text is exactly `label` (a tab, a link)."""
        clicked = self.js(f"""(() => {{
            const all = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]
              .filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === {json.dumps(label)});
            const el = all.find(e => ![...e.children].some(c => all.includes(c))) || all[0];
            if (!el) return false;
            el.scrollIntoView(); el.click(); return true; }})()""")
        assert clicked, f"no clickable element labelled {label!r}"

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        log.warning("screenshot saved: %s", path)
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    binary = _chromium_binary()
    home = tmp_path_factory.mktemp("chromium")
    port = free_port()
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}",
                             f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
                            stdout=(home / "chromium.log").open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/json/version", timeout=2).raise_for_status()
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"chromium did not start:\n{(home / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.3)
        target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1,
                      mobile=False)
            yield page
    finally:
        kill_tree(proc)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Screenshots go here; set CODECLM_SCREENSHOTS to keep them somewhere known."""
    where = os.environ.get("CODECLM_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_flow_run_page_shows_the_generate_run(browser: Page, deployed_generate_run: DeployedRun,
                                              live_prefect_server: LiveServer, shots: Path) -> None:
    run = deployed_generate_run
    browser.goto(f"{live_prefect_server.url}/runs/flow-run/{run.run_id}")
    text = browser.wait_for_text(run.name, "Completed", "codeclm-process", "published")
    assert "codeclm-generate" in text and "set_working_directory" in text  # the pull step ran, in the run's logs
    shot = browser.screenshot(shots / "generate-run.png")
    assert shot.stat().st_size > 10_000
    browser.click_text("Subflow Runs")
    browser.wait_for_text(f"pipeline · {GENERATE_SEEDS}")
    browser.screenshot(shots / "generate-subflows.png")


def test_artifacts_of_the_run_are_on_the_page(browser: Page, deployed_generate_run: DeployedRun,
                                              live_prefect_server: LiveServer, shots: Path) -> None:
    """The run's progress view and stage table live on the generate run: its Artifacts tab must list them."""
    run = deployed_generate_run
    browser.goto(f"{live_prefect_server.url}/runs/flow-run/{run.run_id}")
    browser.wait_for_text("generate", "Artifacts")
    browser.click_text("Artifacts")
    text = browser.wait_for_text(*run.artifact_keys)
    assert set(run.artifact_keys) >= {"generate-progress", "generate-stages"}
    assert all(key in text for key in run.artifact_keys)
    shot = browser.screenshot(shots / "generate-artifacts.png")
    assert shot.stat().st_size > 10_000

    # the table itself: counts, tokens and cost per stage
    artifact_id = run.artifact_ids["generate-stages"]
    stored = httpx.get(f"{live_prefect_server.api}/artifacts/{artifact_id}", timeout=30).json()
    stages = [row["stage"] for row in json.loads(stored["data"])]
    assert {"encode", "decode", "rubrics", "respond", "score"} <= set(stages)
    browser.goto(f"{live_prefect_server.url}/artifacts/artifact/{artifact_id}")
    browser.wait_for_text("generate-stages", "prompt_tokens", "completion_tokens", "cost_usd", *stages)
    browser.screenshot(shots / "generate-stages-table.png")
