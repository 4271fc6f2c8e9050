"""Issue 18, the protocol side: each method's seed source (the benchmark's split or a recorded Alpaca sample),
the leak guard on every training set, the paper's Fig. 12 judge in plain text, the judge check before any data,
Table 5's wins/ties/losses, the filtering-target warning and the per-method statements `--dry-run` prints.
Alpaca text is never shipped: the tests write small files in its layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import settings_for

from codeclm.baseline_records import BaselineRejected
from codeclm.benchmarks import ALPACA_COUNT, ALPACA_URL, load_alpaca
from codeclm.errors import BenchmarkError, ConfigError
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.eval.protocol import (
    alpaca_sample,
    check_leak_risk,
    filtering_warning,
    plan_protocol,
    plan_seeds,
    statements,
    table_rows,
)
from codeclm.records import RejectedCandidate, TrainingPair
from codeclm.rouge import EvalOverlap
from codeclm.settings import Settings
from codeclm.storage import read_records
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")
CODECLM = str(Path(sys.executable).with_name("codeclm"))
TOPICS = ["tides", "volcanoes", "glaciers", "comets", "deserts", "coral reefs", "auroras", "monsoons"]


def alpaca_rows(n: int) -> list[dict[str, str]]:
    """Rows in alpaca_data.json's layout, written for the project; every third has an input."""
    return [{"instruction": f"Describe item {i} of a list about {TOPICS[i % len(TOPICS)]} number {i * 7}.",
             "input": f"context {i}" if i % 3 == 0 else "", "output": f"output {i}"} for i in range(n)]


def alpaca_file(tmp_path: Path, n: int = 200) -> Path:
    path = tmp_path / "alpaca_small.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(alpaca_rows(n)))
    return path


def bench_file(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "bench" / "mini.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": i + 1, "text": f"Question {i}: how do {t} form and change?",
                                        "category": "generic"}) + "\n"
                            for i, t in enumerate((TOPICS * 3)[:n])))
    return path


# --- seed sources -----------------------------------------------------------------------------------------------

def test_alpaca_reads_instruction_and_input_by_one_rule_and_downloads_once(tmp_path: Path) -> None:
    local = load_alpaca(str(alpaca_file(tmp_path, 6)), cache_dir=tmp_path / "cache")
    assert [q.question_id for q in local] == ["1", "2", "3", "4", "5", "6"] and local[0].benchmark == "alpaca"
    assert local[0].prompt == "Describe item 0 of a list about tides number 0. Input: context 0"  # input kept
    assert local[1].prompt == "Describe item 1 of a list about volcanoes number 7."  # empty input: instruction only
    calls: list[str] = []
    body = json.dumps(alpaca_rows(ALPACA_COUNT)).encode()

    def fetch(url: str) -> bytes:
        calls.append(url)
        return body

    first = load_alpaca("alpaca", cache_dir=tmp_path / "cache", fetch=fetch)
    again = load_alpaca("alpaca", cache_dir=tmp_path / "cache", fetch=fetch)
    assert calls == [ALPACA_URL] and len(first) == len(again) == ALPACA_COUNT
    assert (tmp_path / "cache" / "alpaca_data.json").is_file()
    with pytest.raises(BenchmarkError, match=r"has 3 rows, Alpaca has 52002"):
        load_alpaca("alpaca", cache_dir=tmp_path / "other", fetch=lambda url: json.dumps(alpaca_rows(3)).encode())
    assert not (tmp_path / "other" / "alpaca_data.json").exists()  # a bad download is never cached
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(BenchmarkError, match=r"not in Alpaca's layout .*missing: input, output"):
        load_alpaca(str(wrong), cache_dir=tmp_path)


