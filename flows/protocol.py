"""Flow `protocol`: the paper's experiment as one command (§5, Table 1).

For each benchmark (a subflow): its recorded 20 / 80 split, then for each method (a subflow) a dataset from the
20 % seeds at the same budget and the target tuned on it, then one `evaluate` of the base and every tuned target
on the same questions; then one Table-1 report over all of them: OUT/report.md, OUT/table.parquet, OUT/crr.svg,
OUT/protocol.json and Prefect artifacts. The steps are `run`'s (generate or baseline, finetune, served targets,
evaluate); a rerun finds every dataset, model and verdict in the step, training and call caches.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from codeclm.checks import check_output
from codeclm.errors import ConfigError
from codeclm.eval.eval_report import chart_svg, data_uri
from codeclm.eval.loop import read_questions, served_targets
from codeclm.eval.protocol import (
    BASE_ROW,
    METHODS,
    BenchmarkPlan,
    EvalOn,
    ProtocolRow,
    check_methods,
    plan_protocol,
    report_markdown,
    table_rows,
    write_table,
)
from codeclm.eval.studies import check_judges, check_studies
from codeclm.llm.embedded import models_ready
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import progress_view, stage_table
from codeclm.results import MethodResult, ProtocolResult
from codeclm.settings import Settings
from codeclm.train.finetune import check_trainer
from flows.baselines import baseline
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.generate import generate
from flows.studies import run_studies, second_judges

ROLES = ("strong", "target", "judge")


@flow(name="codeclm-protocol-method", flow_run_name="{benchmark} · {method}", log_prints=True)
def method_run(method: str, benchmark: str, seeds: str, root: str, settings: Settings) -> MethodResult:
    """A method's dataset from the benchmark's seeds, and the target tuned on it."""
    data = Path(root) / "datasets" / benchmark / method
    make = generate(seeds, str(data), settings) if method == "codeclm" else baseline(method, seeds, str(data),
                                                                                        settings)
    tuned = finetune(str(data), str(Path(root) / "models" / benchmark / method), settings)
    return MethodResult(benchmark=benchmark, method=method, dataset=str(data), pairs=make.train,
                        shortfall=make.budget.shortfall, model=tuned)


@flow(name="codeclm-protocol-benchmark", flow_run_name="protocol · {label}", log_prints=True)
def benchmark_run(label: str, plan: BenchmarkPlan, methods: list[str], root: str, settings: Settings,
                  limit: int | None, judges: list[str] | None = None) -> tuple[list[MethodResult], list[ProtocolRow]]:
    """Every method on one benchmark, then base and tuned targets answered and judged on the same questions."""
    made = [method_run(m, plan.label, plan.seeds, root, settings) for m in methods]
    eval_dir = Path(root) / "eval" / plan.label
    with served_targets({m.method: m.model for m in made}, settings) as (base, tuned):
        evaluate([plan.eval_spec], str(eval_dir), targets=[base, *tuned.values()], settings=settings, limit=limit)
        # Table 6 (flows.studies): the same answers judged by each further judge
        second_judges(plan.label, plan.eval_spec, [base, *tuned.values()], root, settings, judges or [], limit)
    models = {BASE_ROW: base.model, **{m: role.model for m, role in tuned.items()}}
    datasets = {m.method: (m.pairs, m.shortfall) for m in made}
    return made, table_rows(plan.label, read_questions(eval_dir), models, datasets)


@flow(name="codeclm-protocol", flow_run_name="protocol · {out}", log_prints=True,
      on_running=[watch_cancellation])
def protocol(benchmarks: list[str], out: str, settings: Settings | None = None, methods: list[str] | None = None,
             eval_on: EvalOn = "whole", limit: int | None = None, seed_fraction: float = 0.2,
             judges: list[str] | None = None, studies: list[str] | None = None) -> ProtocolResult:
    """Table 1: every method's data, trained and evaluated per benchmark; bad input fails before any call."""
    settings = settings or Settings()
    methods = check_methods(methods or list(METHODS))
    if settings.finetune.trainer == "off":
        raise ConfigError("the protocol compares data by training on it; finetune.trainer = 'off' cannot")
    check_trainer(settings)
    root = check_output(out, replaced=False)
    judges, studies = check_judges(judges or [], settings), check_studies(studies or [], settings)  # studies
    plans = plan_protocol(benchmarks, root, settings, eval_on, limit, seed_fraction)
    made: list[MethodResult] = []
    rows: list[ProtocolRow] = []
    with progress_view("protocol-progress", f"protocol · {out}"), models_ready(settings, ROLES):
        for plan in plans:
            bench_made, bench_rows = benchmark_run(plan.label, plan, methods, str(root), settings, limit, judges)
            made += bench_made
            rows += bench_rows
        further = run_studies(studies, judges, plans, rows, str(root), settings, limit)  # Table 6, Figs. 3-5
    meta = {"benchmarks": {p.label: p.split.model_dump() for p in plans}, "methods": methods, "eval_on": eval_on,
            "limit": limit, "seed_fraction": seed_fraction, "budget": settings.budget, "preset": settings.preset,
            "strong": settings.strong.model, "judge": settings.judge.model, "trainer": settings.finetune.trainer,
            "base_model": settings.finetune.base_model,
            "trainings": [{"benchmark": m.benchmark, "method": m.method, "pairs": m.pairs, "shortfall": m.shortfall,
                           "trained": not m.model.cached, "steps": m.model.steps, "model": m.model.out}
                          for m in made]}
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
              f"questions{delta})")
    return ProtocolResult(out=str(root), eval_on=eval_on, rows=rows, methods=made, report=str(root / "report.md"))
