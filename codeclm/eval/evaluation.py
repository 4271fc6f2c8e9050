"""CRR evaluation without Prefect: check the request before any call, and sum judged questions into CRR.

Everything a user can get wrong (benchmark, column, limit, the same model as target and strong) fails here,
in a second and with one line, before a model is started or a flow writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from codeclm.benchmarks import BenchmarkQuestion, load_benchmark
from codeclm.errors import BenchmarkError, ConfigError, ModelError
from codeclm.eval.crr import Rule, summarize
from codeclm.eval.eval_records import EvalQuestionResult, EvalSummary, LeaderboardRow
from codeclm.llm.prompts import load_prompt
from codeclm.settings import EMBEDDED, RoleConfig, Settings

DEFAULT_BENCHMARK_ENV = "CODECLM_DEFAULT_BENCHMARK"
RULES: tuple[Rule, ...] = ("codeclm", "alpagasus")


@dataclass
class EvalPlan:
    """What one evaluation will do: the settings per target (cache keys stay per model), the questions per
    benchmark label, and the warnings to log."""

    settings: Settings
    targets: list[Settings]
    questions: dict[str, list[BenchmarkQuestion]]
    rule: Rule
    judge_is_strong: bool
    warnings: list[str] = field(default_factory=list)

    def endpoints(self) -> list[tuple[Settings, tuple[str, ...]]]:
        """Each settings object with the roles it calls: strong and judge once, the target once per model."""
        return [(self.settings, ("strong", "judge")), *((t, ("target",)) for t in self.targets)]


Target = str | RoleConfig


def target_settings(settings: Settings, targets: Sequence[Target] | None) -> list[Settings]:
    """One Settings per target: a model string keeps the [target] connection settings and changes only the model;
    a RoleConfig (a model codeclm serves itself, on its own endpoint) replaces the target role whole."""
    if not targets:
        return [settings]
    roles = {t.model: t for t in targets if isinstance(t, RoleConfig)}
    roles |= {m.strip(): settings.target.model_copy(update={"model": m.strip()}) for m in targets if isinstance(m, str)}
    return [settings.model_copy(update={"target": role}) for role in roles.values()]


def plan_evaluation(benchmarks: Sequence[str], settings: Settings, targets: Sequence[Target] | None = None,
                    limit: int | None = None, rule: str | None = None, prompt_column: str | None = None) -> EvalPlan:
    """Validate the request and load every benchmark; raises a CodecError naming the first problem. Without
    `rule`, the settings' `rule` applies."""
    rule = rule or settings.rule
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if not benchmarks:
        raise BenchmarkError("no benchmark given; pass --benchmark with a name (vicuna, koala, ...) or a file path")
    if targets is not None and not [t for t in targets if isinstance(t, RoleConfig) or t.strip()]:
        raise ConfigError("no target model given; pass --target MODEL or leave it out to use the configured target")
    plan = EvalPlan(settings=settings, targets=target_settings(settings, targets), questions={},
                    rule=cast(Rule, rule), judge_is_strong=settings.judge.model == settings.strong.model)
    for target in plan.targets:
        _check_not_self(target, plan.warnings)
    if plan.judge_is_strong:
        plan.warnings.append(f"the judge is the strong model ({settings.judge.model}); a judge tends to prefer its "
                             "own answers, so CRR is biased low; use a different --judge for reportable numbers")
    for spec in benchmarks:
        questions = _questions(spec, settings.home / "benchmarks", limit, prompt_column)
        label = questions[0].benchmark
        if label in plan.questions:
            raise BenchmarkError(f"two benchmarks are named {label!r} ({spec}); rename one of the files")
        plan.questions[label] = questions
    return plan


_LOADED: dict[str, list[BenchmarkQuestion]] = {}  # benchmarks loaded in this process, by spec and file stamp


def _questions(spec: str, cache_dir: Path, limit: int | None, prompt_column: str | None) -> list[BenchmarkQuestion]:
    """A benchmark's questions, loaded once per process: `run` plans its evaluation before generating, and again
    for the tuned targets after training, on the same questions."""
    path = Path(spec)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    key = repr((spec, str(cache_dir), limit, prompt_column, stamp))
    if key not in _LOADED:
        _LOADED[key] = load_benchmark(spec, cache_dir=cache_dir, limit=limit, prompt_column=prompt_column)
        while len(_LOADED) > 16:  # a long-lived worker process keeps no more
            del _LOADED[next(iter(_LOADED))]
    return list(_LOADED[key])


