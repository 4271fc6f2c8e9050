"""End to end on the real embedded model: `codeclm generate` with SmolLM2 served by llama.cpp, offline.

Slow (the model runs on the CPU), so it uses three seeds and the demo's small settings; it must pass.
"""

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
CODECLM = [sys.executable, "-m", "codeclm.cli"]

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(900)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _llama_servers() -> set[int]:
    """PIDs of running llama.cpp servers (ours serve the SmolLM2 GGUF)."""
    out = subprocess.run(["pgrep", "-f", "llama_cpp.server.*SmolLM2"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    rows = pd.read_parquet(ROOT / "data" / "seeds.parquet").iloc[[0, 4, 8]]
    path = tmp_path / "seeds.parquet"
    rows.to_parquet(path, index=False)
    return path


def test_generate_on_embedded_model(tmp_path: Path, seeds: Path) -> None:
    before = _llama_servers()
    out = tmp_path / "out"
    proc = subprocess.run([*CODECLM, "generate", str(seeds), "--out", str(out), "--config",
                           str(ROOT / "data" / "demo.toml")], env=_env(tmp_path), capture_output=True, text=True,
                          cwd=tmp_path, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["seeds"] == 3
    assert sum(counts["metadata"].values()) >= 1
    ended = counts["train"] + sum(counts["rejected"].values()) + counts["failed_instructions"]
    assert ended == counts["basic_instructions"] >= 1
    assert manifest["totals"]["calls"] > 0 and manifest["totals"]["cost_usd"] == 0
    train = pd.read_parquet(out / "train.parquet")
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) == len(train)
    for line, row in zip(lines, train.itertuples(), strict=True):
        messages = json.loads(line)["messages"]  # the respond prompt's system message, the instruction, the answer
        assert messages[0]["role"] == "system" and messages[-2]["content"] == row.instruction
    assert _llama_servers() <= before, "the embedded server outlived codeclm"

    log = tmp_path / "home" / "embedded-server.log"
    posts = log.read_text().count("POST /v1/chat/completions")
    failed_first = len(pd.read_parquet(out / "failed_calls.parquet"))
    rerun = subprocess.run([*CODECLM, "generate", str(seeds), "--out", str(out), "--config",
                            str(ROOT / "data" / "demo.toml")], env=_env(tmp_path), capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    repeated = log.read_text().count("POST /v1/chat/completions") - posts
    # Completed calls are never made again; only calls that failed in the first run are retried.
    assert posts > 0
    assert repeated <= failed_first * 12, f"{repeated} requests on rerun for {failed_first} failed calls"


def test_ctrl_c_stops_the_embedded_server(tmp_path: Path, seeds: Path) -> None:
    before = _llama_servers()
    # Ctrl-C's default disposition even when this test runs in a background job, whose children inherit SIGINT as
    # ignored (then Python never raises KeyboardInterrupt and the run would just finish)
    proc = subprocess.Popen([*CODECLM, "generate", str(seeds), "--out", str(tmp_path / "out"), "--config",
                             str(ROOT / "data" / "demo.toml")], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (_llama_servers() - before) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert _llama_servers() - before, "the embedded server never started"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr.splitlines()[-1]
    deadline = time.monotonic() + 20
    while _llama_servers() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (_llama_servers() - before), "the embedded server outlived Ctrl-C"
    assert not (tmp_path / "out").exists(), "an interrupted run must not publish"
