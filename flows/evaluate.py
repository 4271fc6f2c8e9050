"""Flow `evaluate`: does the data work? CRR of each target model against the strong model (paper §5.3).

check the request and load the benchmarks -> answer (strong once, each target) per benchmark batch ->
judge per batch and target, in both orders -> CRR per benchmark x target -> files, chart and artifacts.
Orchestration only; every step is a batch task or a function of `codeclm.eval.evaluation` / `codeclm.eval.eval_report`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from codeclm.checks import check_evaluate
from codeclm.eval.crr import Rule
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.eval.eval_report import write_report
from codeclm.eval.evaluation import EvalPlan, report_meta, results_of, summarize_plan
from codeclm.llm.embedded import models_ready
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import progress_view, stage_table, wait_stage
from codeclm.records import FailedCall
from codeclm.results import EvaluateResult
from codeclm.settings import RoleConfig, Settings
from codeclm.storage import read_records
from flows.generate import task_runner
from tasks._base import Outputs, Ref
from tasks.answer import answer, question_batches
from tasks.judge import judge


@contextmanager
def endpoints_ready(plan: EvalPlan) -> Iterator[None]:
    """The embedded server, started once if any role needs it (the other models were checked with the plan)."""
    with ExitStack() as stack:
        for settings, roles in plan.endpoints():
            stack.enter_context(models_ready(settings, roles))
        yield


@flow(name="codeclm-evaluation", flow_run_name="evaluation · {rule}")
def evaluation(batches: dict[str, list[dict[str, Any]]], settings: Settings, targets: list[Settings], rule: Rule
               ) -> dict[str, list[Ref]]:
    """Answer and judge stages over question batches (Refs; typed as dicts because Prefect validates flow
    parameters with pydantic, which rejects typing.TypedDict on Python 3.11); a subflow so the task runner
    can follow the settings."""
    jobs = [(f"{name}-{i:03d}", cast(Ref, ref)) for name, refs in batches.items() for i, ref in enumerate(refs)]
    strong = [answer.submit(ref, settings.for_stage("answer", "strong"), "strong", batch=label) for label, ref in jobs]
    # A target configured exactly like the strong model (the embedded default) asks the same calls: waiting
    # for the strong answers turns them into cache hits instead of a second, equally slow, round of calls.
    own = [[answer.submit(ref, t.for_stage("answer", "target"), "target", batch=label,
                          wait_for=[strong[j]] if t.target == settings.strong else None)
            for j, (label, ref) in enumerate(jobs)] for t in targets]
    answered = wait_stage("answer", [*strong, *(f for futures in own for f in futures)], key_prefix="eval")
    strong_out, own_out = answered[:len(jobs)], answered[len(jobs):]
    judged = wait_stage("judge", [
        judge.submit(ref, strong_out[j]["answers"], own_out[t * len(jobs) + j]["answers"], settings.for_stage("judge"),
                     target.target.model, rule, batch=label)
        for t, target in enumerate(targets) for j, (label, ref) in enumerate(jobs)], key_prefix="eval")
    outputs: list[Outputs] = answered + judged
    return {"results": [o["results"] for o in judged], "failed": [o["failed"] for o in outputs]}


def _run_name() -> str:
    params = flow_run.parameters
    return f"evaluate · {', '.join(params.get('benchmarks') or [])} → {params.get('out')}"


@flow(name="codeclm-evaluate", flow_run_name=_run_name, log_prints=True, on_running=[watch_cancellation])
def evaluate(benchmarks: list[str], out: str, targets: list[str | RoleConfig] | None = None,
             settings: Settings | None = None, limit: int | None = None,
             rule: Literal["codeclm", "alpagasus"] | None = None,
             prompt_column: str | None = None) -> EvaluateResult:
    """CRR of every target against the strong model on every benchmark, published into `out` when complete;
    `rule` defaults to the settings' rule."""
    settings = settings or Settings()
    plan = check_evaluate(benchmarks, out, settings, targets, limit, rule, prompt_column)  # the CLI's, if it ran
    logger = get_run_logger()
    for warning in plan.warnings:
        logger.warning(warning)
    with progress_view("evaluate-progress", f"evaluate · {', '.join(benchmarks)} → {out}"), endpoints_ready(plan):
        batches = {name: question_batches(questions, settings) for name, questions in plan.questions.items()}
        refs = evaluation.with_options(task_runner=task_runner(settings))(batches, settings, plan.targets, plan.rule)
    rows = [row for ref in refs["results"] for row in read_records(Path(ref["path"]), EvalQuestionResult)]
    failed = [row for ref in refs["failed"] for row in read_records(Path(ref["path"]), FailedCall)]
    rows, summaries = summarize_plan(plan, rows)
    report = write_report(Path(out), rows, summaries, failed, report_meta(plan, limit, str(flow_run.get_id() or "")))
    results = results_of(summaries)
    stage_table("crr-leaderboard", [r.model_dump() for r in results], "CRR per benchmark and target against the "
                "strong model")
    create_markdown_artifact(report["markdown"], key="crr-report", description="CRR report with chart")
    for r in results:
        print(f"{r.benchmark} · {r.target}: CRR {r.crr:.2f}% [{r.ci_low:.1f}, {r.ci_high:.1f}] "
              f"({r.wins}W/{r.ties}T/{r.losses}L, {r.failures} failed)")
    return EvaluateResult(out=str(Path(out)), results=results)