def test_paper_preset_seeds_baselines_from_a_recorded_alpaca_sample(tmp_path: Path) -> None:
    # a [protocol] value from the config file keeps the preset's assignment (the preset fills the section)
    settings = Settings(home=tmp_path / "home", preset="paper", budget=100,
                        protocol={"alpaca": str(alpaca_file(tmp_path))})
    assert settings.protocol.source("self_instruct") == "alpaca" and settings.protocol.source("codeclm") == \
        "benchmark"
    assert Settings(home=tmp_path).protocol.source("self_instruct") == "benchmark"  # default: today's sharing
    methods = ["codeclm", "self_instruct", "evol_instruct", "alpagasus", "wizardlm_plus"]
    seeds = plan_seeds(methods, tmp_path / "out", settings)
    assert {m: p.source for m, p in seeds.items()} == {"codeclm": "benchmark", "self_instruct": "alpaca",
                                                       "evol_instruct": "alpaca", "alpagasus": "alpaca",
                                                       "wizardlm_plus": "benchmark"}
    sample = seeds["self_instruct"].sample
    assert sample is not None and sample.size == 175 and sample.available == 200
    assert seeds["self_instruct"].file == seeds["alpagasus"].file  # same size, same recorded sample
    evolved = seeds["evol_instruct"].sample  # WizardLM's recipe: every seed evolved 4 times fills 1.25 x budget
    assert evolved is not None and evolved.size == 32 and seeds["evol_instruct"].file != seeds["self_instruct"].file
    recorded = json.loads((tmp_path / "out" / "splits" / "alpaca" / "sample-175.json").read_text())
    assert recorded["ids"] == sample.ids and recorded["seed"] == 0
    lines = [json.loads(x) for x in Path(seeds["self_instruct"].file or "").read_text().splitlines()]
    assert len(lines) == 175 and lines[0]["seed_id"] == f"alpaca-{sample.ids[0]}"
    assert alpaca_sample(load_alpaca(str(alpaca_file(tmp_path)), cache_dir=tmp_path), "x", 1, 175).ids != sample.ids
    with pytest.raises(ConfigError, match="fewer than the 175 seeds"):
        plan_seeds(["self_instruct"], tmp_path / "o2", settings.model_copy(update={"protocol": settings.protocol.
                   model_copy(update={"alpaca": str(alpaca_file(tmp_path / "s", 50))})}))


