"""The protocol's further studies (issue 18: Table 6, Figs. 3-5): plans, the points each study trains, the rows,
Table 6's agreement, the metadata share augmentation keeps, and the dry run's printout. The offline end-to-end
runs (fake server, fake fine-tuning) are in test_studies_flow.py, marker `slow`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from codeclm.errors import ConfigError
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.eval.protocol import BASE_ROW, ProtocolRow, plan_calls
from codeclm.eval.studies import (
    JudgeRow,
    check_judges,
    check_studies,
    judge_rows,
    judges_agreement,
    judges_markdown,
    kendall_tau,
    line_svg,
    round_points,
    studies_plan,
    studies_plan_markdown,
    study_markdown,
    study_points,
    study_rows,
)
from codeclm.records import Metadata
from codeclm.settings import Settings
from codeclm.storage import write_records
from tasks.augment import metadata_share

QUESTIONS = ["Plan a picnic for six people.", "Explain tides to a child.", "Write a haiku about autumn.",
             "Summarise the causes of inflation.", "Suggest three names for a bakery.", "How do vaccines work?",
             "Describe a sunset to someone who cannot see.", "Give tips for a first job interview.",
             "Compare trains and planes for a 500 km trip.", "Write a limerick about a cat."]


def bench_file(folder: Path, name: str = "vicuna", n: int = 10) -> Path:
    """A small benchmark written for these tests (no benchmark text in the repo)."""
    path = folder / "bench" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": f"{name}-{i}", "prompt": q, "category": "generic"}) + "\n"
                            for i, q in enumerate(QUESTIONS[:n])))
    return path


def test_bad_study_requests_are_one_line() -> None:
    settings = Settings()
    with pytest.raises(ConfigError, match="unknown study iterations; choose from rounds, metadata, budget"):
        check_studies(["rounds", "iterations"], settings)
    assert check_studies(["budget", "rounds", "budget"], settings) == ["budget", "rounds"]
    with pytest.raises(ConfigError, match="--study rounds needs contrastive_filtering = true"):
        check_studies(["rounds"], Settings(contrastive_filtering=False))
    with pytest.raises(ConfigError, match=r"studies\.budget_methods: unknown method wizardlm"):
        check_studies(["budget"], Settings(studies={"budget_methods": ["codeclm", "wizardlm"]}))
    judged = Settings(judge={"model": "openai/a"})
    with pytest.raises(ConfigError, match="--judge openai/a is given twice"):
        check_judges(["openai/b", "openai/a"], judged)
    with pytest.raises(ConfigError, match="--judge openai/b is given twice"):
        check_judges(["openai/b", "openai/b"], judged)
    assert check_judges(["openai/b"], judged) == ["openai/b"]
    with pytest.raises(ConfigError, match=r"studies\.metadata_fractions"):
        Settings.load(None, studies={"metadata_fractions": [0.0, 0.5]})
    assert Settings(studies={"budgets": [800, 200, 800]}).studies.budgets == [200, 800]


def test_the_plan_adds_only_what_table_one_has_not_made() -> None:
    settings = Settings(budget=100, max_rounds=3, studies={"metadata_fractions": [0.5, 1.0], "budgets": [50, 100],
                                                           "budget_methods": ["codeclm", "wizardlm_plus"]})
    rows = studies_plan(["rounds", "metadata", "budget"], ["openai/b"], settings, ["codeclm", "self_instruct"],
                        seeds=16, questions=80)
    at = {(r["study"], r["point"]): r for r in rows}
    # rounds: cuts of the codeclm dataset (no generation), the last is Table 1's cell
    assert [at["rounds", f"rounds <= {k}"]["trainings"] for k in (1, 2, 3)] == [1, 1, 0]
    assert all(at["rounds", f"rounds <= {k}"]["generation_calls_high"] == 0 for k in (1, 2, 3))
    assert at["rounds", "rounds <= 1"]["eval_calls"] == 3 * 80
    # metadata: half of 200 metadata, the same budget; all of them is Table 1's cell
    half = plan_calls(settings.model_copy(update={"n_metadata": 100}), ["codeclm"], 16, 80)[0]
    assert at["metadata", "50 % metadata"]["generation_calls_low"] == half["generation_calls_low"]
    assert at["metadata", "100 % metadata"]["trainings"] == 0
    # budget: codeclm at the protocol's budget is its cell; wizardlm_plus is not compared, so its 100 is made
    assert at["budget", "codeclm · 100"]["generation_calls_high"] == 0
    wiz = plan_calls(settings, ["wizardlm_plus"], 16, 80)[0]
    assert at["budget", "wizardlm_plus · 100"]["generation_calls_low"] == wiz["generation_calls_low"] > 0
    assert at["budget", "codeclm · 50"]["generation_calls_low"] == plan_calls(
        settings.model_copy(update={"budget": 50}), ["codeclm"], 16, 80)[0]["generation_calls_low"]
    # a second judge: judgements of the base and both methods in both orders, no answers
    assert at["judges", "judge openai/b"]["eval_calls"] == 2 * 80 * 3
    text = studies_plan_markdown({"vicuna": rows})
    assert "| metadata | 50 % metadata |" in text and "Studies total:" in text
    assert studies_plan_markdown({"vicuna": []}) == ""
    # without codeclm among the methods, the rounds study makes the codeclm dataset itself
    alone = studies_plan(["rounds"], [], settings, ["self_instruct"], seeds=16, questions=80)
    assert alone[0]["point"] == "codeclm dataset" and alone[0]["generation_calls_low"] > 0


def test_points_of_table_one_reuse_its_folders(tmp_path: Path) -> None:
    settings = Settings(budget=100, studies={"metadata_fractions": [0.2, 1.0], "budgets": [100, 400],
                                             "budget_methods": ["wizardlm_plus"]})
    meta = study_points("metadata", "vicuna", tmp_path, settings)
    assert [(p.label, p.settings_update, p.same_as_table) for p in meta] == [
        ("20 % metadata", {"metadata_fraction": 0.2}, False), ("100 % metadata", {}, True)]
    assert meta[1].dataset == str(tmp_path / "datasets" / "vicuna" / "codeclm")
    assert meta[1].model == str(tmp_path / "models" / "vicuna" / "codeclm")
    budget = study_points("budget", "vicuna", tmp_path, settings)
    assert [(p.x, p.same_as_table) for p in budget] == [(100, True), (400, False)]
    assert budget[1].dataset == str(tmp_path / "studies" / "budget" / "datasets" / "vicuna" / "wizardlm_plus-400")


def _dataset(folder: Path, rounds: list[int]) -> Path:
    """A published-dataset stand-in: train.parquet's `round` column and train.jsonl in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    pq.write_table(pa.table({"pair_id": [f"p{i}" for i in range(len(rounds))], "round": rounds}),
                   folder / "train.parquet")
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        + "\n" for i in range(len(rounds))))
    return folder


