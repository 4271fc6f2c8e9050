"""Issue 10 through the real Prefect engine and the CLI: duplicate removal across batches, the small-budget
metadata sample, and presets chosen by flag or config file and recorded in what a run writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for
from test_generate_flow import _check_published
from typer.testing import CliRunner

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")

SEEDS = [("s-poem", "Write a poem about rain."), ("s-sql", "Why is my SQL query slow?"),
         ("s-moon", "Why does the moon have phases?"), ("s-tax", "How do I file taxes as a freelancer?")]
# Two batches of two seeds; every metadata decodes the same two instructions (one also in a batch-1 spelling).
SMALL = {"n_metadata": 4, "instructions_per_metadata": 2, "n_rubrics": 2, "max_rounds": 1, "budget": 100,
         "batch_size": 2, "max_parallel_batches": 2}
REPEATED = ["Name three rivers in Europe.", "Explain why the sky is blue."]


def _repeating_decoder(body: dict[str, Any]) -> str | None:
    """Decode prompts always get the same instructions; everything else gets the server's own output."""
    if "Skills required to respond" not in body["messages"][-1]["content"]:
        return None
    return json.dumps({"instructions": REPEATED})


def _seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(path, orient="records", lines=True)
    return path


def _generate(tmp_path: Path, settings: Any, name: str) -> dict[str, Any]:
    from flows.generate import generate

    generate(str(_seed_file(tmp_path)), str(tmp_path / name), settings)
    return _check_published(tmp_path / name)


def test_duplicates_are_removed_across_batches_unless_turned_off(prefect_harness: None, tmp_path: Path) -> None:
    with FakeLLMServer(responder=_repeating_decoder) as server:
        published = _generate(tmp_path, settings_for(server, tmp_path, **SMALL), "dedup")
        counts = published["manifest"]["counts"]
        assert counts["metadata"] == {"seed": 4} and counts["basic_instructions"] == 8
        basic = [c.instruction for c in published["stages/candidates.parquet"] if c.round == 1]
        assert sorted(basic) == sorted(REPEATED)  # once in the whole run, not once per batch
        assert counts["rejected"].get("duplicate") == 6

        kept = _generate(tmp_path, settings_for(server, tmp_path, **SMALL, drop_duplicates=False), "kept")
        basic = [c.instruction for c in kept["stages/candidates.parquet"] if c.round == 1]
        assert sorted(basic) == sorted(REPEATED * 4) and "duplicate" not in kept["manifest"]["counts"]["rejected"]


def test_a_small_budget_decodes_only_what_it_needs(prefect_harness: None, fake_llm: FakeLLMServer,
                                                   tmp_path: Path) -> None:
    small = SMALL | {"instructions_per_metadata": None, "budget": 1, "oversample": 2.0}
    published = _generate(tmp_path, settings_for(fake_llm, tmp_path, **small), "small")
    counts = published["manifest"]["counts"]
    assert sum(counts["metadata"].values()) == 2 and counts["basic_instructions"] == 2  # not one per 4 metadata
    calls = {s["stage"]: s["calls"] for s in published["manifest"]["stages"]}
    assert calls["decode"] == 2 and calls["rubrics"] == 2


def _config(path: Path, server: FakeLLMServer, body: str) -> Path:
    roles = "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{server.url}"\n'
                    f'output_mode = "json_schema"\n' for role in ("strong", "target", "judge"))
    path.write_text(body + roles)
    return path


@pytest.mark.slow  # ~35 s: two CLI runs; CI runs it in make test-slow
def test_cli_preset_flag_and_config_file_reach_the_manifest(prefect_harness: None, fake_llm: FakeLLMServer,
                                                            tmp_path: Path) -> None:
    from codeclm.cli import app

    sizes = "".join(f"{k} = {v}\n" for k, v in SMALL.items()) + f'home = "{tmp_path / "home"}"\n'
    config = _config(tmp_path / "small.toml", fake_llm, sizes)
    seeds = str(_seed_file(tmp_path))
    result = CliRunner().invoke(app, ["generate", seeds, "--out", str(tmp_path / "paper"), "--config", str(config),
                                      "--preset", "paper"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "paper" / "manifest.json").read_text())
    assert manifest["preset"] == manifest["settings"]["preset"] == "paper"
    settings = manifest["settings"]
    assert settings["drop_duplicates"] is False and settings["n_metadata"] == 4  # the file wins over the preset
    assert (settings["strong"]["max_tokens"], settings["threshold"], settings["rule"]) == (2048, 3.0, "codeclm")

    # judge_template from the file beats the preset's Fig. 12 template, which the fake judge cannot answer in text
    in_file = _config(tmp_path / "in-file.toml", fake_llm,
                      f'preset = "paper"\nrule = "alpagasus"\njudge_template = "judge"\n{sizes}')
    result = CliRunner().invoke(app, ["generate", seeds, "--out", str(tmp_path / "file"), "--config", str(in_file)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "file" / "manifest.json").read_text())["preset"] == "paper"

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    result = CliRunner().invoke(app, ["evaluate", "--benchmark", str(bench), "--out", str(tmp_path / "eval"),
                                      "--config", str(in_file)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["preset"], summary["rule"]) == ("paper", "alpagasus")  # the rule came from the config file
    assert summary["judge_template"] == "judge"


@pytest.mark.parametrize("command", ["generate", "evaluate", "run", "refresh", "protocol", "finetune"])
def test_every_command_takes_a_preset(command: str) -> None:
    from codeclm.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--preset" in result.output and "paper" in result.output
