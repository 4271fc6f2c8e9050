"""Cancellation and crash drills on `codeclm generate` against the deterministic loopback server.

SIGTERM or SIGINT while calls hang: out within 10 s with 143/130 and the resume line, nothing published, no process
left, completed calls cached; the rerun repeats none of them and publishes what a clean run publishes. kill -9 of
the process group at ten points across the stages, each followed by a rerun: the same dataset as an uninterrupted
run, for a few repeated requests. kill -9 of `codeclm` alone: its temporary Prefect server goes with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from live_server import alive, descendants, in_group

from codeclm.ops.interrupt import RESUME
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(600, method="thread")
SEEDS = [
    ("c1", "Write a haiku about the first snow of winter."),
    ("c2", "How do I undo the last commit in git without losing my changes?"),
    ("c3", "Summarise the causes of the French Revolution in five bullet points."),
    ("c4", "Plan a three-day vegetarian meal plan for a student on a budget."),
]
CONCURRENCY = 2  # per endpoint (strong, target): at most 4 calls in flight
SETTINGS = """
n_metadata = 4
instructions_per_metadata = 2
n_rubrics = 2
max_rounds = 2
budget = 20
batch_size = 2
backoff_base = 0.01
backoff_max = 0.05
"""
ROLE = """
[{role}]
model = "openai/fake-{role}"
api_base = "{url}"
output_mode = "json_schema"
timeout = 120.0
max_concurrency = {concurrency}
"""
SETTLED = 2.0  # a response logged this long before a signal has reached the gateway's cache (on a busy machine)
TABLES = ("train.parquet", "rejected.parquet", "failed_calls.parquet")


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


def _setup(tmp_path: Path, llm: FakeLLMServer) -> tuple[Path, Path]:
    seeds = tmp_path / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(seeds, orient="records", lines=True)
    config = tmp_path / "codeclm.toml"
    config.write_text(SETTINGS + "".join(ROLE.format(role=r, url=llm.url, concurrency=CONCURRENCY)
                                         for r in ("strong", "target")))
    return seeds, config


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """A `codeclm` environment of its own: a home (call cache), a Prefect home; Prefect's API server is either
    `api_url` (a persistent one) or a temporary one the run starts itself."""
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"CODECLM_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
            "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    return env | ({"PREFECT_API_URL": api_url} if api_url else {})


def _start(seeds: Path, config: Path, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`codeclm generate` in a process group of its own, with SIGINT at its default (not a background job's)."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "codeclm.cli", "generate", str(seeds), "--out", str(out), "-c", str(config)],
            cwd=seeds.parent, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(condition: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended first ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"condition not met in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two requests the same call."""
    return entry["model"], entry["messages_sha"], entry["temperature"], entry["max_tokens"], entry["response_format"]


def _cached(home: Path) -> int:
    return sum(1 for _ in (home / "calls").rglob("*.json"))


def _dataset(out: Path) -> dict[str, pd.DataFrame]:
    """The published tables, in a canonical row order; and nothing lost: every basic instruction ends exactly once,
    as kept, rejected or failed."""
    tables = {name: pd.read_parquet(out / name) for name in TABLES}
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    failed = set(tables["failed_calls.parquet"]["instruction_id"].dropna())
    ends = [*tables["train.parquet"]["instruction_id"], *tables["rejected.parquet"]["instruction_id"], *failed]
    assert len(ends) == len(set(ends)), "an instruction ended twice"
    assert counts["basic_instructions"] == len(ends) > 0
    return {name: _canonical(frame) for name, frame in tables.items()}


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    return frame.iloc[frame.astype(str).agg("|".join, axis=1).argsort()].reset_index(drop=True)


def _same_dataset(out: Path, clean: Path) -> None:
    got, want = _dataset(out), _dataset(clean)
    for name in TABLES:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)


def _exit_after(proc: subprocess.Popen[bytes], stop: Callable[[], object]) -> tuple[int, float]:
    """Stop the run with `stop()`; its exit code and the seconds it took to exit (the group is killed after 30 s)."""
    sent = time.monotonic()
    stop()
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, time.monotonic() - sent


