"""Flow `protocol`: the paper's experiment as one command (§5, Table 1).

First the judge check (codeclm.eval.judge_check): a judge that cannot tell an intact answer from a cut one is
refused before anything is spent on data. Then for each benchmark (a subflow): its recorded 20 / 80 split, and
for each method (a subflow) a dataset from that method's seeds (the benchmark's split or a recorded Alpaca
sample, `[protocol] seed_sources`; WizardLM+ from the codeclm method's basic instructions) at the same budget,
checked against the evaluation questions by the leak guard, and the target tuned on it; then one `evaluate` of
the base and every tuned target on the same questions; then one Table-1 report over all of them:
OUT/report.md, OUT/table.parquet, OUT/crr.svg, OUT/protocol.json and Prefect artifacts. The steps are `run`'s
(generate or baseline, finetune, served targets, evaluate); a rerun finds every dataset, model and verdict in
the step, training and call caches.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from codeclm.checks import check_output
from codeclm.errors import ConfigError, DatasetError
from codeclm.eval.eval_report import chart_svg, data_uri
from codeclm.eval.judge_check import JudgeCheck, JudgeCheckRow, figure
from codeclm.eval.loop import read_questions, served_targets
from codeclm.eval.protocol import (
    BASE_ROW,
    METHODS,
    BenchmarkPlan,
    EvalOn,
    ProtocolRow,
    SeedPlan,
    check_leak_risk,
    check_methods,
    filtering_warning,
    judge_mode,
    plan_protocol,
    plan_seeds,
    report_markdown,
    statements,
    table_rows,
    write_table,
)
from codeclm.eval.studies import check_judges, check_studies, with_judge
from codeclm.llm.embedded import models_ready
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import progress_view, stage_table
from codeclm.results import MethodResult, ProtocolResult
from codeclm.settings import Settings
from codeclm.train.finetune import check_trainer
from flows.baselines import method_dataset
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.studies import run_studies, second_judges
from tasks._base import read
from tasks.judge_check import judge_check

ROLES = ("strong", "target", "judge")


@flow(name="codeclm-protocol-method", flow_run_name="{benchmark} · {method}", log_prints=True)
def method_run(method: str, benchmark: str, seeds: str, root: str, settings: Settings, basic: str | None = None
               ) -> MethodResult:
    """A method's dataset from its seeds (WizardLM+: from `basic`, a codeclm dataset's basic instructions, when
    given), and the target tuned on it."""
    data = Path(root) / "datasets" / benchmark / method
    make = method_dataset(method, seeds, str(data), settings, basic)
    tuned = finetune(str(data), str(Path(root) / "models" / benchmark / method), settings)
    return MethodResult(benchmark=benchmark, method=method, dataset=str(data), pairs=make.train,
                        shortfall=make.budget.shortfall, eval_overlap=int(make.counts.get("eval_overlap", 0)),
                        model=tuned)


@flow(name="codeclm-protocol-benchmark", flow_run_name="protocol · {label}", log_prints=True)
def benchmark_run(label: str, plan: BenchmarkPlan, methods: list[str], seeds: dict[str, SeedPlan], root: str,
                  settings: Settings, limit: int | None, judges: list[str] | None = None
                  ) -> tuple[list[MethodResult], list[ProtocolRow], list[dict[str, str]]]:
    """Every method on one benchmark (codeclm first: WizardLM+ evolves its basic instructions), the leak guard
    on every training set; then base and tuned targets answered and judged on the same questions. A method
    that publishes no pair is reported and left out; the others go on."""
    guarded = plan.guarded(settings)
    made: dict[str, MethodResult] = {}
    empty: list[dict[str, str]] = []
    for m in sorted(methods, key=lambda m: m != "codeclm"):
        basic = made["codeclm"].dataset if m == "wizardlm_plus" and "codeclm" in made else None
        try:
            made[m] = method_run(m, plan.label, plan.seed_file(seeds[m]), root, guarded, basic)
        except DatasetError as exc:
            print(f"WARNING: {m} on {plan.label} published no pair: {exc}")
            empty.append({"benchmark": plan.label, "method": m, "reason": str(exc)})
    ordered = [made[m] for m in methods if m in made]
    eval_dir = Path(root) / "eval" / plan.label
    with served_targets({m.method: m.model for m in ordered}, settings) as (base, tuned):
        evaluate([plan.eval_spec], str(eval_dir), targets=[base, *tuned.values()], settings=settings, limit=limit)
        # Table 6 (flows.studies): the same answers judged by each further judge
        second_judges(plan.label, plan.eval_spec, [base, *tuned.values()], root, settings, judges or [], limit)
    models = {BASE_ROW: base.model, **{m: role.model for m, role in tuned.items()}}
    datasets = {m.method: (m.pairs, m.shortfall) for m in ordered}
    return ordered, table_rows(plan.label, read_questions(eval_dir), models, datasets), empty


def check_judge(plan: BenchmarkPlan, settings: Settings, skip: bool) -> JudgeCheck:
    """The judge check on the first benchmark's first evaluation questions; refused below the stated minimum
    unless `skip` (the report then says so)."""
    out = judge_check(plan.check_questions, settings.for_stage("judge_check"), plan.label)
    rows = read(out["checks"], JudgeCheckRow)
    share, minimum = figure(rows), settings.protocol.judge_check_min
    check = JudgeCheck(figure=share, orders=len(rows), pairs=len({r.pair_id for r in rows}), minimum=minimum,
                       passed=bool(rows) and share >= minimum, skipped=False, judge=settings.judge.model,
                       template=settings.judge_template, mode=judge_mode(settings))
    if not check.passed:
        if not skip:
            raise ConfigError(f"{check.line()}: it cannot tell a good answer from a worse one, so Table 1 would "
                              "measure its position bias; use a stronger --judge, or --skip-judge-check to go on")
        check = check.model_copy(update={"skipped": True})
    print(check.line())
    return check


@flow(name="codeclm-protocol", flow_run_name="protocol · {out}", log_prints=True,
      on_running=[watch_cancellation])
def protocol(benchmarks: list[str], out: str, settings: Settings | None = None, methods: list[str] | None = None,
             eval_on: EvalOn = "whole", limit: int | None = None, seed_fraction: float = 0.2,
             skip_judge_check: bool = False, judges: list[str] | None = None,
             studies: list[str] | None = None) -> ProtocolResult:
    """Table 1: every method's data, trained and evaluated per benchmark; bad input fails before any call."""
    settings = settings or Settings()
    methods = check_methods(methods or list(METHODS))
    if settings.finetune.trainer == "off":
        raise ConfigError("the protocol compares data by training on it; finetune.trainer = 'off' cannot")
    check_leak_risk(methods, settings, eval_on)
    check_trainer(settings)
    root = check_output(out, replaced=False)
    judges, studies = check_judges(judges or [], settings), check_studies(studies or [], settings)  # studies
    plans = plan_protocol(benchmarks, root, settings, eval_on, limit, seed_fraction)
    seeds = plan_seeds(methods, root, settings)
    warnings = [w for w in [filtering_warning(settings, methods)] if w]
    for w in warnings:
        print(f"WARNING: {w}")
    made: list[MethodResult] = []
    rows: list[ProtocolRow] = []
    empty: list[dict[str, str]] = []
    with progress_view("protocol-progress", f"protocol · {out}"), models_ready(settings, ROLES):
        check = check_judge(plans[0], settings, skip_judge_check)
        further_checks = [check_judge(plans[0], with_judge(settings, j), skip_judge_check) for j in judges]  # Table 6
        for plan in plans:
            bench_made, bench_rows, bench_empty = benchmark_run(plan.label, plan, methods, seeds, str(root), settings,
                                                                limit, judges)
            made += bench_made
            rows += bench_rows
            empty += bench_empty
        further = run_studies(studies, judges, plans, seeds, rows, str(root), settings, limit)  # Table 6, Figs. 3-5
    meta = {"benchmarks": {p.label: p.split.model_dump() for p in plans}, "methods": methods, "eval_on": eval_on,
            "limit": limit, "seed_fraction": seed_fraction, "budget": settings.budget, "preset": settings.preset,
            "strong": settings.strong.model, "judge": settings.judge.model, "trainer": settings.finetune.trainer,
            "base_model": settings.finetune.base_model, "filtering_target": settings.target.model,
            "finetune_preset": settings.finetune.preset, "training_method": settings.finetune.hyper().method,
            "judge_template": settings.judge_template, "judge_mode": judge_mode(settings),
            "judge_check": check.model_dump(), "further_judge_checks": [c.model_dump() for c in further_checks],
            "warnings": warnings, "empty": empty,
            "seed_sources": {m: p.model_dump() for m, p in seeds.items()},
            "statements": statements(methods, settings, {p.label: len(p.split.seed_ids) for p in plans}),
            "trainings": [{"benchmark": m.benchmark, "method": m.method, "pairs": m.pairs, "shortfall": m.shortfall,
                           "eval_overlap": m.eval_overlap, "trained": not m.model.cached, "steps": m.model.steps,
                           "model": m.model.out, "preset": m.model.preset, "recipe": m.model.recipe,
                           "prompt_format": m.model.prompt_format} for m in made]}
    meta.update(further.meta)  # studies: every judge, and each study's folder
    svg = chart_svg(rows)
    write_table(root, rows, meta, svg, report_markdown(rows, meta, "crr.svg") + further.markdown)
    create_markdown_artifact(report_markdown(rows, meta, data_uri(svg)), key="protocol-report",
                             description="Table 1: CRR per method and benchmark, difference to Self-Instruct")
    stage_table("protocol-table", [r.model_dump() for r in rows], "CRR per method and benchmark (Table 1)")
    for r in rows:
        delta = "" if r.delta != r.delta else f"; vs self_instruct {r.delta:+.1f} pp [{r.delta_low:+.1f}, " \
                                              f"{r.delta_high:+.1f}]"
        print(f"{r.benchmark} · {r.method}: CRR {r.crr:.1f}% [{r.ci_low:.1f}, {r.ci_high:.1f}] ({r.questions} "
              f"questions, {r.wins}/{r.ties}/{r.losses} W/T/L{delta})")
    return ProtocolResult(out=str(root), eval_on=eval_on, rows=rows, methods=made, report=str(root / "report.md"),
                          judge_check=check, empty=empty)
