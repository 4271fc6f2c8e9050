"""`codeclm run` with training off: generate, then evaluate the base target, as subflows of one `codeclm-run` flow,
on the fake server; the report says this CRR measures no data. The whole loop (train, serve, evaluate base and
tuned) is in test_run_loop.py (slow, marker `train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import settings_for

from codeclm.fake_llm import FakeLLMServer

SMALL = {"n_metadata": 2, "instructions_per_metadata": 1, "n_rubrics": 1, "max_rounds": 1, "batch_size": 10,
         "finetune": {"trainer": "off"}}


def test_run_makes_a_dataset_then_its_evaluation(prefect_harness: None, fake_llm: FakeLLMServer,
                                                 tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.run import run

    seeds, benchmark = tmp_path / "seeds.jsonl", tmp_path / "bench.jsonl"
    seeds.write_text('{"instruction": "Plan a picnic for six."}\n{"instruction": "Explain tides to a child."}\n')
    benchmark.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    state = run(str(seeds), str(tmp_path / "job"), settings_for(fake_llm, tmp_path, **SMALL), [str(benchmark)], 2,
                return_state=True)
    result = state.result()

    assert result.dataset["out"] == str(tmp_path / "job" / "dataset")
    assert pq.read_metadata(tmp_path / "job" / "dataset" / "train.parquet").num_rows == result.dataset["train"]
    (row,) = result.evaluation
    assert (row["benchmark"], row["total"] + row["failures"]) == ("bench", 2)
    assert (tmp_path / "job" / "eval" / "report.md").exists()
    assert result.model is None and result.loop == [] and not (tmp_path / "job" / "model").exists()
    assert "measures the model, not the data" in (tmp_path / "job" / "report.md").read_text()
    assert json.loads((tmp_path / "job" / "loop.json").read_text())["trained"] is False
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        names = {client.read_flow(r.flow_id).name for r in children}
    assert {"codeclm-generate", "codeclm-evaluate"} <= names
