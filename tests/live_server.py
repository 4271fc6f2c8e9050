"""A real `prefect server start` on a random loopback port, shared by the server, Dask and browser tests.

Not a conftest: the tests that need it import `live_prefect_server`. The server is started once per pytest
process (the first fixture use) and stopped at session end; every process it or the tests start is killed
by process group, and any survivor found by walking /proc is killed too, so no orphan outlives the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")
STARTUP_TIMEOUT_S = 120.0
BASE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the stat fields after the command name) of every live process, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                yield int(entry.name), fields


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children that left the process group included)."""
    children: dict[int, list[int]] = {}
    for child, fields in _live_processes():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (zombies are not)."""
    wanted = set(pids)
    return [pid for pid, _ in _live_processes() if pid in wanted]


def in_group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def in_session(sid: int) -> list[int]:
    """Live processes of a session (an orphaned child server stays in its session)."""
    return [pid for pid, fields in _live_processes() if int(fields[3]) == sid]


def kill_tree(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it and any descendant still alive."""
    if proc.poll() is None:
        tree = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    else:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class LiveServer:
    """A running Prefect server and the environment that points clients at it."""

    port: int
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path
    spawned: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **BASE_ENV, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api, **extra}

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
        """Run `prefect ARGS` from the repo root against this server; fail the test with its output."""
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}")
        return output

    def spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a background process in its own group; it is killed at teardown if still running."""
        proc = subprocess.Popen(args, cwd=REPO, env=env or self.env(), stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.spawned.append(proc)
        return proc

    def stop(self) -> None:
        for proc in [*self.spawned, self.proc]:
            kill_tree(proc)


def start_server(home: Path, port: int | None = None, env: dict[str, str] | None = None) -> LiveServer:
    """`prefect server start` on `port` (a free one by default) with its database under `home`; started again
    on the same home and port, it is the same server after a restart. `env`: extra server settings."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = home / f"server-{int(time.time() * 1000)}.log"
    # the UI must call the API on this port, not the default 4200 it would otherwise be told
    env = {**os.environ, **BASE_ENV, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           **(env or {})}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=home,
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = LiveServer(port, home, proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.api}/health", timeout=2).json() is True:
                return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"prefect server not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{log.read_text()[-3000:]}")


_SERVER: LiveServer | None = None


@pytest.fixture(scope="session")
def live_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server per pytest process, whichever test module asks first; stopped at session end."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = start_server(tmp_path_factory.mktemp("prefect-server"))
    yield _SERVER
    _SERVER.stop()


def flow_run(server: LiveServer, run_id: str) -> dict[str, Any]:
    return server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]


def run_family(server: LiveServer, run_id: str) -> list[str]:
    """A flow run and all its nested subflow runs (artifacts of stages live on the subflows)."""
    ids, todo = [run_id], [run_id]
    while todo:
        children = server.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [todo.pop()]}}})
        for child in children:
            ids.append(child["id"])
            todo.append(child["id"])
    return ids


def artifacts(server: LiveServer, run_ids: list[str]) -> list[dict[str, Any]]:
    return server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": run_ids}}})


POOL = "codeclm-process"
GENERATE_SEEDS = "data/seeds.parquet"  # relative: resolves only if the pull step set the working directory
STAGE_KEYS = ("generate-progress", "generate-stages")  # both on the generate run itself


@dataclass
class DeployedRun:
    """The `generate` deployment run once by a process worker, and where to find what it made."""

    run_id: str
    pipeline_id: str
    name: str
    out: Path
    worker_log: Path
    artifact_ids: dict[str, str]
    timings: dict[str, float]

    @property
    def artifact_keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.artifact_ids))


def fake_roles(url: str) -> dict[str, Any]:
    role = {"api_base": url, "output_mode": "json_schema", "timeout": 30.0}
    return {name: {"model": f"openai/fake-{name}", **role} for name in ("strong", "target", "judge")}


def trigger(server: LiveServer, deployment: str, **params: Any) -> str:
    """`prefect deployment run DEPLOYMENT --param k=v ...` (JSON for nested values); returns the run id."""
    args = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]
    created = server.cli("deployment", "run", deployment, *(a for arg in args for a in ("--param", arg)))
    return next(line.split("UUID:")[1].strip() for line in created.splitlines() if "UUID:" in line)


def work_once(server: LiveServer, queue: str, log: Path, home: Path, timeout: float = 420) -> None:
    """`prefect worker start --run-once` on one queue of the pool, as a user would start it, with a timeout."""
    worker = server.spawn([PREFECT, "worker", "start", "--pool", POOL, "--work-queue", queue, "--run-once"], log,
                          env=server.env(CODECLM_HOME=str(home)))
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(worker)
        pytest.fail(f"worker did not finish in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def completed(server: LiveServer, run_id: str, log: Path) -> dict[str, Any]:
    run = flow_run(server, run_id)
    if run["state_type"] != "COMPLETED":
        pytest.fail(f"run {run_id} ended {run['state_type']}:\n{log.read_text()[-4000:]}")
    return run


def _deploy_and_run(server: LiveServer, llm_url: str, work: Path) -> DeployedRun:
    timings: dict[str, float] = {}
    started = time.monotonic()
    server.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    server.cli("--no-prompt", "deploy", "--prefect-file", "deployments.yaml", "--all")
    timings["pool+deploy"] = time.monotonic() - started

    out = work / "dataset"
    settings = {**fake_roles(llm_url), "n_metadata": 6, "instructions_per_metadata": 2, "n_rubrics": 2,
                "max_rounds": 1, "budget": 50, "batch_size": 10, "max_parallel_batches": 3}
    started = time.monotonic()
    run_id = trigger(server, "codeclm-generate/generate", seeds=GENERATE_SEEDS, out=str(out), settings=settings)
    worker_log = work / "worker.log"
    work_once(server, "default", worker_log, work / "home")
    timings["run (worker)"] = time.monotonic() - started
    run = completed(server, run_id, worker_log)
    family = run_family(server, run_id)
    ids = {a["key"]: a["id"] for a in artifacts(server, family) if a["key"]}
    return DeployedRun(run_id, family[1], run["name"], out, worker_log, ids, timings)


_RUN: DeployedRun | None = None


@pytest.fixture(scope="session")
def deployed_generate_run(live_prefect_server: LiveServer, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[DeployedRun]:
    """Pool created, deployments.yaml deployed, `generate` triggered from the CLI and run by a worker, once."""
    from codeclm.testing.fake_llm import FakeLLMServer

    global _RUN
    with FakeLLMServer() as llm:
        if _RUN is None:
            _RUN = _deploy_and_run(live_prefect_server, llm.url, tmp_path_factory.mktemp("deployed-run"))
        yield _RUN