def _signal_during_hangs(tmp_path: Path, llm: FakeLLMServer, signum: int, api: str | None = None) -> dict[str, Any]:
    """Run with every target call hanging; signal once calls hang; check how the run ended. Without `api`, the run
    starts its own temporary Prefect server, which must be gone with it."""
    seeds, config = _setup(tmp_path, llm)
    home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "signalled.log"
    llm.set_faults([{"kind": "hang", "match": "fake-target"}])  # the target's answers never come
    began = time.monotonic()
    proc = _start(seeds, config, out, _env(home, api), log)
    _wait_for(lambda: llm.in_flight >= CONCURRENCY and len(llm.requests) >= 10, proc, log)
    print(f"first request after {llm.requests[0]['t'] - began:.1f} s, signal after {time.monotonic() - began:.1f} s")
    time.sleep(SETTLED + 0.5)  # the hung calls are on their first attempt; the strong calls before them settle
    children = descendants(proc.pid)
    assert children or api, "codeclm started no temporary Prefect server"
    sent = time.monotonic()  # calls that ended SETTLED s before this were complete, and must be kept
    code, took = _exit_after(proc, lambda: proc.send_signal(signum))
    text = log.read_text()
    print(f"signal {signal.Signals(signum).name}: exit {code} after {took:.1f} s; {len(llm.requests)} requests "
          f"answered, {llm.in_flight} hanging")
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], text[-3000:]
    assert took <= 10.0, f"took {took:.1f} s to exit:\n{text[-3000:]}"
    assert text.strip().splitlines()[-1] == RESUME  # the last line says how to resume
    time.sleep(0.5)
    assert alive(children) == [] and in_group(proc.pid) == []  # its servers went with it
    assert not out.exists()  # nothing published
    answered = [e for e in llm.requests if e["status"] == 200]
    settled = {_identity(e) for e in answered if e["t_end"] < sent - SETTLED}
    assert len(settled) >= 5 and _cached(home) >= len(settled)  # completed calls are kept
    return {"seeds": seeds, "config": config, "home": home, "out": out, "settled": settled}


def test_sigterm_while_calls_hang_exits_in_seconds_and_leaves_nothing(tmp_path: Path, llm: FakeLLMServer,
                                                                      prefect_harness: None) -> None:
    """On the session's Prefect server (fast enough for every test run); the slow variants below start their own."""
    from prefect.settings import get_current_settings

    _signal_during_hangs(tmp_path, llm, signal.SIGTERM, str(get_current_settings().api.url))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_while_calls_hang_then_rerun_repeats_no_call_and_matches_a_clean_run(
        tmp_path: Path, llm: FakeLLMServer, signum: int, prefect_harness: None) -> None:
    """The signalled run starts its own Prefect server; the rerun and the clean run share the session's."""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url)
    run = _signal_during_hangs(tmp_path, llm, signum)
    llm.set_faults([])
    boundary = len(llm.requests)
    log = tmp_path / "rerun.log"
    rerun = _start(run["seeds"], run["config"], run["out"], _env(run["home"], api), log)
    assert rerun.wait(timeout=300) == 0, log.read_text()[-3000:]
    asked_again = {_identity(e) for e in llm.requests[boundary:]}
    assert not run["settled"] & asked_again, "calls completed before the signal were made again"

    clean_log = tmp_path / "clean.log"
    clean = _start(run["seeds"], run["config"], tmp_path / "clean", _env(tmp_path / "clean-home", api), clean_log)
    assert clean.wait(timeout=300) == 0, clean_log.read_text()[-3000:]
    _same_dataset(run["out"], tmp_path / "clean")


@pytest.mark.slow
def test_kill_9_of_codeclm_leaves_no_process_behind(tmp_path: Path, llm: FakeLLMServer) -> None:
    """Only the `codeclm` process is killed (not its group): its temporary Prefect server must die with it."""
    seeds, config = _setup(tmp_path, llm)
    log = tmp_path / "killed.log"
    proc = _start(seeds, config, tmp_path / "out", _env(tmp_path / "home"), log)
    _wait_for(lambda: len(llm.requests) >= 10, proc, log)
    children = descendants(proc.pid)
    assert children, "codeclm started no temporary Prefect server"
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(children) == [], f"outlived codeclm: {alive(children)}"


KILLS = 10


