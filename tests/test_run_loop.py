"""`codeclm run`, the whole loop, offline: a dataset from the fake strong/target server, the real SmolLM2 tuned on
it with LoRA, base and tuned served by `transformers serve`, both judged against the strong model, and a report
leading with the paired CRR change. A rerun trains nothing and makes no LLM request.

Slow (marker `train`, run by `make test-slow`): one tiny training and two served models on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = [pytest.mark.train, pytest.mark.timeout(1200)]
SEEDS = ["Plan a picnic for six people on a budget.", "Explain tides to a ten-year-old.",
         "Write a haiku about a lighthouse.", "How do I make my SQL query with three joins faster?"]
QUESTIONS = ["Name three uses of a paperclip.", "Why is the sky blue?", "Give me a tip for learning chess."]


def _config(path: Path, url: str) -> Path:
    roles = "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{url}"\noutput_mode = "json_schema"\n'
                    "temperature = 0.0\n" for role in ("strong", "judge", "target"))
    roles += "max_tokens = 32\n"  # the last role, the target: short answers from the served models on the CPU
    path.write_text("n_metadata = 4\ninstructions_per_metadata = 2\nn_rubrics = 1\nmax_rounds = 1\nbatch_size = 10\n"
                    "threshold = 0.5\n" + roles +
                    "[finetune]\nmax_steps = 4\nbatch_size = 4\nmicro_batch_size = 4\nlearning_rate = 2e-3\n")
    return path


def _posts(home: Path) -> int:
    """Chat requests the served models received (transformers serve logs each one)."""
    return sum(p.read_text(errors="replace").count("POST /v1/chat/completions") for p in home.glob("serving-*.log"))


def test_run_closes_the_loop_and_a_rerun_is_free(tmp_path: Path) -> None:
    seeds, bench = tmp_path / "seeds.jsonl", tmp_path / "bench.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS))
    bench.write_text("".join(json.dumps({"question_id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with FakeLLMServer() as llm:
        config = _config(tmp_path / "run.toml", llm.url)
        args = [sys.executable, "-m", "codeclm.cli", "run", str(seeds), "--out", str(tmp_path / "job"), "--config",
                str(config), "--benchmark", str(bench), "--limit", "3"]
        first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1100)
        assert first.returncode == 0, first.stderr[-4000:]
        job = tmp_path / "job"
        loop = json.loads((job / "loop.json").read_text())
        (row,) = loop["loop"]
        assert loop["trained"] and loop["model"]["steps"] == 4 and not loop["model"]["cached"]
        assert (row["benchmark"], row["questions"]) == ("bench", 3)
        assert row["base"].startswith("openai/base-") and row["tuned"] == f"openai/{loop['model']['served_name']}"
        assert row["delta"] == pytest.approx(row["crr_tuned"] - row["crr_base"])
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]
        assert (job / "model" / "adapter" / "adapter_config.json").exists()
        report = (job / "report.md").read_text()
        assert "| bench | 3 |" in report and "95% paired CI" in report and loop["data_sha"][:16] in report
        assert "CRR base" in first.stdout and "95% paired CI" in first.stdout
        summary = json.loads((job / "eval" / "summary.json").read_text())
        assert {r["target"] for r in summary["results"]} == {row["base"], row["tuned"]}

        fake_calls, served_calls = len(llm.requests), _posts(home)
        again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1100)
        assert again.returncode == 0, again.stderr[-4000:]
        assert len(llm.requests) == fake_calls  # strong, judge and generation: all from the call cache
        assert _posts(home) - served_calls == 2  # only the readiness check of each served model, no answer
        rerun = json.loads((job / "loop.json").read_text())
        assert rerun["model"]["cached"] and rerun["loop"] == loop["loop"]


def test_refresh_trains_each_version_and_compares_by_role(tmp_path: Path) -> None:
    drops, home = tmp_path / "drops", tmp_path / "home"
    drops.mkdir()
    import pandas as pd

    pd.DataFrame({"seed_id": [f"s{i}" for i in range(len(SEEDS))], "instruction": SEEDS}).to_parquet(
        drops / "drop-001.parquet")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question_id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with FakeLLMServer() as llm:
        args = [sys.executable, "-m", "codeclm.cli", "refresh", str(drops), "--root", str(tmp_path / "root"),
                "--config", str(_config(tmp_path / "run.toml", llm.url)), "--benchmark", str(bench), "--limit", "2",
                "--slot", "2026-11-30T02:00Z"]
        done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-4000:]
    entry = json.loads((tmp_path / "root" / "versions" / "v0001" / "version.json").read_text())
    assert entry["trained"] and entry["model"]["trainer"] == "local" and entry["model"]["steps"] == 4
    assert sorted(r["target_spec"] for r in entry["eval"]) == ["base", "tuned"]
    assert (tmp_path / "root" / "versions" / "v0001" / "model" / "merged" / "config.json").exists()
    from codeclm.ops.versions import report_markdown

    report = report_markdown(entry)
    assert "tuned on this version's pairs" in report and "measures no data" not in report
    assert f"bench · openai/{entry['model']['served_name']}: CRR" in done.stdout
