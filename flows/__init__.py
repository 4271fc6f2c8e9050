"""Prefect flows: generate, evaluate, refresh, run. Orchestration only."""

from codeclm.ops.prefect_api import tie_prefect_server

tie_prefect_server()  # a temporary Prefect server started for these flows dies with this process
