"""Prefect flows: generate, evaluate, refresh, run. Orchestration only."""
