"""Prefect's temporary API server, booted in its own process while this one loads litellm and checks the models.

Without a configured server (PREFECT_API_URL), Prefect starts a temporary one when the first flow starts: it
imports its server code into this process first (seconds, on the critical path) and then waits for the server
process to boot (more seconds). Here the same server process (Prefect's own command and environment) starts as
soon as the CLI has read its input, boots beside litellm's import and the preflight, and the flow is pointed at
it. If it cannot start, nothing is set and Prefect starts its own as usual, reporting what went wrong.

Either server is a child tied to this process (codeclm.ops.processes.spawn): a kill -9 of codeclm, or of a script
calling a flow, leaves no server behind (Prefect's own would be re-parented to init and keep serving).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from codeclm.ops.processes import free_port, spawn, stop

HEALTH_POLL_S = 0.1


class EarlyAPI:
    """A temporary Prefect API server started now; `ready()` waits for it and points Prefect at it."""

    def __init__(self) -> None:
        from prefect.settings import get_current_settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.timeout = get_current_settings().server.ephemeral.startup_timeout_seconds
        args, env = server_command(self.port)
        self.proc: subprocess.Popen[bytes] | None = spawn(args, env=env, stdout=subprocess.DEVNULL,
                                                          stderr=subprocess.DEVNULL)
        self._stack = ExitStack()
        atexit.register(self.close)

    def ready(self) -> bool:
        """Wait until the server answers, then point Prefect (and any process it starts) at it; False, and the
        server stopped, if it did not come up: Prefect then starts its own."""
        deadline = time.monotonic() + self.timeout
        with httpx.Client() as client:
            while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health", timeout=2).status_code == 200:
                        from prefect.settings import PREFECT_API_URL, temporary_settings

                        os.environ["PREFECT_API_URL"] = self.url
                        self._stack.enter_context(temporary_settings(updates={PREFECT_API_URL: self.url}))
                        return True
                time.sleep(HEALTH_POLL_S)
        self.close()
        tie_prefect_server()  # Prefect starts its own now
        return False

    def close(self) -> None:
        """Stop the server (at exit, or when it failed to start)."""
        self._stack.close()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]
        stop(proc, timeout=5)
        if self in _EARLY:
            _EARLY.remove(self)


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """What Prefect's SubprocessASGIServer runs for a temporary server (prefect 3.9): arguments and environment."""
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    return args, env


def tie_prefect_server() -> None:
    """When Prefect will start its own temporary server (no server configured and none of ours: a script or a
    test calling a flow, or the early server failed), start it as a child tied to this process like ours, so a
    kill -9 leaves no server behind; Prefect itself starts a plain subprocess that outlives us."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url or not current.server.ephemeral.enabled or _EARLY:
        return
    from prefect.server.api.server import SubprocessASGIServer

    def run_tied(self: SubprocessASGIServer) -> subprocess.Popen[bytes]:
        args, env = server_command(int(self.port or 0))
        return spawn(args, env=env)

    SubprocessASGIServer._run_uvicorn_command = run_tied  # type: ignore[method-assign]


_EARLY: list[EarlyAPI] = []  # ours, while it runs: Prefect will not start one


def close_early() -> None:
    """Stop our temporary server now (an interrupted run exits without waiting for atexit)."""
    for api in list(_EARLY):
        api.close()


def start_early() -> EarlyAPI | None:
    """Start the temporary server now, unless a server is configured (PREFECT_API_URL: used as it is) or
    temporary servers are disabled."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url or not current.server.ephemeral.enabled:
        return None
    api = EarlyAPI()
    _EARLY.append(api)
    return api


def api_lost(exc: BaseException) -> str | None:
    """The one line to end a run with when `exc` came from Prefect's API going away mid-run (a persistent server
    stopped or restarted for longer than Prefect's client retries last: its tag-concurrency and state calls then
    fail); None for any other exception. Calls completed before are cached, so a rerun finishes the run."""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url or "")
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, httpx.TransportError):
            try:
                url = str(cause.request.url)
            except RuntimeError:  # an error raised before its request was set
                url = ""
            if api and url.startswith(api):
                return (f"the Prefect API at {api} stopped answering ({type(cause).__name__}); completed calls are "
                        "cached: once it is back, run the same command again to finish")
        cause = cause.__cause__ or cause.__context__
    return None
