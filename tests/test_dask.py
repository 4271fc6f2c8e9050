"""Scale-out on Dask: `generate` on a real local cluster of two worker processes makes the same dataset as the
default thread runner, against a real Prefect server; without a server the user gets one clear line.

Run: `pytest -m server tests/test_dask.py` (shares the Prefect server with the e2e and browser tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for
from live_server import REPO, LiveServer, descendants, in_session, live_prefect_server

from codeclm.errors import ConfigError
from codeclm.ops.scaleout import dask_runner
from codeclm.settings import Settings
from codeclm.testing.fake_llm import FakeLLMServer

__all__ = ["live_prefect_server"]  # fixture shared with the e2e and browser modules

SEEDS = REPO / "data" / "seeds.parquet"
SMALL = {"n_metadata": 6, "instructions_per_metadata": 2, "n_rubrics": 2, "max_rounds": 1, "budget": 100,
         "batch_size": 7, "max_parallel_batches": 4}


def test_dask_without_a_prefect_server_is_a_clear_config_error() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError) as error:
        dask_runner(Settings(task_runner="dask"))
    message = str(error.value)
    assert "needs a running Prefect server" in message
    assert "prefect server start" in message and "PREFECT_API_URL" in message


def test_dask_runner_forwards_the_api_to_worker_processes() -> None:
    """Workers of a local cluster get the API URL even when it lives only in this process's settings (a test
    harness, a profile), and an existing scheduler is used as is."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = "http://127.0.0.1:4299/api"
    with temporary_settings({PREFECT_API_URL: api}):
        local = dask_runner(Settings(task_runner="dask", dask_workers=2, max_parallel_batches=5))
        remote = dask_runner(Settings(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["threads_per_worker"] == 3
    assert local.cluster_kwargs["processes"] is True and local.cluster_kwargs["env"]["PREFECT_API_URL"] == api
    assert (remote.address, remote.cluster_kwargs) == ("tcp://10.0.0.5:8786", {})


@pytest.mark.server
def test_cli_says_why_dask_needs_a_server_and_leaves_no_process(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """The measured failure was 'Server process did not start' plus an orphan server; now: exit 2, one line."""
    config = tmp_path / "codeclm.toml"
    config.write_text('task_runner = "dask"\n' + "".join(
        f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{fake_llm.url}"\noutput_mode = "json_schema"\n'
        for role in ("strong", "target", "judge")))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    child = subprocess.Popen([str(Path(sys.executable).parent / "codeclm"), "generate", str(SEEDS), "--out",
                              str(tmp_path / "out"), "--config", str(config)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=240)
    finally:
        leftovers = [pid for pid in in_session(child.pid) if pid != child.pid]
        for pid in leftovers:
            os.kill(pid, 9)
    assert child.returncode == 2, stderr[-3000:]
    assert "error: task_runner='dask' needs a running Prefect server" in stderr
    assert "Server process did not start" not in stderr
    assert leftovers == []
    assert not (tmp_path / "out").exists()


class _WorkerWatch:
    """Samples this process's spawned children while a run is in flight: the Dask worker processes."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for pid in descendants(os.getpid()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"multiprocessing.spawn" in cmdline:
                    self.seen.add(pid)

    def __enter__(self) -> _WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rows(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out / "train.parquet")
    return frame.sort_values("pair_id").reset_index(drop=True)


@pytest.mark.server
def test_generate_on_local_dask_cluster_matches_threads(live_prefect_server: LiveServer, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.generate import generate

    results: dict[str, Any] = {}
    with FakeLLMServer() as llm, temporary_settings({PREFECT_API_URL: live_prefect_server.api}):
        for runner in ("threads", "dask"):
            # separate homes: the Dask run must make every call itself, not read the threads run's cache
            # and no hedged copies: when a slow request gets a second copy depends on timing, not on the runner
            settings = settings_for(llm, tmp_path / runner, task_runner=runner, dask_workers=2, hedge=False, **SMALL)
            before = len(llm.requests)
            with _WorkerWatch() as watch:
                summary = generate(str(SEEDS), str(tmp_path / runner / "out"), settings)
            results[runner] = {"summary": summary, "calls": len(llm.requests) - before, "workers": watch.seen}

    threads, dask = _rows(tmp_path / "threads" / "out"), _rows(tmp_path / "dask" / "out")
    assert len(threads) > 0
    pd.testing.assert_frame_equal(threads, dask)
    assert results["dask"]["summary"].counts == results["threads"]["summary"].counts
    assert results["dask"]["calls"] == results["threads"]["calls"] > 0
    assert results["threads"]["workers"] == set()
    assert len(results["dask"]["workers"]) >= 2  # the batch tasks ran in two spawned worker processes
