"""Scale-out of the batch tasks onto Dask: an existing scheduler, or a local cluster of worker processes.

Batch tasks are safe in several processes: their inputs are content hashes and settings, their outputs go
to content-addressed folders under `home/work`, and the LLM call cache under `home/calls` is written with
rename-into-place, so processes share work through the disk and hold no global state that matters.

What Dask cannot do is run against Prefect's ephemeral API: every worker process would try to start its own
temporary server and fail ("Server process did not start"), leaving orphan servers behind. So a real
Prefect server is required, and we say so before starting any worker.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from codeclm.errors import ConfigError
from codeclm.settings import Settings

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

NEEDS_SERVER = (
    "task_runner='dask' needs a running Prefect server: Dask worker processes cannot share the ephemeral API "
    "this process would start. Start one with `prefect server start` and set "
    "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`), or use "
    "task_runner='threads'"
)


def api_env() -> dict[str, str]:
    """The Prefect API settings a worker process needs, taken from the current settings (profile, env, or a
    test harness's temporary settings, which spawned processes would not otherwise see)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if not api.url:
        raise ConfigError(NEEDS_SERVER)
    env = {"PREFECT_API_URL": str(api.url)}
    if api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = api.auth_string.get_secret_value()
    if api.key is not None:
        env["PREFECT_API_KEY"] = api.key.get_secret_value()
    return env


def dask_runner(settings: Settings) -> DaskTaskRunner:
    """A DaskTaskRunner for `settings`: connect to `dask_address`, or start `dask_workers` local processes
    sharing `max_parallel_batches` threads. Raises ConfigError when no Prefect server is configured."""
    env = api_env()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("task_runner='dask' needs prefect-dask; install the extra: "
                          "pip install 'codeclm-factory[dask]'") from None
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    cluster: dict[str, Any] = {
        "n_workers": settings.dask_workers,
        "threads_per_worker": max(1, math.ceil(settings.max_parallel_batches / settings.dask_workers)),
        "processes": True,
        "dashboard_address": None,  # no fixed port to collide with; point a real deployment at a scheduler
        "env": env,
    }
    return DaskTaskRunner(cluster_kwargs=cluster)
