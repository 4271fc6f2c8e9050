"""Shared test setup: an isolated Prefect/CodecLM home per session, the Prefect harness, the fake LLM server.

The environment is set at import time, before anything imports Prefect: Prefect reads its settings once, and
result storage left in ~/.prefect (or in the repo's `.codeclm/`, via pyproject) would make a later session
see `Cached` results from an earlier one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SESSION_DIR = Path(tempfile.mkdtemp(prefix="codeclm-tests-"))
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

ROLES = ("strong", "target", "judge")
ROLE_FIELDS = frozenset(RoleConfig.model_fields)
FAST_GATEWAY = {"backoff_base": 0.01, "backoff_max": 0.05}


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for the session; only flow tests ask for it (it costs ~15 s to start)."""
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