def _check_not_self(target: Settings, warnings: list[str]) -> None:
    """CRR of a model against itself measures nothing; only the embedded default may do it, as a smoke test."""
    same = target.target.model == target.strong.model and target.target.api_base == target.strong.api_base
    if not same:
        return
    if target.target.model == EMBEDDED:
        warnings.append("target and strong are both the embedded model: this CRR only proves the machinery "
                        "works; set --target and --strong to measure a model")
        return
    raise ConfigError(f"target and strong are the same model ({target.target.model}); CRR of a model against "
                      "itself is meaningless: pass a different --target or --strong")


def summarize_cell(rows: Sequence[EvalQuestionResult], benchmark: str, target: Settings, rule: str,
                   judge_is_strong: bool) -> EvalSummary:
    """One leaderboard row; failed questions are counted but stay out of the CRR denominator."""
    judged = [r for r in rows if r.outcome != "failed"]
    failed = [r for r in rows if r.outcome == "failed"]
    if not judged:
        raise _nothing_judged(benchmark, target, failed)
    stats = summarize([r.outcome for r in judged], [bool(r.flipped) for r in judged],
                      [len(r.target_answer or "") for r in judged], [len(r.strong_answer or "") for r in judged])
    return EvalSummary(benchmark=benchmark, target=target.target.model, strong=target.strong.model,
                       judge=target.judge.model, rule=rule, failures=len(failed), judge_is_strong=judge_is_strong,
                       **stats.model_dump())


def _nothing_judged(benchmark: str, target: Settings, failed: Sequence[EvalQuestionResult]) -> ModelError:
    if not failed:
        return ModelError(f"{benchmark}: no question was evaluated for target {target.target.model}")
    judge_failures = [r for r in failed if (r.failure or "").startswith("judge")]
    if len(judge_failures) == len(failed):
        raw = next((r.judge_output for r in judge_failures if r.judge_output is not None), None)
        return ModelError(f"judge model {target.judge.model} never returned scores on {benchmark} for target "
                          f"{target.target.model}: all {len(failed)} judgements failed; first raw output: "
                          f"{(raw or '')[:200]!r}; use a judge that follows the output format")
    return ModelError(f"{benchmark}: no question could be judged for target {target.target.model}; "
                      f"first failure: {failed[0].failure}")


def summarize_plan(plan: EvalPlan, rows: Sequence[EvalQuestionResult]
                   ) -> tuple[list[EvalQuestionResult], list[EvalSummary]]:
    """Rows ordered by benchmark, target and question, and one summary per benchmark x target."""
    position = {(b, q.question_id): i for b, questions in plan.questions.items() for i, q in enumerate(questions)}
    ordered, summaries = [], []
    for benchmark in plan.questions:
        for target in plan.targets:
            cell = sorted((r for r in rows if r.benchmark == benchmark and r.target_model == target.target.model),
                          key=lambda r: position[r.benchmark, r.question_id])
            summaries.append(summarize_cell(cell, benchmark, target, plan.rule, plan.judge_is_strong))
            ordered += cell
    return ordered, summaries


def report_meta(plan: EvalPlan, limit: int | None, flow_run_id: str) -> dict[str, Any]:
    """What summary.json and the report say about the run, so a number can be traced to how it was made."""
    return {"flow_run_id": flow_run_id, "benchmarks": {b: len(q) for b, q in plan.questions.items()},
            "limit": limit, "targets": [t.target.model for t in plan.targets], "strong": plan.settings.strong.model,
            "judge": plan.settings.judge.model, "judge_temperature": plan.settings.judge.temperature,
            "rule": plan.rule, "preset": plan.settings.preset, "warnings": plan.warnings,
            "judge_template": plan.settings.judge_template,
            "prompts": {name: load_prompt(name).version for name in ("respond", plan.settings.judge_template)}}


def results_of(summaries: Sequence[EvalSummary]) -> list[LeaderboardRow]:
    """The flow's leaderboard rows (read by the CLI and the refresh flow)."""
    return [LeaderboardRow.model_validate(s.model_dump(include=set(LeaderboardRow.model_fields))) for s in summaries]


LOCAL_QUESTIONS = Path(__file__).resolve().parents[2] / "data" / "eval_questions.jsonl"


def default_benchmark() -> str:
    """What `codeclm run` evaluates on: the env's choice (a name such as `vicuna`, or a path), else the small
    question set written for this project, so the main job works offline (we ship no benchmark text)."""
    return os.environ.get(DEFAULT_BENCHMARK_ENV) or str(LOCAL_QUESTIONS)
