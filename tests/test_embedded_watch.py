"""The embedded model server is watched: killed mid-run, the run stops at once with one line that says it died,
how, where its log is and what the log said last; calls completed before the death stay cached.

In the default suite: it needs the `local` extra (installed by `make test`), and one real call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def _wait_for(predicate: object, what: str, proc: subprocess.Popen[str], limit: float = 400) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            pytest.fail(f"codeclm exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {limit:.0f}s")
        time.sleep(0.2)


def _server_pid(parent: int) -> int | None:
    found = subprocess.run(["pgrep", "-P", str(parent), "-f", "llama_cpp.server"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def test_killed_server_stops_the_run_with_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="needs the local extra (make install)")
    seeds = tmp_path / "seeds.parquet"
    pd.read_parquet(ROOT / "data" / "seeds.parquet").iloc[:3].to_parquet(seeds, index=False)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "codeclm.cli", "generate", str(seeds), "--out", str(out),
                             "--config", str(ROOT / "data" / "demo.toml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = home / "embedded-server.log"
    try:
        _wait_for(lambda: _server_pid(proc.pid) is not None, "embedded server", proc)
        server = _server_pid(proc.pid)
        assert server is not None
        # kill it mid-run: after its first answer (which must stay cached), while the run still needs it
        _wait_for(lambda: log.exists() and "POST /v1/chat/completions" in log.read_text(errors="replace"),
                  "completed call", proc)
        os.kill(server, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, stderr[-3000:]
    assert last.startswith("error: the embedded model server died (signal SIGKILL); "), stderr[-3000:]
    assert f"log: {log}" in last and "; last lines: " in last and "completed calls are cached" in last
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "died (signal SIGKILL) while the run needed it" in log.read_text(errors="replace")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing published
    cached = [json.loads(p.read_text()) for p in (home / "calls").rglob("*.json")]
    assert cached and all(entry["text"] for entry in cached)  # the answer before the death is kept
