"""`codeclm protocol` offline with real training (marker `train`, run by `make test-slow`): two benchmark subsets
from ../shared/benchmarks, CodecLM and Self-Instruct data from the fake server at a tiny budget, the embedded
SmolLM2 tuned with LoRA on each (2 steps), base and tuned models served by `transformers serve`, evaluated on the
whole subset, and the Table-1 report. The rerun (no LLM request, no training) is tested with the fake trainer in
test_protocol.py, and for local training by test_run_loop.py; here it would double the minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_protocol import subset

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = [pytest.mark.train, pytest.mark.timeout(1800)]


def _config(path: Path, url: str) -> Path:
    roles = "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{url}"\noutput_mode = "json_schema"\n'
                    "temperature = 0.0\n" for role in ("strong", "judge", "target"))
    roles += "max_tokens = 24\n"  # the last role, the target: short answers from the served models on the CPU
    path.write_text("budget = 3\nn_metadata = 2\nn_rubrics = 1\nmax_rounds = 1\nbatch_size = 10\nthreshold = 0.5\n"
                    + roles + "[baselines]\nnew_per_call = 4\ncalls_per_round = 1\n"
                    "[finetune]\nmax_steps = 2\nbatch_size = 2\nmicro_batch_size = 2\nlearning_rate = 2e-3\n")
    return path


def test_protocol_trains_every_dataset_and_reports_table_one(tmp_path: Path) -> None:
    benches = [subset(tmp_path, "vicuna_80.jsonl", "vicuna", 6), subset(tmp_path, "evol_instruct_218.jsonl",
                                                                        "evol", 6)]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = tmp_path / "protocol"
    with FakeLLMServer() as llm:
        args = [sys.executable, "-m", "codeclm.cli", "protocol", "-b", str(benches[0]), "-b", str(benches[1]),
                "--out", str(out), "--config", str(_config(tmp_path / "p.toml", llm.url)), "--method", "codeclm",
                "--method", "self_instruct", "--limit", "2",
                "--skip-judge-check"]  # the fake judge reads no quality; test_protocol_paper tests the check
        first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1700)
        assert first.returncode == 0, first.stderr[-4000:]
        table = pq.read_table(out / "table.parquet").to_pylist()
        assert {(r["benchmark"], r["method"]) for r in table} == {
            (b, m) for b in ("vicuna", "evol") for m in ("base (untuned)", "codeclm", "self_instruct")}
        assert all(r["questions"] + r["failures"] == 2 for r in table)
        for name in ("vicuna", "evol"):
            for method in ("codeclm", "self_instruct"):
                assert (out / "models" / name / method / "adapter" / "adapter_config.json").exists()
        report = (out / "report.md").read_text()
        assert "| method | vicuna | evol |" in report and "**whole** benchmark" in report
        assert "Table 1 (evaluated on whole)" in first.stdout and "vs self_instruct" in first.stdout

        trainings = json.loads((out / "protocol.json").read_text())["trainings"]
        assert [(t["trained"], t["steps"]) for t in trainings] == [(True, 2)] * 4
