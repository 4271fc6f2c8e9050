"""Operations end to end, the way a user runs them: a real `prefect server start`, the process pool,
`prefect deploy --prefect-file deployments.yaml --all`, a CLI-triggered `generate` run picked up by
`prefect worker start --run-once`, and the REST API to check runs, artifacts, logs and the nightly schedule.

Run: `pytest -m server` (about 2-3 minutes on 2 cores; the browser test reuses the same server and run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from live_server import (
    GENERATE_SEEDS,
    REPO,
    STAGE_KEYS,
    DeployedRun,
    LiveServer,
    artifacts,
    completed,
    deployed_generate_run,
    fake_roles,
    live_prefect_server,
    run_family,
    trigger,
    work_once,
)

from codeclm.ops.versions import VersionStore
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.server
__all__ = ["deployed_generate_run", "live_prefect_server"]  # fixtures shared with the browser module


def _deployments(server: LiveServer) -> dict[str, dict]:
    return {d["name"]: d for d in server.post("/deployments/filter", {})}


def test_deploy_creates_every_deployment(deployed_generate_run: DeployedRun,
                                              live_prefect_server: LiveServer) -> None:
    server = live_prefect_server
    deployments = _deployments(server)
    assert set(deployments) == {"generate", "evaluate", "run", "protocol", "nightly"}
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    for d in deployments.values():
        assert d["pull_steps"] == pull, d["name"]
        assert d["work_pool_name"] == "codeclm-process"
        assert d["job_variables"] == {"working_dir": str(REPO)}  # the run starts in the repo: its pyproject applies
        assert d["enforce_parameter_schema"] is True
        # the UI renders this schema as the run form; `settings` is a typed nested form, not a JSON blob
        schema = d["parameter_openapi_schema"]
        assert "Settings" in schema["definitions"]
        assert schema["properties"]["settings"]["anyOf"][0] == {"$ref": "#/definitions/Settings"}

    nightly = deployments["nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["parameters"] == {"seeds": "data/drops", "root": ".codeclm/refresh", "eval_limit": 8}
    assert nightly["global_concurrency_limit"]["limit"] == 1  # refreshes never overlap
    assert nightly["work_queue_name"] == "refresh" and deployments["generate"]["work_queue_name"] == "default"
    assert {"seeds", "root", "benchmarks", "targets", "slot", "run_eval"} <= set(
        nightly["parameter_openapi_schema"]["properties"])

    # a real server schedules the cron: upcoming nightly runs exist, carrying the schedule's parameters
    deadline = time.monotonic() + 60
    while True:
        upcoming = server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}},
                                                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        if upcoming or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert upcoming, "the scheduler made no upcoming run for the nightly refresh"
    assert all(r["parameters"]["eval_limit"] == 8 for r in upcoming)
    assert all(r["expected_start_time"].endswith("T02:00:00Z") for r in upcoming)


def test_cli_triggered_generate_run_completes_with_monitoring(deployed_generate_run: DeployedRun,
                                                             live_prefect_server: LiveServer) -> None:
    server, run = live_prefect_server, deployed_generate_run
    family = run_family(server, run.run_id)
    assert len(family) == 2 and run.pipeline_id == family[1]
    runs = {r["id"]: r for r in server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": family}}})}
    assert all(r["state_type"] == "COMPLETED" for r in runs.values())
    assert runs[run.run_id]["name"] == f"generate · {GENERATE_SEEDS} → {run.out}"
    assert runs[run.pipeline_id]["name"] == f"pipeline · {GENERATE_SEEDS}"
    assert runs[run.run_id]["parameters"]["settings"]["strong"]["model"] == "openai/fake-strong"

    # what the run published, in the directory it was told (seeds resolved from the repo root)
    train = pd.read_parquet(run.out / "train.parquet")
    assert (run.out / "manifest.json").is_file() and list(train.columns)[:2] == ["pair_id", "instruction"]

    # one progress view for the run, at 100 %, with a row per stage; and the per-stage table of counts and cost
    found = {a["key"]: a for a in server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": family}}})}
    assert set(STAGE_KEYS) <= set(found) and set(STAGE_KEYS) <= set(run.artifact_keys)
    for key in STAGE_KEYS[:-1]:
        assert found[key]["type"] == "progress" and float(found[key]["data"]) == 100.0, key
        assert found[key]["flow_run_id"] == run.run_id
    assert "| encode | 3/3 | done |" in found["generate-progress"]["description"]  # 28 seeds, batches of 10
    assert not [a for a in found.values() if a["type"] == "progress" and a["key"] != "generate-progress"]
    table = found["generate-stages"]
    assert table["type"] == "table"
    assert {"stage", "calls", "prompt_tokens", "completion_tokens", "cost_usd"} <= set(table["data"].split('"'))

    # task runs say stage and batch, and carry the role tags
    tasks = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": family}}})
    names = {t["name"] for t in tasks}
    assert {"encode · batch 000", "decode · batch 000", "rubrics · batch 000", "rounds · batch 000"} <= names
    encode = next(t for t in tasks if t["name"] == "encode · batch 000")
    assert {"codeclm", "encode", "role:strong"} <= set(encode["tags"])
    assert all(t["state_type"] == "COMPLETED" for t in tasks)

    # logs reached the API and name batches
    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": family}}, "limit": 200})
    messages = "\n".join(entry["message"] for entry in logs)
    assert "published" in messages and "batches" in messages


def test_nightly_refresh_deployment_publishes_once_per_slot(deployed_generate_run: DeployedRun,
                                                            live_prefect_server: LiveServer, tmp_path: Path) -> None:
    """The refresh deployment run by a worker from the `refresh` queue; the same slot triggered again (as the
    scheduler and a manual run would) makes no second version."""
    server = live_prefect_server
    drops, root, bench = tmp_path / "drops", tmp_path / "root", tmp_path / "bench.jsonl"
    drops.mkdir()
    pd.DataFrame([("n1", "Write a haiku about spring fog."), ("n2", "Explain recursion to a new programmer.")],
                 columns=["seed_id", "instruction"]).to_parquet(drops / "drop-001.parquet")
    bench.write_text("".join(json.dumps({"question_id": f"q{i}", "prompt": p}) + "\n"
                             for i, p in enumerate(["Name a prime number.", "Describe a cat in one sentence."])))
    with FakeLLMServer() as llm:
        params = {"seeds": str(drops), "root": str(root), "benchmarks": [str(bench)], "eval_limit": 2,
                  "targets": ["openai/fake-tuned-{version}"], "slot": "2026-11-26T02:00Z",
                  "settings": {**fake_roles(llm.url), "n_metadata": 3, "instructions_per_metadata": 2,
                               "n_rubrics": 2, "max_rounds": 1, "budget": 20}}
        first = trigger(server, "codeclm-refresh/nightly", **params)
        work_once(server, "refresh", tmp_path / "worker-1.log", tmp_path / "home")
        second = trigger(server, "codeclm-refresh/nightly", **params)
        work_once(server, "refresh", tmp_path / "worker-2.log", tmp_path / "home")

    run = completed(server, first, tmp_path / "worker-1.log")
    completed(server, second, tmp_path / "worker-2.log")
    assert run["name"] == f"refresh · 2026-11-26T02:00Z · {drops} → {root}"
    store = VersionStore(root)
    assert [e["version"] for e in store.history()] == ["v0001"] and store.latest() == "v0001"
    assert store.entry("v0001")["flow_run_id"] == first

    family = run_family(server, first)
    names = {r["name"] for r in server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": family}}})}
    assert {"v0001 · generate · 2 new seeds", f"v0001 · evaluate · {bench}"} <= names
    found = {a["key"]: a for a in artifacts(server, family)}
    assert {"refresh-progress", "refresh-report", "refresh-history", "generate-stages", "crr-report"} <= set(found)
    assert float(found["refresh-progress"]["data"]) == 100.0
    assert "Refresh v0001" in found["refresh-report"]["data"] and "openai/fake-tuned-v0001" in found[
        "refresh-report"]["data"]
    again = {a["key"]: a for a in artifacts(server, [second])}
    assert "already made v0001" in again["refresh-report"]["data"]
