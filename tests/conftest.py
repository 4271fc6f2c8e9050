"""Shared test setup: an isolated Prefect/CodecLM home per session, the Prefect harness, the fake LLM server.

The environment is set at import time, before anything imports Prefect: Prefect reads its settings once, and
result storage left in ~/.prefect (or in the repo's `.codeclm/`, via pyproject) would make a later session
see `Cached` results from an earlier one.

Under pytest-xdist (`make test` runs `pytest -n 4 --dist loadgroup`) every worker is its own pytest process: it
imports this file itself, so it gets its own homes, its own Prefect harness (a session fixture) and its own
loopback ports (every server here binds port 0). SAME_WORKER names the modules whose tests must share one worker.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")  # set by xdist before a worker imports this file
SESSION_DIR = Path(tempfile.mkdtemp(prefix=f"codeclm-tests-{WORKER}-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)

os.environ["PREFECT_HOME"] = str(SESSION_DIR / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(SESSION_DIR / "prefect" / "storage")
os.environ["CODECLM_HOME"] = str(SESSION_DIR / "codeclm")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # gateway tests log outside any flow run

import pytest  # noqa: E402

from codeclm.settings import RoleConfig, Settings  # noqa: E402
from codeclm.testing.fake_llm import FakeLLMServer  # noqa: E402

# Modules whose tests run on one xdist worker (`--dist loadgroup`), and why; the rest are spread over the workers
# one test at a time. A module-scoped fixture that does the work of every test would otherwise run once per worker.
SAME_WORKER = {
    # the `runs` fixture runs every bad-input case (a CLI subprocess each) for the module
    "test_cli_errors.py": "cli-errors",
    # the `setup` fixture runs the first evaluation that every test reads
    "test_evaluate.py": "evaluate",
    # one real Prefect server and one deployed `generate` run (session fixtures) serve all of these
    "test_deployments_e2e.py": "live-server", "test_ui_browser.py": "live-server", "test_dask.py": "live-server",
    # real models on the CPU: one at a time (each takes both cores; `_llama_servers` in test_embedded sees every
    # llama.cpp server on the machine; a served model's port is derived from its name)
    "test_embedded.py": "models", "test_embedded_watch.py": "models", "test_train.py": "models",
    "test_run_loop.py": "models", "test_protocol_train.py": "models",
}

ROLES = ("strong", "target", "judge")
ROLE_FIELDS = frozenset(RoleConfig.model_fields)
FAST_GATEWAY = {"backoff_base": 0.01, "backoff_max": 0.05}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest knows it only when xdist is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` whose groups are the SAME_WORKER modules. Groups are decided here, in the controller,
    by file name: xdist 3.8 reads `xdist_group` marks by rewriting test ids, which pytest 9.2 ignores, so the
    marks group nothing (pytest-dev/pytest-xdist#1386)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class SameWorkerScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = SAME_WORKER.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])
            return f"group:{group}" if group else super()._split_scope(nodeid)

    return SameWorkerScheduling(config, log)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API per session (per xdist worker); only flow tests ask for it (~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """A fresh fake OpenAI-compatible server per test; set `.latency`/`.responder` or faults as needed."""
    with FakeLLMServer() as server:
        yield server


def settings_for(server: FakeLLMServer, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with all three roles on the fake server (JSON-schema output), a per-test home and fast backoff.

    Keyword overrides that name a RoleConfig field (`output_mode`, `timeout`, `max_concurrency`, ...) apply to
    every role; anything else is a Settings field (`max_rounds=2`, `home=...`).
    """
    role_values = {"api_base": server.url, "output_mode": "json_schema", "timeout": 10.0}
    role_values |= {k: overrides.pop(k) for k in list(overrides) if k in ROLE_FIELDS}
    values: dict[str, Any] = {"home": tmp_path / "home", **FAST_GATEWAY, **overrides}
    values.setdefault("strong", "openai/fake-strong")
    values.setdefault("target", "openai/fake-target")
    judge = values.pop("judge", "openai/fake-judge")
    settings = Settings.load(None, **values)
    settings.judge.model = judge  # set after load: Settings.load would reset the judge's temperature of 0
    for role in ROLES:
        cfg = settings.role(role)
        for name, value in role_values.items():
            setattr(cfg, name, value)
    return settings


@pytest.fixture(name="settings_for")
def _settings_for_fixture() -> Any:
    """`settings_for` as a fixture, for tests that prefer injection over `from conftest import settings_for`."""
    return settings_for
