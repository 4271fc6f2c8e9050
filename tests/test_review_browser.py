"""The review gate on a real `prefect server start`, answered the way a reviewer does: the paused run's page in
headless Chromium, its Resume button, Prefect's pause-for-input form (the description is the metadata table or
the dataset's profile), filled in and submitted. Also the profile artifact's screenshot for the README.

Run: `pytest -m browser tests/test_review_browser.py` (chromium: `sh tests/ui_setup.sh`).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from live_server import VENV_BIN, LiveServer, live_prefect_server
from test_ui_browser import Page, browser, shots

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.timeout(600, method="thread")]
__all__ = ["browser", "live_prefect_server", "shots"]  # fixtures shared with the other browser tests

SEEDS = [("s-poem", "Write a short poem about autumn rain on a tin roof."),
         ("s-sql", "My SQL query with three joins is slow on a small table. How do I find out why?"),
         ("s-moon", "Explain to a ten-year-old why the moon has phases.")]
SETTINGS = "n_metadata = 4\ninstructions_per_metadata = 2\nn_rubrics = 2\nmax_rounds = 2\nbudget = 100\n"
WAIT_S = 240.0


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


def _generate(server: LiveServer, llm: FakeLLMServer, tmp: Path, review: str) -> tuple[subprocess.Popen[bytes],
                                                                                          Path, Path]:
    """`codeclm generate --review REVIEW` against the live server, as a user starts it (not interactive)."""
    seeds = tmp / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(seeds, orient="records", lines=True)
    roles = "".join(f'[{r}]\nmodel = "openai/fake-{r}"\napi_base = "{llm.url}"\noutput_mode = "json_schema"\n'
                    for r in ("strong", "target", "judge"))
    config = tmp / "config.toml"
    config.write_text(SETTINGS + roles)
    log = tmp / "cli.log"
    proc = server.spawn([str(VENV_BIN / "codeclm"), "generate", str(seeds), "--out", str(tmp / "out"), "--config",
                         str(config), "--review", review], log, env=server.env(CODECLM_HOME=str(tmp / "home")))
    return proc, tmp / "out", log


def _paused(server: LiveServer, proc: subprocess.Popen[bytes], log: Path, since: float) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        runs = server.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        runs = [r for r in runs if pd.Timestamp(r["created"]).timestamp() >= since - 1]
        if runs:
            return runs[0]
        if proc.poll() is not None:
            pytest.fail(f"codeclm exited {proc.returncode} before pausing:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"no run paused for review in {WAIT_S:.0f} s:\n{log.read_text()[-3000:]}")


def _open_form(page: Page, server: LiveServer, run: dict[str, Any], *needles: str) -> str:
    page.goto(f"{server.url}/runs/flow-run/{run['id']}")
    page.wait_for_text("Paused", "Resume")
    page.click_text("Resume")
    return page.wait_for_text("Resume Flow Run", "Submit", *needles)


def _fill(page: Page, decision: str, texts: list[str]) -> None:
    """Choose the decision and type into the form's text areas in field order (reason, then drop ids)."""
    filled = page.js(f"""(() => {{
        const sel = [...document.querySelectorAll('select')].find(s => [...s.options].some(o => o.text === 'reject'));
        const modal = sel.closest('form') || sel.closest('.p-modal') || document;
        sel.value = [...sel.options].find(o => o.text === {json.dumps(decision)}).value;
        sel.dispatchEvent(new Event('change', {{bubbles: true}}));
        const areas = [...modal.querySelectorAll('textarea')];
        {json.dumps(texts)}.forEach((t, i) => {{ areas[i].value = t;
            areas[i].dispatchEvent(new Event('input', {{bubbles: true}})); }});
        return [sel.value, areas.length]; }})()""")
    assert filled[0] == decision and filled[1] >= len(texts), filled


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    proc.wait(timeout=WAIT_S)
    return log.read_text()


def test_metadata_review_in_the_ui_form_drops_an_id_and_the_run_goes_on(
        browser: Page, live_prefect_server: LiveServer, llm: FakeLLMServer, tmp_path: Path, shots: Path) -> None:
    since = time.time()
    proc, out, log = _generate(live_prefect_server, llm, tmp_path, "metadata")
    run = _paused(live_prefect_server, proc, log, since)
    text = _open_form(browser, live_prefect_server, run, "Review the metadata", "Drop Metadata Ids")
    ids = sorted(set(re.findall(r"meta-[0-9a-f]{16}", text)))
    assert len(ids) == 4, text[:2000]
    browser.screenshot(shots / "review-metadata-form.png")
    _fill(browser, "approve", ["one use case is off topic", ids[0]])
    browser.click_text("Submit")
    output = _finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert set(pd.read_parquet(out / "stages" / "metadata.parquet")["metadata_id"]) == set(ids[1:])
    assert ids[0] not in set(pd.read_parquet(out / "train.parquet")["metadata_id"])

    # the published dataset's profile is an artifact of the run, rendered by the UI (the README's picture)
    arts = live_prefect_server.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["dataset-profile"]}}})
    latest = max(arts, key=lambda a: a["created"])
    browser.goto(f"{live_prefect_server.url}/artifacts/artifact/{latest['id']}")
    browser.wait_for_text("Dataset profile", "Use cases and skills", "Samples with lineage", "basic instruction")
    rendered = browser.js("[...document.images].filter(i => i.src.startsWith('data:image/svg')).map(i => "
                          "i.naturalWidth)")
    assert len(rendered) == 3 and all(w > 0 for w in rendered), rendered  # the charts drew
    assert browser.screenshot(shots / "profile-artifact.png").stat().st_size > 20_000


def test_dataset_rejected_in_the_ui_form_is_not_published(
        browser: Page, live_prefect_server: LiveServer, llm: FakeLLMServer, tmp_path: Path, shots: Path) -> None:
    since = time.time()
    proc, out, log = _generate(live_prefect_server, llm, tmp_path, "dataset")
    run = _paused(live_prefect_server, proc, log, since)
    _open_form(browser, live_prefect_server, run, "Dataset profile", "Samples with lineage", "not yet published")
    assert not out.exists()
    browser.screenshot(shots / "review-dataset-form.png")
    _fill(browser, "reject", ["responses too short"])
    browser.click_text("Submit")
    output = _finish(proc, log)
    assert proc.returncode == 2, output[-3000:]
    assert output.rstrip().splitlines()[-1] == ("error: the reviewer rejected the dataset: responses too short; "
                                                "nothing was published or trained on")
    assert not out.exists()
