"""Drills on a persistent Prefect server (`prefect server start`, as a team runs one): SIGTERM stops a run on the
Dask task runner with its worker processes; the server stopped for 20 s mid-run and started again; a run killed
with kill -9 ends Crashed instead of Running for ever.

Run: `pytest -m server tests/test_server_drills.py` (each starts its own server or shares the session's).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from live_server import (
    LiveServer,
    alive,
    descendants,
    flow_run,
    in_session,
    kill_tree,
    live_prefect_server,
    run_family,
    start_server,
)
from test_cancel import CONCURRENCY, _dataset, _env, _exit_after, _identity, _setup, _start, _wait_for

from codeclm.ops.interrupt import RESUME
from codeclm.testing.fake_llm import FakeLLMServer

__all__ = ["live_prefect_server"]  # fixture shared with the e2e, Dask and browser modules
pytestmark = [pytest.mark.server, pytest.mark.timeout(900, method="thread")]
DASK_EXIT_S = 15.0


def _dask_workers(pid: int) -> list[int]:
    """Dask's worker processes under `pid` (spawned by multiprocessing)."""
    found = []
    for child in descendants(pid):
        try:
            if b"multiprocessing" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


def test_sigterm_stops_a_run_on_the_dask_task_runner_within_15s_workers_included(
        live_prefect_server: LiveServer, tmp_path: Path) -> None:
    """Every target call hangs inside a Dask worker process; SIGTERM to `codeclm`: out with 143 and the resume
    line within 15 s, and no process of the run left, Dask's workers included."""
    with FakeLLMServer() as llm:
        seeds, config = _setup(tmp_path, llm)
        config.write_text('task_runner = "dask"\ndask_workers = 2\n' + config.read_text())
        out, log = tmp_path / "out", tmp_path / "dask.log"
        llm.set_faults([{"kind": "hang", "match": "fake-target"}])
        proc = _start(seeds, config, out, _env(tmp_path / "home", live_prefect_server.api), log)
        _wait_for(lambda: llm.in_flight >= CONCURRENCY and len(_dask_workers(proc.pid)) >= 2, proc, log, 300)
        workers, everything = _dask_workers(proc.pid), descendants(proc.pid)
        code, took = _exit_after(proc, lambda: proc.send_signal(signal.SIGTERM))
        text = log.read_text()
        print(f"dask: SIGTERM to exit {took:.1f} s, {len(workers)} workers, {len(everything)} processes under codeclm")
        assert code == 143, text[-3000:]
        assert took <= DASK_EXIT_S, f"took {took:.1f} s:\n{text[-3000:]}"
        assert text.strip().splitlines()[-1] == RESUME
        deadline = time.monotonic() + 5
        while (alive(everything) or in_session(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(workers) == [] and alive(everything) == [] and in_session(proc.pid) == []
        assert not out.exists()


OUTAGE_S = 20.0
LONG_OUTAGE_S = 90.0


def _answered(llm: FakeLLMServer) -> list[tuple[object, ...]]:
    """The identities of the requests the server answered (200), in order."""
    return [_identity(e) for e in llm.requests if e["status"] == 200]


@pytest.mark.parametrize("outage", [OUTAGE_S, LONG_OUTAGE_S], ids=["20s", "90s"])
def test_the_prefect_server_stopped_for_20s_mid_run_then_started_again(tmp_path: Path, outage: float) -> None:
    """A persistent server goes away for 20 s while `codeclm generate` runs on it, then comes back on the same
    port and database: the run goes on (or stops with one line) and a rerun finishes; no completed call is paid
    twice, and the published dataset is whole. 90 s outlasts Prefect's client retries (about 60 s)."""
    server = start_server(tmp_path / "server")
    try:
        with FakeLLMServer(latency=1.0) as llm:
            seeds, config = _setup(tmp_path, llm)
            home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "run.log"
            began = time.monotonic()
            proc = _start(seeds, config, out, _env(home, server.api), log)
            _wait_for(lambda: len(llm.requests) >= 12, proc, log, 300)
            kill_tree(server.proc)  # SIGTERM, as `systemctl stop` or Ctrl-C on `prefect server start` would
            stopped = time.monotonic()
            time.sleep(outage)
            server = start_server(tmp_path / "server", port=server.port)
            print(f"server down {time.monotonic() - stopped:.1f} s, from {stopped - began:.1f} s into the run "
                  f"({len(llm.requests)} requests so far)")
            try:
                code = proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    kill_tree(proc)
            text = log.read_text()
            first = _answered(llm)
            print(f"the run ended {code} after {time.monotonic() - began:.1f} s; last line: "
                  f"{text.strip().splitlines()[-1][:300]!r}")
            if code != 0:
                assert code == 2 and text.strip().splitlines()[-1].startswith("error: "), text[-3000:]
                rerun_log = tmp_path / "rerun.log"
                rerun = _start(seeds, config, out, _env(home, server.api), rerun_log)
                assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
            paid = _answered(llm)
            assert len(paid) == len(set(paid)), f"{len(paid) - len(set(paid))} completed calls paid twice"
            assert len(paid) >= len(first)
            _dataset(out)  # whole: every basic instruction ended once
            runs = server.post("/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})
            print("flow runs:", sorted(r["state_type"] for r in runs))
            assert "RUNNING" not in {r["state_type"] for r in runs}
    finally:
        server.stop()


def _top_run(server: LiveServer, out: Path) -> dict[str, object] | None:
    runs = server.post("/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})
    return next((r for r in runs if r["parameters"].get("out") == str(out)), None)


def test_a_run_killed_with_kill_9_on_a_persistent_server_is_marked_crashed_by_the_next_start(
        live_prefect_server: LiveServer, tmp_path: Path) -> None:
    """Before, the killed run stayed Running in the server's database for ever (nothing was left to report it).
    Now the next codeclm run on the host marks it and its subflows Crashed within seconds of starting."""
    from codeclm.ops.run_owner import PREFIX

    server = live_prefect_server
    with FakeLLMServer(latency=0.5) as llm:
        seeds, config = _setup(tmp_path, llm)
        home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "killed.log"
        proc = _start(seeds, config, out, _env(home, server.api), log)
        _wait_for(lambda: len(llm.requests) >= 8, proc, log, 300)
        killed = _top_run(server, out)
        assert killed is not None and str(killed["infrastructure_pid"]).startswith(f"{PREFIX}:")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3)
        family = run_family(server, str(killed["id"]))
        assert len(family) >= 2 and flow_run(server, str(killed["id"]))["state_type"] == "RUNNING"  # left behind

        began = time.monotonic()
        rerun_log = tmp_path / "rerun.log"
        rerun = _start(seeds, config, out, _env(home, server.api), rerun_log)
        states: list[str] = []
        while time.monotonic() - began < 120:
            states = [flow_run(server, run_id)["state_type"] for run_id in family]
            if "RUNNING" not in states:
                break
            time.sleep(0.5)
        took = time.monotonic() - began
        print(f"kill -9: the killed run and its {len(family) - 1} subflows were {sorted(set(states))} "
              f"{took:.1f} s after the next run started")
        assert set(states) == {"CRASHED"}, states
        message = flow_run(server, str(killed["id"]))["state"]["message"]
        assert "ended without reporting" in message and str(proc.pid) in message
        assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
        _dataset(out)