def test_a_rewriter_seeded_from_the_benchmark_and_evaluated_on_all_of_it_is_refused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    with pytest.raises(ConfigError, match=r"evol_instruct would rewrite .* use --eval-on heldout, or seed it from "
                                          r"Alpaca"):
        check_leak_risk(["codeclm", "evol_instruct"], settings, "whole")
    check_leak_risk(["codeclm", "evol_instruct"], settings, "heldout")
    check_leak_risk(["evol_instruct"], Settings(home=tmp_path, preset="paper"), "whole")
    # the CLI refuses before any model or Prefect: one line, exit 2
    done = subprocess.run([CODECLM, "protocol", "-b", str(bench_file(tmp_path)), "--out", str(tmp_path / "o"),
                           "--method", "evol_instruct", "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CODECLM_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and "--eval-on heldout" in done.stderr and "Traceback" not in done.stderr


# --- the leak guard ---------------------------------------------------------------------------------------------

def test_eval_overlap_is_exact_after_normalising_or_rouge_l_at_least_0_7() -> None:
    guard = EvalOverlap(["What is the capital of France?", "Write a poem about the sea at night."])
    assert guard.match("  what is THE capital of france ") == "exact"
    assert (guard.match("Write a short poem about the sea at night.") or "").startswith("rouge-l 0.9")
    assert guard.match("Write a poem about mountains in spring.") is None  # 4 of 8 tokens: 0.5
    assert guard.match("") is None and len(guard) == 2


def _seeds(tmp_path: Path, texts: list[str]) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"seed_id": f"s{i}", "instruction": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _evolve(body: dict[str, Any]) -> str | None:
    """Evolution appends a short step to the instruction: a light rewrite that keeps ROUGE-L high."""
    user = str(body["messages"][-1]["content"])
    found = re.search(r"<instruction>\s*(.*?)\s*</instruction>", user, re.DOTALL)
    if found and ("You rewrite instructions" in str(body["messages"][0]["content"]) or "brand-new" in user):
        return f"{found.group(1)} Add one step."
    return None


SEED_TEXTS = ["Write a short poem about autumn rain on a tin roof.",
              "Explain to a ten-year-old why the moon has phases.",
              "Give me a simple recipe for bread without yeast.",
              "List three ways to make a small flat feel larger."]


def test_leak_guard_rejects_evolved_test_questions_before_the_budget(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                     tmp_path: Path) -> None:
    from flows.baselines import baseline

    fake_llm.responder = _evolve
    questions = tmp_path / "eval.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "prompt": t}) + "\n"
                                 for i, t in enumerate(SEED_TEXTS[:2])))
    settings = settings_for(fake_llm, tmp_path, budget=3, eval_overlap=str(questions),
                            baselines={"evol_rounds": 2, "evol_oversample": 2.0})
    baseline("evol_instruct", str(_seeds(tmp_path, SEED_TEXTS)), str(tmp_path / "out"), settings)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    train = read_records(tmp_path / "out" / "train.parquet", TrainingPair)
    leaked = [r for r in read_records(tmp_path / "out" / "rejected.parquet", BaselineRejected)
              if r.reason == "eval_overlap"]
    guard = EvalOverlap(SEED_TEXTS[:2])
    assert leaked and all(guard.match(r.instruction) for r in leaked) and all(r.detail for r in leaked)
    assert not any(guard.match(p.instruction) for p in train)
    assert manifest["counts"]["eval_overlap"] == len(leaked) == manifest["counts"]["rejected"]["eval_overlap"]
    # Evol's answer step answers exactly the budget's instructions, so here the leaked pairs become a shortfall,
    # stated in the manifest (the codeclm test below shows the budget met from the rest)
    assert len(train) + manifest["budget"]["shortfall"] == 3 and manifest["budget"]["shortfall"] > 0