@pytest.mark.slow
def test_kill_9_at_ten_points_then_rerun_makes_the_clean_dataset(tmp_path: Path, llm: FakeLLMServer,
                                                                   prefect_harness: None) -> None:
    """The runs share the session's Prefect server (no server boot per run). Kill points are spread evenly over
    the requests of an uninterrupted run, so they fall in every stage (encode .. rounds)."""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url)
    seeds, config = _setup(tmp_path, llm)
    clean_log = tmp_path / "clean.log"
    clean = _start(seeds, config, tmp_path / "clean", _env(tmp_path / "clean-home", api), clean_log)
    assert clean.wait(timeout=300) == 0, clean_log.read_text()[-3000:]
    calls = len(llm.requests)

    home, out = tmp_path / "home", tmp_path / "out"
    start = len(llm.requests)
    kills: list[int] = []
    for point in range(1, KILLS + 1):
        log = tmp_path / f"killed-{point}.log"
        proc = _start(seeds, config, out, _env(home, api), log)
        target = start + calls * point // (KILLS + 1)
        deadline = time.monotonic() + 180
        while len(llm.requests) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            kills.append(len(llm.requests) - start)
        assert in_group(proc.pid) == []
        assert not out.exists() or (out / "manifest.json").exists()  # never half-published
    log = tmp_path / "rerun.log"
    rerun = _start(seeds, config, out, _env(home, api), log)
    assert rerun.wait(timeout=300) == 0, log.read_text()[-3000:]
    extra = len(llm.requests) - start - calls
    print(f"uninterrupted run: {calls} requests; {len(kills)} kills at {kills}; {extra} extra requests in all")
    assert len(kills) >= KILLS - 1  # (the last point may fall after the final request)
    _same_dataset(out, tmp_path / "clean")
    assert extra <= len(kills) * 2 * CONCURRENCY  # at most the calls in flight at each kill


@pytest.mark.slow
def test_prefect_cancel_stops_a_run_started_without_a_worker(tmp_path: Path, llm: FakeLLMServer,
                                                           prefect_harness: None) -> None:
    """What the UI's Cancel button and `prefect flow-run cancel` do (set the run Cancelling), while calls hang:
    the run stops within seconds and ends Cancelled, subflow included, with nothing published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.settings import get_current_settings
    from prefect.states import Cancelling

    seeds, config = _setup(tmp_path, llm)
    out, log = tmp_path / "out", tmp_path / "cancelled.log"
    llm.set_faults([{"kind": "hang", "match": "fake-target"}])
    proc = _start(seeds, config, out, _env(tmp_path / "home", str(get_current_settings().api.url)), log)
    _wait_for(lambda: llm.in_flight >= CONCURRENCY, proc, log)
    with get_client(sync_client=True) as client:
        top = FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))
        run = next(r for r in client.read_flow_runs(flow_run_filter=top) if r.parameters.get("out") == str(out))
        code, took = _exit_after(proc, lambda: client.set_flow_run_state(
            run.id, Cancelling(message="cancelled by the drill")))
        print(f"cancel: exit {code} after {took:.1f} s")
        assert code == 143 and took <= 10.0, log.read_text()[-3000:]
        family = [run, *client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [run.id]}))]
        states = {r.name: client.read_flow_run(r.id).state_type.value for r in family}
    assert states and set(states.values()) == {"CANCELLED"}, states
    assert log.read_text().strip().splitlines()[-1] == RESUME
    assert not out.exists()


def test_the_owner_of_a_run_is_told_dead_from_alive_and_from_a_later_process_with_its_pid() -> None:
    """codeclm.ops.run_owner: a run's recorded process is gone when its pid is free, reused by a later process
    (another start time) or the machine restarted; another host's run is never judged."""
    import socket

    from codeclm.ops.run_owner import owner_gone, owner_token

    me = owner_token()
    prefix, host, boot, pid, started = me.split(":")
    assert (prefix, host, int(pid)) == ("codeclm", socket.gethostname(), os.getpid()) and not owner_gone(me)
    free = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 10_000
    assert owner_gone(f"codeclm:{host}:{boot}:{free}:{started}")
    assert owner_gone(f"codeclm:{host}:{boot}:{pid}:{int(started) + 1}")  # the pid, reused by a later process
    assert owner_gone(f"codeclm:{host}:other-boot:{pid}:{started}")
    assert not owner_gone(f"codeclm:another-host:{boot}:{free}:{started}") and not owner_gone(None)
    assert not owner_gone("12345")  # a worker's pid: Prefect's own business
