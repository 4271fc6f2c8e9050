"""The protocol's further studies as subflows (Table 6, Figs. 3-5; plans, rows and reports in
codeclm.eval.studies): each study's datasets (made as Table 1 makes them: `flows.baselines.method_dataset`),
trainings (finetune) and one evaluation per benchmark of its tuned targets (served_targets + evaluate), then
OUT/studies/STUDY and a Prefect artifact. A point equal to a Table-1 cell uses the cell's folders, so the step,
training and call caches make it free, and a rerun of a whole study pays nothing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from codeclm.eval.eval_report import data_uri
from codeclm.eval.loop import read_questions, served_targets
from codeclm.eval.protocol import BenchmarkPlan, ProtocolRow, SeedPlan, plan_seeds, table_rows
from codeclm.eval.studies import (
    FIGURE,
    TITLE,
    JudgeRow,
    Point,
    StudyRow,
    judge_rows,
    judge_slug,
    judges_agreement,
    judges_markdown,
    line_svg,
    round_points,
    study_markdown,
    study_points,
    study_rows,
    with_judge,
    write_study,
)
from codeclm.settings import RoleConfig, Settings
from codeclm.storage import write_json, write_records, write_text
from codeclm.train.finetune import FinetuneResult
from flows.baselines import method_dataset
from flows.evaluate import evaluate
from flows.finetune import finetune


class StudiesResult(BaseModel):
    """What the studies add to the protocol's report (markdown sections) and to protocol.json (`meta`)."""

    markdown: str
    meta: dict[str, object]


def judge_eval_dir(root: str, benchmark: str, judge: str) -> Path:
    return Path(root) / "studies" / "judges" / "eval" / benchmark / judge_slug(judge)


@flow(name="codeclm-protocol-judges", flow_run_name="judges · {label}", log_prints=True)
def second_judges(label: str, eval_spec: str, targets: list[RoleConfig], root: str, settings: Settings,
                  judges: list[str], limit: int | None) -> None:
    """Table 6: the base and every tuned target judged again by each further judge. The answers are the
    Table-1 run's (the call cache has them), so only the judgements are new calls."""
    for judge in judges:
        evaluate([eval_spec], str(judge_eval_dir(root, label, judge)), targets=list(targets),
                 settings=with_judge(settings, judge), limit=limit)


@flow(name="codeclm-protocol-study", flow_run_name="{study} · {plan.label}", log_prints=True)
def study_benchmark(study: str, plan: BenchmarkPlan, seeds: dict[str, SeedPlan], root: str, settings: Settings,
                    limit: int | None) -> list[StudyRow]:
    """One study on one benchmark: each point's data (made as Table 1 makes its datasets: each method's seeds,
    the leak guard; WizardLM+ from the codeclm dataset of the same point), its training, then one evaluation
    of all its models."""
    out = Path(root)
    guarded = plan.guarded(settings)
    shares: dict[int, int] | None = None
    if study == "rounds":
        codeclm_data = out / "datasets" / plan.label / "codeclm"
        # Table 1's codeclm dataset, found again
        method_dataset("codeclm", plan.seed_file(seeds["codeclm"]), str(codeclm_data), guarded)
        points, shares = round_points(codeclm_data, plan.label, out)
    else:
        points = study_points(study, plan.label, out, settings)
    tuned: dict[str, FinetuneResult] = {}
    codeclm_at: dict[float, str] = {}
    for p in sorted(points, key=lambda p: p.method != "codeclm"):
        if study != "rounds":
            at = _at(guarded, p)
            source = plan_seeds([p.method], out, at)[p.method]  # an Alpaca sample sized for this point's budget
            basic = codeclm_at.get(p.x) if p.method == "wizardlm_plus" else None
            method_dataset(p.method, plan.seed_file(source), p.dataset, at, basic)
            if p.method == "codeclm":
                codeclm_at[p.x] = p.dataset
        tuned[p.label] = finetune(p.dataset, p.model, settings)
    eval_dir = out / "studies" / study / "eval" / plan.label
    with served_targets(tuned, settings) as (_base, roles):
        evaluate([plan.eval_spec], str(eval_dir), targets=list(roles.values()), settings=settings, limit=limit)
    models = {label: role.model for label, role in roles.items()}
    return study_rows(study, plan.label, read_questions(eval_dir), points, models,
                      {label: t.pairs for label, t in tuned.items()}, shares)