def test_leak_guard_in_codeclm_export(prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    from test_topup_ablations import Model

    from flows.generate import generate

    codec = Model(gap=8)
    fake_llm.responder = codec
    questions = tmp_path / "eval.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "prompt": "Please solve distinct task number 2 today"}) + "\n")
    settings = settings_for(fake_llm, tmp_path, budget=2, n_metadata=1, n_rubrics=1, max_rounds=1, oversample=1.0,
                            instructions_per_metadata=3, max_topups=0, eval_overlap=str(questions))
    generate(str(_seeds(tmp_path, SEED_TEXTS[:1])), str(tmp_path / "out"), settings)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rejected = read_records(tmp_path / "out" / "rejected.parquet", RejectedCandidate)
    # "Distinct task number 2." has ROUGE-L 8/11 = 0.73 with the question, numbers 1 and 3 have 6/11 = 0.55: one
    # pair is rejected before the budget, and the other two meet it (nothing over budget, no shortfall)
    assert [(r.reason, r.instruction) for r in rejected] == [("eval_overlap", "Distinct task number 2.")]
    assert manifest["counts"]["eval_overlap"] == 1 and manifest["budget"]["shortfall"] == 0
    train = read_records(tmp_path / "out" / "train.parquet", TrainingPair)
    assert sorted(p.instruction for p in train) == ["Distinct task number 1.", "Distinct task number 3."]


# --- the judge --------------------------------------------------------------------------------------------------

def test_paper_preset_judges_with_fig_12_in_plain_text(tmp_path: Path) -> None:
    from codeclm.llm.gateway import Reply
    from tasks.judge import verdict_calls

    paper = Settings(home=tmp_path, preset="paper", judge={"model": "openai/j", "output_mode": "json_schema"})
    assert paper.judge_template == "judge_fig12"
    calls = verdict_calls("Why is the sky blue?", "q1", "target answer", "strong answer", True,
                          paper.judge_template)
    user = calls[0].messages[-1]["content"]
    assert calls[0].messages[0]["content"] == "You are a helpful and precise assistant for checking the quality of " \
                                              "the answer."
    assert user.startswith("[Question]\nWhy is the sky blue?")
    assert "[The End of Assistant 2's Answer]\n\n[System]" in user
    assert "Please first output a single line containing only two values" in user and "JSON" not in user
    assert all(c.reply is Reply.FREE_TEXT for c in calls)  # no schema sent, whatever output_mode says
    assert "strong answer" in user.split("[The End of Assistant 1")[0]  # order strong_first
    default = verdict_calls("q", "q1", "t", "s", True)
    assert default[0].reply is Reply.STRUCTURED_CUT_OK and "JSON" in default[0].messages[-1]["content"]


def _judge(prefers: str) -> Any:
    """Answers: several sentences; the judge either rates position (Assistant 1 always 9, 2 always 5) or reads
    quality (the longer answer to the question scores higher)."""

    def model(body: dict[str, Any]) -> str | None:
        user = str(body["messages"][-1]["content"])
        if "Assistant 1's Answer" not in user:
            return f"First point about {user[:30]}. Second point with detail. Third point to conclude."
        if prefers == "position":
            return "9 5\nAssistant 1 was better."
        answers = re.findall(r"Answer\]\s*(?:<answer>)?\s*(.*?)\s*(?:</answer>)?\s*\[The End", user, re.S)
        question = re.search(r"(?:\[Question\]|<question>)\s*(.*?)\s*(?:</question>|\[The Start)", user, re.S)
        assert len(answers) == 2 and question

        def quality(a: str) -> int:
            return len(a) + (1000 if question and question.group(1)[:30] in a else 0)

        one, two = quality(answers[0]), quality(answers[1])
        return "8 3\nfirst better" if one > two else "3 8\nsecond better"

    return model


@pytest.mark.parametrize("template", ["judge", "judge_fig12"])
def test_judge_check_refuses_a_position_judge_and_passes_a_quality_judge(prefect_harness: None,
                                                                         fake_llm: FakeLLMServer, tmp_path: Path,
                                                                         template: str) -> None:
    from flows.protocol import check_judge

    settings = settings_for(fake_llm, tmp_path, output_mode="text", judge_template=template)
    plan = plan_protocol([str(bench_file(tmp_path))], tmp_path / "out", settings, "whole", None, 0.2)[0]
    fake_llm.responder = _judge("position")
    with pytest.raises(ConfigError, match=r"judge check FAILED: .* preferred the intact answer in 50% of 20 judged "
                                          r"orders .*at least 90% needed.*--skip-judge-check"):
        check_judge(plan, settings, skip=False)
    skipped = check_judge(plan, settings, skip=True)
    assert skipped.skipped and not skipped.passed and skipped.figure == 0.5
    assert "overridden by --skip-judge-check" in skipped.line()

    fake_llm.responder = _judge("quality")  # another judge model (the caches rightly keep the first one's verdicts)
    settings = settings.model_copy(update={"judge": settings.judge.model_copy(update={"model": "openai/fair"})})
    requests = len(fake_llm.requests)
    check = check_judge(plan, settings, skip=False)
    assert check.passed and check.figure == 1.0 and check.pairs == 10 and check.mode == "text"
    paid = len(fake_llm.requests) - requests
    assert paid == 20  # the strong answers came from the call cache; 10 pairs x 2 orders judged anew
    check_judge(plan, settings, skip=False)
    assert len(fake_llm.requests) - requests == paid, "a rerun of the judge check made LLM calls"


@pytest.mark.embedded
@pytest.mark.timeout(1200, method="thread")  # SmolLM2 on a CPU: 3 answers and up to 12 verdicts
def test_judge_check_catches_the_embedded_smollm2(prefect_harness: None, tmp_path: Path) -> None:
    from codeclm.llm.embedded import models_ready
    from flows.protocol import check_judge

    settings = Settings(home=tmp_path / "home", protocol={"judge_check_questions": 3},
                        strong={"max_tokens": 128}, judge={"max_tokens": 64})
    plan = plan_protocol([str(bench_file(tmp_path))], tmp_path / "out", settings, "whole", None, 0.2)[0]
    with models_ready(settings, ("strong", "judge")), pytest.raises(ConfigError, match="judge check FAILED"):
        check_judge(plan, settings, skip=False)


# --- Table 5, statements, warnings, dry run ---------------------------------------------------------------------

def test_rows_count_wins_ties_and_losses() -> None:
    outcomes = ["win", "tie", "tie", "loss", "failed"]
    results = [EvalQuestionResult(benchmark="b", question_id=str(i), prompt="p", target_model="m", strong_model="s",
                                  judge_model="j", outcome=o) for i, o in enumerate(outcomes)]
    row = table_rows("b", results, {"codeclm": "m"}, {"codeclm": (3, 0)})[0]
    assert (row.wins, row.ties, row.losses, row.failures, row.questions, row.crr) == (1, 2, 1, 1, 4, 75.0)


def test_the_filtering_target_and_the_tuned_base_are_stated_and_a_shared_untuned_base_warned(tmp_path: Path
                                                                                             ) -> None:
    same = Settings(home=tmp_path)  # embedded target, embedded base
    assert "untuned base" in (filtering_warning(same, ["codeclm"]) or "")
    assert filtering_warning(same, ["self_instruct"]) is None  # nothing answers as the target in filtering
    tuned = Settings(home=tmp_path, target={"model": "hosted/alpaca-7b"}, finetune={"base_model": "llama-7b"})
    assert filtering_warning(tuned, ["codeclm"]) is None
    prefixed = Settings(home=tmp_path, target={"model": "openai/gpt-4o-mini"}, finetune={"base_model": "gpt-4o-mini"})
    assert filtering_warning(prefixed, ["codeclm"]) is not None
    rows = {r["method"]: r for r in statements(["codeclm", "wizardlm_plus", "alpagasus"],
                                               Settings(home=tmp_path, preset="paper"), {"vicuna": 16})}
    assert rows["codeclm"]["filtering_target"] == "[target] `embedded`"
    assert rows["codeclm"]["seed_source"] == "benchmark" and "vicuna 16" in rows["codeclm"]["seeds"]
    assert rows["alpagasus"]["seed_source"] == "alpaca" and "Alpaca sample of 175" in rows["alpagasus"]["seeds"]
    assert rows["wizardlm_plus"]["seed_source"] == "codeclm basic instructions"
    assert rows["alpagasus"]["rater"].startswith("Alpagasus filter: judge")
    assert all(r["judge_template"] == "judge_fig12" and r["judge_mode"] == "text" for r in rows.values())
    assert "prompts/judge_fig12.md (version " in rows["codeclm"]["judge"]
    assert "[finetune] preset" in rows["codeclm"]["training"]


def test_dry_run_with_the_paper_preset_states_every_method_before_any_call(tmp_path: Path) -> None:
    config = tmp_path / "paper.toml"
    config.write_text(f'[protocol]\nalpaca = "{alpaca_file(tmp_path, 2000)}"\n')  # Tree-Instruct: one per pair
    done = subprocess.run([CODECLM, "protocol", "-b", str(bench_file(tmp_path)), "--out", str(tmp_path / "o"),
                           "--preset", "paper", "--config", str(config), "--dry-run"], capture_output=True,
                          text=True, timeout=120, env={**os.environ,
                                                       "CODECLM_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "untuned base" in done.stderr  # embedded target and embedded base: the warning
    assert "175 of 2000 Alpaca instructions" in out and "625 of 2000" in out and "2000 of 2000" in out
    assert "judge check first" in out and "refused below 90%" in out
    for method in ("codeclm", "self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus", "metadata_only"):
        assert re.search(rf"^\| {method} \| .*judge_fig12\.md .* text \|", out, re.M), method
    assert "leak guard against its 10 evaluation questions" in out
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written
