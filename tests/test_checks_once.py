"""A command checks its input once (`codeclm.checks`): one `generate` reads and hashes the seed file once and
checks each model once, though the CLI checks before Prefect starts and the flow it starts checks too; `run`
loads each benchmark once though it plans its evaluation before generating and again after training. Counted
with spies on the real functions during real runs on the fake server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import codeclm.checks
import codeclm.eval.evaluation
import codeclm.llm.endpoints
import codeclm.storage
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")

SMALL = {"n_metadata": 2, "instructions_per_metadata": 1, "n_rubrics": 1, "max_rounds": 1, "budget": 10,
         "batch_size": 10}


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[tuple[Any, ...]]:
    """Record every call of `module.name` (still calling it)."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _config(tmp_path: Path, server: FakeLLMServer, **extra: Any) -> Path:
    values = SMALL | extra
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + f'home = "{tmp_path / "home"}"\n'
    body += '[finetune]\ntrainer = "off"\n'
    body += "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{server.url}"\noutput_mode = "json_schema"\n'
                    for role in ("strong", "target", "judge"))
    path = tmp_path / "config.toml"
    path.write_text(body)
    return path


def _seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame({"instruction": ["Plan a picnic for six.", "Explain tides to a child."]}).to_json(
        path, orient="records", lines=True)
    return path


def test_generate_reads_hashes_and_checks_its_input_once(prefect_harness: None, fake_llm: FakeLLMServer,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from codeclm.cli import app

    reads = _spy(monkeypatch, codeclm.storage, "load_seeds")
    hashes = _spy(monkeypatch, codeclm.checks, "source_sha")
    preflights = _spy(monkeypatch, codeclm.llm.endpoints, "preflight")
    fits = _spy(monkeypatch, codeclm.llm.endpoints, "check_context")
    seeds, out = _seeds(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", str(seeds), "--out", str(out), "--config",
                                      str(_config(tmp_path, fake_llm))])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["counts"]["seeds"] == 2
    assert [Path(a[0]) for a in reads] == [seeds]
    assert [Path(a[0]) for a in hashes] == [seeds]
    assert [a[1] for a in preflights] == [("strong", "target")]
    assert len(fits) == 1


@pytest.mark.slow
def test_run_loads_each_benchmark_and_seed_file_once(prefect_harness: None, fake_llm: FakeLLMServer,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` checks before generating (CLI, then its flow), and its evaluate subflow plans again: one load each."""
    from codeclm.cli import app

    reads = _spy(monkeypatch, codeclm.storage, "load_seeds")
    hashes = _spy(monkeypatch, codeclm.checks, "source_sha")
    loads = _spy(monkeypatch, codeclm.eval.evaluation, "load_benchmark")
    preflights = _spy(monkeypatch, codeclm.llm.endpoints, "preflight")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    result = CliRunner().invoke(app, ["run", str(_seeds(tmp_path)), "--out", str(tmp_path / "job"), "--benchmark",
                                      str(bench), "--limit", "2", "--config", str(_config(tmp_path, fake_llm))])
    assert result.exit_code == 0, result.output
    assert (len(reads), len(hashes), [a[0] for a in loads]) == (1, 1, [str(bench)])
    # generation's roles, then the evaluation's endpoints: strong and judge, the target; none twice
    assert [a[1] for a in preflights] == [("strong", "target"), ("strong", "judge"), ("target",)]