def _at(settings: Settings, point: Point) -> Settings:
    return settings.model_copy(update=point.settings_update) if point.settings_update else settings


def _judges_table(judges: list[str], plans: list[BenchmarkPlan], rows: list[ProtocolRow], root: str,
                  settings: Settings) -> str:
    """Table 6 from the Table-1 verdicts and each further judge's, written to OUT/studies/judges."""
    table: list[JudgeRow] = []
    for plan in plans:
        own = [r for r in rows if r.benchmark == plan.label]
        models = {r.method: r.model for r in own}
        datasets = {r.method: (r.pairs, r.shortfall) for r in own}
        table += judge_rows(settings.judge.model, own)
        for judge in judges:
            verdicts = read_questions(judge_eval_dir(root, plan.label, judge))
            table += judge_rows(judge, table_rows(plan.label, verdicts, models, datasets))
    agreement = judges_agreement(table)
    markdown = judges_markdown(table, agreement)
    folder = Path(root) / "studies" / "judges"
    write_records(folder / "table.parquet", table, JudgeRow)
    write_text(folder / "report.md", markdown)
    write_json(folder / "judges.json", {"judges": [settings.judge.model, *judges], "agreement": agreement,
                                        "rows": [r.model_dump() for r in table]})
    create_markdown_artifact(markdown, key="protocol-judges", description="Table 6: CRR gap to Self-Instruct "
                             "per judge")
    for a in agreement:
        print(f"{a['benchmark']}: judges {' and '.join(a['judges'])} "
              f"{'agree' if a['same_ranking'] else 'disagree'} on the ranking (Kendall tau {a['kendall_tau']:+.2f})")
    return markdown


@flow(name="codeclm-protocol-studies", flow_run_name="studies · {root}", log_prints=True)
def run_studies(studies: list[str], judges: list[str], plans: list[BenchmarkPlan], seeds: dict[str, SeedPlan],
                rows: list[ProtocolRow], root: str, settings: Settings, limit: int | None) -> StudiesResult:
    """Every study asked for, after Table 1: Table 6 from the judges' verdicts, then Figs. 3-5 per benchmark."""
    sections: list[str] = []
    meta: dict[str, object] = {"judges": [settings.judge.model, *judges]}
    if judges:
        sections.append(_judges_table(judges, plans, rows, root, settings))
    done: dict[str, object] = {}
    for study in studies:
        study_table = [r for plan in plans for r in study_benchmark(study, plan, seeds, root, settings, limit)]
        folder = Path(root) / "studies" / study
        svg = line_svg(study, study_table)
        write_study(folder, study, study_table, study_markdown(study, study_table, settings, "chart.svg"), svg,
                    {"study": study, "figure": FIGURE[study], "studies": settings.studies.model_dump()})
        create_markdown_artifact(study_markdown(study, study_table, settings, data_uri(svg)), key=f"study-{study}",
                                 description=f"{FIGURE[study]}: {TITLE[study]}")
        sections.append(study_markdown(study, study_table, settings, f"studies/{study}/chart.svg"))
        done[study] = {"figure": FIGURE[study], "folder": str(folder), "points": len(study_table)}
        for r in study_table:
            share = "" if r.share != r.share else f", {r.share:.0%} of the pairs from this round"
            print(f"{FIGURE[study]} {r.benchmark} · {r.label}: CRR {r.crr:.1f}% [{r.ci_low:.1f}, {r.ci_high:.1f}] "
                  f"({r.pairs} pairs{share})")
    if studies:
        meta["studies"] = {**done, "settings": settings.studies.model_dump()}
    return StudiesResult(markdown="\n".join(sections), meta=meta)