def test_round_cuts_keep_the_pairs_of_rounds_up_to_k(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "datasets" / "vicuna" / "codeclm", [1, 2, 1, 3, 1, 1, 2])
    points, shares = round_points(data, "vicuna", tmp_path)
    assert shares == {1: 4, 2: 2, 3: 1}
    assert [(p.label, p.same_as_table) for p in points] == [("rounds <= 1", False), ("rounds <= 2", False),
                                                            ("rounds <= 3", True)]
    first = Path(points[0].dataset).read_text().splitlines()
    assert [json.loads(line)["messages"][0]["content"] for line in first] == ["q0", "q2", "q4", "q5"]
    assert len(Path(points[1].dataset).read_text().splitlines()) == 6
    assert points[2].dataset == str(data) and points[2].model == str(tmp_path / "models" / "vicuna" / "codeclm")
    (data / "train.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl has 1 lines for 7 pairs"):
        round_points(data, "vicuna", tmp_path)


def _verdict(model: str, qid: str, outcome: str, bench: str = "vicuna") -> EvalQuestionResult:
    return EvalQuestionResult(benchmark=bench, question_id=qid, prompt="p", target_model=model,
                              strong_model="s", judge_model="j", outcome=outcome)


def test_study_rows_count_each_point_and_the_round_share(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "datasets" / "vicuna" / "codeclm", [1, 1, 1, 2])
    points, shares = round_points(data, "vicuna", tmp_path)
    results = [_verdict("m1", "a", "win"), _verdict("m1", "b", "loss"), _verdict("m1", "c", "failed"),
               _verdict("m2", "a", "tie"), _verdict("m2", "b", "tie"), _verdict("m2", "c", "loss"),
               _verdict("m2", "a", "loss", bench="koala")]
    rows = study_rows("rounds", "vicuna", results, points, {"rounds <= 1": "m1", "rounds <= 2": "m2"},
                      {"rounds <= 1": 3, "rounds <= 2": 4}, shares)
    one, two = rows
    assert (one.wins, one.ties, one.losses, one.failures, one.crr, one.share) == (1, 0, 1, 1, 50.0, 0.75)
    assert (two.questions, two.crr, two.pairs, two.share) == (3, pytest.approx(200 / 3), 4, 0.25)
    assert two.ci_low <= two.crr <= two.ci_high
    budget = study_rows("budget", "vicuna", results, points, {"rounds <= 1": "m1", "rounds <= 2": "nobody"}, {})
    assert len(budget) == 1 and math.isnan(budget[0].share)
    svg = line_svg("rounds", rows)
    ET.fromstring(svg)  # well-formed
    assert svg.count("<circle") == 2 and "Fig. 3" in svg
    text = study_markdown("rounds", rows, Settings(), "chart.svg")
    assert "| vicuna | rounds <= 1 | 3 | 75% | 1/0/1 | 50.0 [" in text and "![" in text
    sizes = [r.model_copy(update={"x": x}) for r, x in zip(rows, (500, 8000), strict=True)]
    assert ET.fromstring(line_svg("budget", sizes)) is not None


