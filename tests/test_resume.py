"""Crash and resume (reliability C1, one kill): SIGKILL the generate flow mid-run, rerun it in a new process, and
check that no LLM call completed before the kill is paid for again, and that the killed run left nothing running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(420, method="thread")

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    from codeclm.settings import Settings
    from flows.generate import generate

    settings = Settings.model_validate_json(Path(sys.argv[1]).read_text())
    summary = generate(sys.argv[2], sys.argv[3], settings)
    print("DONE", summary.train, flush=True)
""")
SEEDS = [
    ("r1", "Write a haiku about the first snow of winter."),
    ("r2", "How do I undo the last commit in git without losing my changes?"),
    ("r3", "Summarise the causes of the French Revolution in five bullet points."),
    ("r4", "Plan a three-day vegetarian meal plan for a student on a budget."),
]
KILL_AFTER = 30         # completed requests seen by the server before the kill (of about 95), mid round 1
CONCURRENCY = 2         # per endpoint; two endpoints (strong, target), so at most 4 calls in flight
SETTLED = 0.5           # a response logged this long before the kill has surely reached the gateway cache


def _identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two requests the same call (strong and target answers share messages, not the model)."""
    return entry["model"], entry["messages_sha"], entry["temperature"], entry["max_tokens"], entry["response_format"]


def _processes_with(marker: str) -> list[dict[str, Any]]:
    """Live processes whose environment holds `marker` (our PREFECT_HOME): whatever a run started."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0") and "State:\tZ" not in status:
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            found.append({"pid": pid, "ppid": ppid, "cmdline": cmdline})
    return found


def _end(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # a drill (minutes): CI runs it in make test-slow
def test_sigkill_mid_run_then_rerun_repeats_no_completed_call(prefect_harness: None, fake_llm: FakeLLMServer,
                                                              tmp_path: Path) -> None:
    """The killed run starts its own ephemeral Prefect server, as `codeclm generate` does; the rerun uses the
    session's API server instead (20-30 s cheaper), which also shows that resuming needs nothing from the
    killed run's Prefect database: only result storage and the call cache."""
    from prefect.settings import get_current_settings

    fake_llm.latency = 0.05
    prefect_home = tmp_path / "prefect"
    marker = f"PREFECT_HOME={prefect_home}"
    settings = settings_for(fake_llm, tmp_path, n_metadata=6, instructions_per_metadata=2, n_rubrics=2,
                            max_rounds=2, budget=100, batch_size=4, max_parallel_batches=2,
                            max_concurrency=CONCURRENCY)
    (tmp_path / "settings.json").write_text(settings.model_dump_json())
    (tmp_path / "run.py").write_text(SCRIPT)
    seeds = tmp_path / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(seeds, orient="records", lines=True)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(prefect_home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "settings.json"), str(seeds), str(out)]

    def start(log: str, api_url: str | None = None) -> subprocess.Popen[bytes]:
        with (tmp_path / log).open("wb") as sink:
            return subprocess.Popen(command, cwd=tmp_path, env=env | ({"PREFECT_API_URL": api_url} if api_url else {}),
                                    stdout=sink, stderr=subprocess.STDOUT)

    # 1. run, and kill -9 once the server has answered KILL_AFTER requests
    killed = start("killed.log")
    t_start = time.monotonic()
    deadline = time.monotonic() + 240
    while len(fake_llm.requests) < KILL_AFTER:
        assert killed.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'killed.log').read_text()}"
        assert time.monotonic() < deadline, "the run made too few requests in time"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    kill_time = time.monotonic()
    assert killed.wait(timeout=10) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # nothing was published by the killed run

    # 2. nothing outlives the killed run: the ephemeral API server Prefect started is tied to it (PDEATHSIG)
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = _processes_with(marker)
    _end([o["pid"] for o in orphans])
    assert orphans == [], f"processes outlived the killed run: {orphans}"

    # 3. rerun in a new process against the same LLM server (same api_base, so the same cache keys)
    time.sleep(0.5)
    boundary = len(fake_llm.requests)
    before = fake_llm.requests[:boundary]
    rerun = start("rerun.log", api_url=str(get_current_settings().api.url))
    t_rerun = time.monotonic()
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert "DONE" in (tmp_path / "rerun.log").read_text()
    assert (out / "manifest.json").exists() and (out / "train.parquet").exists()
    after = fake_llm.requests[boundary:]

    settled = {_identity(e) for e in before if e["status"] == 200 and e["t_end"] < kill_time - SETTLED}
    answered = {_identity(e) for e in before if e["status"] == 200}
    asked_again = {_identity(e) for e in after}
    print(f"killed run: first request after {before[0]['t'] - t_start:.1f} s, killed after "
          f"{kill_time - t_start:.1f} s; rerun took {time.monotonic() - t_rerun:.1f} s")
    print(f"before kill: {len(before)} requests ({len(settled)} settled); rerun: {len(after)} requests; "
          f"repeated: {len(answered & asked_again)}")
    assert len(settled) >= 5  # the kill came late enough to test something
    assert not settled & asked_again, "calls completed before the kill were made again"
    assert len(answered & asked_again) <= 2 * CONCURRENCY  # at most the calls in flight at the kill
    assert after, "the rerun should have finished the calls the killed run had not made"
    assert _processes_with(marker) == []  # and the rerun left nothing running
