"""Each step sees only the settings it declares (codeclm.settings.STAGE_READS): only those enter its Prefect cache
key, its work folder and its gateway. Proven on real flow runs: after a θ change Prefect answers every step before
the rounds from its cache; after a [finetune] or [baselines] change, every step but the export."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.llm.gateway import gateway_for
from codeclm.settings import CALLS, STAGE_READS, FinetuneConfig, Settings
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")

SMALL = {"n_metadata": 2, "instructions_per_metadata": 1, "n_rubrics": 1, "max_rounds": 1, "budget": 100,
         "batch_size": 1, "max_parallel_batches": 2}  # two batches of one seed
GENERATE_STEPS = ("seeds", "encode", "augment", "rubrics", "decode", "dedup", "rounds", "export")
# a value other than the default for every setting, to change one at a time
CHANGED: dict[str, Any] = {
    "seed_sample": 2, "n_metadata": 7, "max_skills": 2, "augment_max_skills": 1, "n_rubrics": 3, "max_rounds": 3,
    "threshold": 1.5, "budget": 9, "oversample": 3.0, "instructions_per_metadata": 5,
    "action_sampling": "with_replacement", "keep_target_when_better": False, "drop_seed_overlap": False,
    "drop_duplicates": False, "scorer": "judge", "score_temperature": 0.3, "seed": 7, "rule": "alpagasus",
    "batch_size": 3, "max_parallel_batches": 3, "task_runner": "dask", "dask_address": "tcp://x:1", "dask_workers": 3,
    "max_attempts": 2, "parse_attempts": 2, "backoff_base": 0.5, "backoff_max": 3.0, "retry_after_cap": 9.0,
    "breaker_failures": 3, "preset": "paper", "max_topups": 1, "contrastive_filtering": False,
    "breaker_probe_s": 1.0, "breaker_stop_after": 9.0, "call_deadline": 9.0, "hedge": False, "hedge_factor": 2.0,
    "hedge_min_s": 1.0, "review": "metadata", "review_timeout": 5.0, "retry_failed": True,
    "strong": {"model": "openai/other"}, "target": {"model": "openai/other"}, "judge": {"model": "openai/other"},
    "finetune": {"epochs": 1.0}, "baselines": {"evol_rounds": 2}, "metadata_fraction": 0.5,
    "studies": {"budgets": [100]}, "judge_template": "judge_fig12", "eval_overlap": "vicuna",
    "protocol": {"alpaca_seeds": 9},
}


def test_every_setting_has_a_changed_value_here() -> None:
    assert set(CHANGED) == set(Settings.model_fields) - {"home"}


@pytest.mark.parametrize("stage", sorted(STAGE_READS))
def test_a_step_key_follows_exactly_the_settings_it_declares(stage: str, tmp_path: Path) -> None:
    """Changing a setting changes a step's settings (so its cache key and work folder) exactly when the step
    declares it; reading an undeclared one fails."""
    base = Settings(home=tmp_path)
    roles = ("strong",) if stage == "answer" else ()  # the answering role is the caller's to add
    declared = {*STAGE_READS[stage], *roles}
    view = base.for_stage(stage, *roles)
    for name, value in CHANGED.items():
        changed = Settings(home=tmp_path, **{name: value})
        differs = {n for n in Settings.model_fields if getattr(changed, n) != getattr(base, n)}  # with what follows
        same = changed.for_stage(stage, *roles).model_dump(mode="json") == view.model_dump(mode="json")
        assert same == (not differs & declared), (stage, name)
    for name in set(Settings.model_fields) - declared:
        with pytest.raises(AttributeError, match=f"step '{stage}' reads setting '{name}' without declaring it"):
            getattr(view, name)


def test_stage_settings_pickle_and_keep_what_follows_from_them(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, budget=10, oversample=2.0)
    view = settings.for_stage("augment")
    assert pickle.loads(pickle.dumps(view)) == view  # Dask ships task parameters to its workers
    assert (view.work_dir, view.metadata_to_decode(50)) == (settings.work_dir, settings.metadata_to_decode(50))
    assert settings.for_stage("rounds").role("strong") == settings.strong
    assert "judge" in Settings(scorer="judge").for_stage("rounds").settings


def test_one_gateway_per_endpoint_identity(tmp_path: Path) -> None:
    """θ, [finetune] or another step's settings do not make a new gateway; targets on one server share the judge's
    and strong's gateways, and one target configured twice shares its own."""
    base = Settings(home=tmp_path)
    other = base.model_copy(update={"threshold": 1.0, "n_rubrics": 2,
                                    "finetune": FinetuneConfig(epochs=1.0)})
    assert gateway_for(base.for_stage("rounds")) is gateway_for(other.for_stage("rounds"))
    assert gateway_for(base.for_stage("encode")) is gateway_for(other.for_stage("decode"))
    assert set(gateway_for(base.for_stage("encode")).settings.settings) == {"strong", *CALLS}
    targets = [base.model_copy(update={"target": base.target.model_copy(update={"model": m})}) for m in "ab"]
    assert gateway_for(targets[0].for_stage("judge")) is gateway_for(targets[1].for_stage("judge"))
    strong = [gateway_for(t.for_stage("answer", "strong")) for t in targets]
    assert strong[0] is strong[1]
    assert gateway_for(targets[0].for_stage("answer", "target")) is not gateway_for(
        targets[1].for_stage("answer", "target"))
    assert gateway_for(base.for_stage("rounds")) is not gateway_for(
        base.model_copy(update={"max_attempts": 2}).for_stage("rounds"))