def _table_row(method: str, crr: float, delta: float) -> ProtocolRow:
    return ProtocolRow(benchmark="evol", method=method, model=method, pairs=10, shortfall=0, questions=20,
                       failures=0, crr=crr, ci_low=crr - 5, ci_high=crr + 5, delta=delta, delta_low=delta - 3,
                       delta_high=delta + 3, wins=2, ties=round(crr / 5) - 2, losses=20 - round(crr / 5))


def test_table_six_gaps_and_whether_the_judges_agree() -> None:
    first = [_table_row(BASE_ROW, 50, -20), _table_row("self_instruct", 70, math.nan),
             _table_row("wizardlm_plus", 75, 5), _table_row("codeclm", 80, 10)]
    same = [_table_row(BASE_ROW, 40, -20), _table_row("self_instruct", 60, math.nan),
            _table_row("wizardlm_plus", 62, 2), _table_row("codeclm", 70, 10)]
    swapped = [_table_row("self_instruct", 60, math.nan), _table_row("wizardlm_plus", 72, 12),
               _table_row("codeclm", 65, 5)]
    rows = judge_rows("chatgpt", first) + judge_rows("gpt-4", same) + judge_rows("other", swapped)
    assert [r.gap for r in rows if r.judge == "chatgpt"] == [-20, 0.0, 5, 10]  # Self-Instruct's own gap is 0
    agreement = {tuple(a["judges"]): a for a in judges_agreement(rows)}
    agree = agreement["chatgpt", "gpt-4"]
    assert agree["same_ranking"] and agree["kendall_tau"] == 1.0 and BASE_ROW not in agree["methods"]
    assert agree["ranking"]["gpt-4"] == "codeclm > wizardlm_plus > self_instruct"
    assert not agreement["chatgpt", "other"]["same_ranking"]
    assert agreement["chatgpt", "other"]["kendall_tau"] == pytest.approx(1 / 3)
    text = judges_markdown(rows, list(agreement.values()))
    assert "| codeclm | +10.00 (80.0) | +10.00 (70.0) | +5.00 (65.0) |" in text
    assert "`chatgpt` and `gpt-4` give the same ranking (Kendall's tau +1.00)" in text
    assert "`chatgpt` and `other` give different rankings" in text
    assert isinstance(rows[0], JudgeRow)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0 and math.isnan(kendall_tau([1], [1]))


def test_metadata_share_is_a_reproducible_sample_of_the_augmented_metadata(tmp_path: Path) -> None:
    pool = [Metadata(metadata_id=f"m{i:03d}", use_case=f"use {i}", skills=["s"], origin="augmented",
                     seed_ids=["a"]) for i in range(200)]
    fifth = metadata_share(pool, 0.2, 0)
    assert len(fifth) == 40 and fifth == metadata_share(pool, 0.2, 0) and set(m.metadata_id for m in fifth) < {
        m.metadata_id for m in pool}
    assert metadata_share(pool, 0.2, 1) != fifth and metadata_share(pool, 1.0, 0) == pool
    assert len(metadata_share(pool[:3], 0.1, 0)) == 1  # at least one
    write_records(tmp_path / "m.parquet", fifth, Metadata)  # still valid records


def test_dry_run_prints_the_studies_plan_before_any_call(tmp_path: Path) -> None:
    bench = bench_file(tmp_path)
    codeclm = str(Path(sys.executable).with_name("codeclm"))
    args = [codeclm, "protocol", "-b", str(bench), "-o", str(tmp_path / "out"), "--dry-run", "--method", "codeclm",
            "--judge", "openai/a", "--judge", "openai/b", "--study", "rounds", "--study", "budget", "--budget", "50"]
    env = {"CODECLM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| judges | judge openai/b | 0 | 40 | 0 |" in done.stdout  # 2 orders x 10 questions x (base + codeclm)
    assert "| budget | wizardlm_plus · 500 |" in done.stdout and "| rounds | rounds <= 4 |" in done.stdout
    assert not (tmp_path / "out").exists()
    bad = subprocess.run([*args[:-4], "--study", "scaling"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown study scaling" in bad.stderr
