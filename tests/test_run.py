"""`codeclm run` with training off: generate, then evaluate the base target, as subflows of one `codeclm-run` flow,
on the fake server; the report says this CRR measures no data. The whole loop (train, serve, evaluate base and
tuned) is in test_run_loop.py (slow, marker `train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import settings_for

from codeclm.testing.fake_llm import FakeLLMServer

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

    assert result.dataset.out == str(tmp_path / "job" / "dataset")
    assert pq.read_metadata(tmp_path / "job" / "dataset" / "train.parquet").num_rows == result.dataset.train
    (row,) = result.evaluation
    assert (row.benchmark, row.total + row.failures) == ("bench", 2)
    assert (tmp_path / "job" / "eval" / "report.md").exists()
    assert result.model is None and result.loop == [] and not (tmp_path / "job" / "model").exists()
    assert "measures the model, not the data" in (tmp_path / "job" / "report.md").read_text()
    assert json.loads((tmp_path / "job" / "loop.json").read_text())["trained"] is False
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        names = {client.read_flow(r.flow_id).name for r in children}
    assert {"codeclm-generate", "codeclm-evaluate"} <= names


def test_run_that_cannot_train_stops_before_generating(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """A missing base model is found before the first LLM call: one line, exit 2, no dataset paid for."""
    import os
    import subprocess
    import sys

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Plan a picnic for six."}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "OPENAI_API_BASE": fake_llm.url, "OPENAI_API_KEY": "sk-test"}
    done = subprocess.run([str(Path(sys.executable).with_name("codeclm")), "run", str(seeds), "--out",
                           str(tmp_path / "job"), "--strong", "openai/fake-strong", "--target", "openai/fake-target",
                           "--judge", "openai/fake-judge", "--base", str(tmp_path / "missing.gguf")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == f"error: base model {tmp_path / 'missing.gguf'}: no such GGUF file"
    assert fake_llm.requests == [] and not (tmp_path / "job").exists()