def _task_states(flow_run_id: UUID) -> dict[str, set[str]]:
    """State names of the task runs of a generate run (and its pipeline subflow), by step."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id, *(c.id for c in children)])))
    states: dict[str, set[str]] = {}
    for run in runs:
        for step in set(run.tags) & set(GENERATE_STEPS):
            states.setdefault(step, set()).add(run.state.name if run.state else "?")
    return states


def _generate(seeds: Path, out: Path, settings: Settings) -> dict[str, set[str]]:
    from flows.generate import generate

    state = generate(str(seeds), str(out), settings, return_state=True)
    state.result()
    return _task_states(state.state_details.flow_run_id)


@pytest.mark.slow  # three generate runs, ~13 s each on the test harness (Prefect's tag concurrency calls)
def test_theta_reruns_the_rounds_and_export_only_and_later_settings_nothing(prefect_harness: None,
                                                                          fake_llm: FakeLLMServer,
                                                                          tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    pd.DataFrame({"instruction": ["Plan a picnic for six.", "Explain tides to a child."]}).to_json(
        seeds, orient="records", lines=True)
    settings = settings_for(fake_llm, tmp_path, **SMALL)
    first = _generate(seeds, tmp_path / "out", settings)
    assert set(first) == set(GENERATE_STEPS) and all("Cached" not in s for s in first.values()), first
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]) > 0

    theta = _generate(seeds, tmp_path / "out", settings.model_copy(update={"threshold": 1.0}))
    before_filter = ("seeds", "encode", "augment", "rubrics", "decode", "dedup")
    assert {step: theta[step] for step in before_filter} == {step: {"Cached"} for step in before_filter}, theta
    assert theta["rounds"] == theta["export"] == {"Completed"}, theta
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["threshold"] == 1.0 and "finetune" not in manifest["settings"]

    later = settings.model_copy(update={"threshold": 1.0, "finetune": FinetuneConfig(epochs=1.0, trainer="off"),
                                        "baselines": settings.baselines.model_copy(update={"evol_rounds": 2})})
    version = os.readlink(tmp_path / "out")
    steps = _generate(seeds, tmp_path / "out", later)
    # generation reads neither, so OUT already holds this very run: taken as it is, no step runs, nothing published
    assert steps == {} and os.readlink(tmp_path / "out") == version, steps
