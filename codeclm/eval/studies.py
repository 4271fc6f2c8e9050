"""The rest of the paper's evaluation (§5.4-5.5) as `codeclm protocol` options, without Prefect: Table 6 (each
tuned target judged by a second judge), Fig. 3 (CRR of models trained on the pairs kept up to each round), Fig. 4
(the metadata subsampled at the same budget) and Fig. 5 (a budget sweep): the points each study trains, their
call plan for `--dry-run`, the rows, a line chart and a report section per study.

A point equal to a Table-1 cell (all rounds, all metadata, the protocol's own budget) is that cell: the same
dataset folder and model folder, so the caches make it free and its CRR is the Table-1 one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args
from xml.sax.saxutils import escape

import pyarrow.parquet as pq
from pydantic import BaseModel

from codeclm.errors import ConfigError
from codeclm.eval.crr import bootstrap_ci
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.eval.protocol import BASE_ROW, METHODS, REFERENCE, ProtocolRow, plan_calls
from codeclm.records import Record
from codeclm.settings import Settings
from codeclm.storage import write_json, write_records, write_text

Study = Literal["rounds", "metadata", "budget"]
STUDIES: tuple[str, ...] = get_args(Study)
FIGURE = {"rounds": "Fig. 3", "metadata": "Fig. 4", "budget": "Fig. 5"}
TITLE = {"rounds": "CRR by Self-Rubrics round (data kept up to round k)",
         "metadata": "CRR by share of the metadata kept (same budget)",
         "budget": "CRR by data size"}
X_AXIS = {"rounds": "round k (pairs kept at rounds <= k)", "metadata": "metadata kept (%)",
          "budget": "training pairs (budget)"}


def check_studies(studies: Sequence[str], settings: Settings) -> list[str]:
    """The studies asked for, in the given order without repeats; an unknown name or a study whose settings
    cannot run is one clear line, before any call."""
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise ConfigError(f"unknown study {', '.join(unknown)}; choose from {', '.join(STUDIES)}")
    chosen = list(dict.fromkeys(studies))
    if "budget" in chosen:
        bad = [m for m in settings.studies.budget_methods if m not in METHODS]
        if bad:
            raise ConfigError(f"studies.budget_methods: unknown method {', '.join(bad)}; choose from "
                              f"{', '.join(METHODS)}")
    if "rounds" in chosen and not settings.contrastive_filtering:
        raise ConfigError("--study rounds needs contrastive_filtering = true: without it every pair is of the "
                          "last round, so there are no rounds to compare")
    return chosen


def check_judges(extra: Sequence[str], settings: Settings) -> list[str]:
    """Table 6's further judges (the `--judge` values after the first, which is `settings.judge`): each a model
    of its own, or one clear line."""
    seen = [settings.judge.model]
    for j in extra:
        if j in seen:
            raise ConfigError(f"--judge {j} is given twice; Table 6 compares different judges")
        seen.append(j)
    return list(extra)


def with_judge(settings: Settings, model: str) -> Settings:
    """The settings with another judge model, keeping the judge's own settings (its temperature 0 above all)."""
    return settings.model_copy(update={"judge": settings.judge.model_copy(update={"model": model})})


def judge_slug(model: str) -> str:
    """A folder name for a judge's evaluation (its litellm string made path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[:80] or "judge"


class Point(BaseModel):
    """One model a study trains and evaluates: a method's data made one way (a round cut-off, a metadata share,
    a budget); `same_as_table` when the point is the Table-1 cell itself."""

    study: str
    label: str
    method: str
    x: float
    dataset: str
    model: str
    settings_update: dict[str, Any] = {}
    same_as_table: bool = False


def study_points(study: str, bench: str, root: Path, settings: Settings) -> list[Point]:
    """The points of a study on one benchmark whose data is made by `generate`/`baseline` (metadata, budget);
    the rounds study's points are cut from the codeclm dataset once it exists (`round_points`)."""
    folder = root / "studies" / study
    points = []
    if study == "metadata":
        for f in settings.studies.metadata_fractions:
            same = f >= 1
            name = f"metadata-{round(100 * f):03d}"
            points.append(Point(study=study, label=f"{100 * f:g} % metadata", method="codeclm", x=100 * f,
                                dataset=str(root / "datasets" / bench / "codeclm") if same else
                                str(folder / "datasets" / bench / name),
                                model=str(root / "models" / bench / "codeclm") if same else
                                str(folder / "models" / bench / name),
                                settings_update={} if same else {"metadata_fraction": f}, same_as_table=same))
    elif study == "budget":
        for method in settings.studies.budget_methods:
            for b in settings.studies.budgets:
                same = b == settings.budget
                name = f"{method}-{b}"
                points.append(Point(study=study, label=f"{method} · {b}", method=method, x=b,
                                    dataset=str(root / "datasets" / bench / method) if same else
                                    str(folder / "datasets" / bench / name),
                                    model=str(root / "models" / bench / method) if same else
                                    str(folder / "models" / bench / name),
                                    settings_update={} if same else {"budget": b}, same_as_table=same))
    return points


def round_shares(dataset: Path) -> dict[int, int]:
    """Pairs kept per Self-Rubrics round in a published codeclm dataset (its train.parquet's `round`)."""
    rounds = pq.read_table(dataset / "train.parquet", columns=["round"]).column("round").to_pylist()
    counts: dict[int, int] = {}
    for k in rounds:
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def round_points(dataset: Path, bench: str, root: Path) -> tuple[list[Point], dict[int, int]]:
    """Fig. 3's training sets: for each round k with kept pairs, the pairs kept at rounds <= k, written as
    chat JSONL (lines of the dataset's train.jsonl, which follows train.parquet's order); the last cut-off is
    the whole dataset, so it is the Table-1 codeclm cell. Returns the points and the pairs per round."""
    rounds = pq.read_table(dataset / "train.parquet", columns=["round"]).column("round").to_pylist()
    lines = (dataset / "train.jsonl").read_text().splitlines(keepends=True)
    if len(lines) != len(rounds):
        raise ConfigError(f"{dataset}: train.jsonl has {len(lines)} lines for {len(rounds)} pairs")
    shares = round_shares(dataset)
    folder = root / "studies" / "rounds"
    points = []
    for k in shares:
        last = k == max(shares)
        path = folder / "datasets" / bench / f"rounds-le-{k}.jsonl"
        if not last:
            write_text(path, "".join(line for line, r in zip(lines, rounds, strict=True) if r <= k))
        points.append(Point(study="rounds", label=f"rounds <= {k}", method="codeclm", x=k,
                            dataset=str(dataset) if last else str(path),
                            model=str(root / "models" / bench / "codeclm") if last else
                            str(folder / "models" / bench / f"rounds-le-{k}"), same_as_table=last))
    return points, shares


class StudyRow(Record):
    """One point of a study on one benchmark: CRR of the target tuned on that point's data, with its bootstrap
    interval; `share` is the share of the full dataset's pairs kept in this round (rounds study), else NaN."""

    table: ClassVar[str] = "study"
    study: str
    benchmark: str
    label: str
    method: str
    x: float
    model: str
    pairs: int
    share: float
    questions: int
    failures: int
    wins: int
    ties: int
    losses: int
    crr: float
    ci_low: float
    ci_high: float


def study_rows(study: str, benchmark: str, results: Sequence[EvalQuestionResult], points: Sequence[Point],
               models: Mapping[str, str], pairs: Mapping[str, int], shares: Mapping[int, int] | None = None
               ) -> list[StudyRow]:
    """One row per point judged at least once (`models`: point label -> the tuned model's name in the verdicts;
    `pairs`: label -> training pairs)."""
    total = sum((shares or {}).values())
    rows = []
    for p in points:
        model = models[p.label]
        own = [r for r in results if r.benchmark == benchmark and r.target_model == model]
        outcomes = [r.outcome for r in own if r.outcome != "failed"]
        if not outcomes:
            continue
        low, high = bootstrap_ci(outcomes)
        wins, ties, losses = (outcomes.count(v) for v in ("win", "tie", "loss"))
        share = (shares or {}).get(int(p.x), 0) / total if study == "rounds" and total else math.nan
        rows.append(StudyRow(study=study, benchmark=benchmark, label=p.label, method=p.method, x=p.x, model=model,
                             pairs=pairs.get(p.label, 0), share=share, questions=len(outcomes),
                             failures=len(own) - len(outcomes), wins=wins, ties=ties, losses=losses,
                             crr=100.0 * (wins + ties) / len(outcomes), ci_low=low, ci_high=high))
    return rows


_W, _H, _L, _R, _T, _B = 640, 360, 60, 150, 40, 50
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def line_svg(study: str, rows: Sequence[StudyRow]) -> str:
    """CRR against the study's x (rounds, metadata %, budget on a log scale), one line per benchmark and method,
    each point with its 95 % interval."""
    log = study == "budget"
    xs = sorted({r.x for r in rows}) or [0.0, 1.0]

    def fx(v: float) -> float:
        lo, hi = (math.log(xs[0]), math.log(xs[-1])) if log else (xs[0], xs[-1])
        t = (math.log(v) if log else v) - lo
        return _L + (_W - _L - _R) * (t / (hi - lo) if hi > lo else 0.5)

    def fy(pct: float) -> float:
        return _T + (_H - _T - _B) * (1 - max(0.0, min(100.0, pct)) / 100)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
             'font-family="sans-serif" font-size="12">', f'<rect width="{_W}" height="{_H}" fill="white"/>',
             f'<text x="{_W / 2}" y="22" text-anchor="middle" font-size="14" font-weight="bold">'
             f'{escape(FIGURE[study] + ": " + TITLE[study])}</text>']
    for tick in range(0, 101, 20):
        parts.append(f'<line x1="{_L}" y1="{fy(tick)}" x2="{_W - _R}" y2="{fy(tick)}" stroke="#ddd"/>'
                     f'<text x="{_L - 6}" y="{fy(tick) + 4}" text-anchor="end" fill="#555">{tick}</text>')
    for v in xs:
        parts.append(f'<text x="{fx(v):.1f}" y="{_H - _B + 16}" text-anchor="middle" fill="#555">{v:g}</text>')
    parts.append(f'<text x="{(_L + _W - _R) / 2}" y="{_H - 12}" text-anchor="middle">{escape(X_AXIS[study])}</text>'
                 f'<text x="16" y="{(_T + _H - _B) / 2}" transform="rotate(-90 16 {(_T + _H - _B) / 2})" '
                 'text-anchor="middle">CRR % (95 % interval)</text>')
    lines = list(dict.fromkeys((r.benchmark, r.method) for r in rows))
    for i, key in enumerate(lines):
        color = _PALETTE[i % len(_PALETTE)]
        own = sorted((r for r in rows if (r.benchmark, r.method) == key), key=lambda r: r.x)
        path = " ".join(f"{'M' if j == 0 else 'L'}{fx(r.x):.1f},{fy(r.crr):.1f}" for j, r in enumerate(own))
        parts.append(f'<path d="{path}" stroke="{color}" stroke-width="2" fill="none"/>')
        for r in own:
            parts.append(f'<path d="M{fx(r.x):.1f},{fy(r.ci_low):.1f}V{fy(r.ci_high):.1f}" stroke="{color}"/>'
                         f'<circle cx="{fx(r.x):.1f}" cy="{fy(r.crr):.1f}" r="3.5" fill="{color}">'
                         f'<title>{escape(f"{r.label}: {r.crr:.1f}% (n={r.questions})")}</title></circle>')
        parts.append(f'<text x="{_W - _R + 8}" y="{_T + 16 * i + 4}" fill="{color}">'
                     f'{escape(" · ".join(key))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def study_markdown(study: str, rows: Sequence[StudyRow], settings: Settings, chart: str) -> str:
    """A study's report section: what was varied and held, the table, the chart."""
    how = {"rounds": "the codeclm dataset of Table 1, cut to the pairs kept at Self-Rubrics rounds <= k (round 1 "
                     "is the basic instruction); each cut trains its own model, so earlier cuts train on fewer "
                     "pairs (the paper trains on the data accumulated up to each iteration). `share`: that round's "
                     "share of the whole dataset (the paper: more than 70 % from round 1).",
           "metadata": f"CodecLM with a reproducible random share of its {settings.n_metadata} augmented metadata "
                       f"(setting `metadata_fraction`), the budget held at {settings.budget} pairs, so fewer "
                       "metadata get more basic instructions each (the paper: 20 % of the metadata means 5x more "
                       "instructions per metadata); the metadata are sampled after augmentation, as the paper "
                       "subsamples M.",
           "budget": f"{', '.join(settings.studies.budget_methods)} at each budget of "
                     f"{', '.join(map(str, settings.studies.budgets))} pairs (the paper: 500 to 8,000 on "
                     "Evol-Instruct), everything else as in Table 1."}[study]
    lines = [f"## {FIGURE[study]}: {TITLE[study]}", "", how, "",
             "| benchmark | point | pairs | share | W/T/L | CRR % [95 % interval] |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        share = "" if math.isnan(r.share) else f"{r.share:.0%}"
        lines.append(f"| {r.benchmark} | {r.label} | {r.pairs} | {share} | {r.wins}/{r.ties}/{r.losses} "
                     f"| {r.crr:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}] |")
    lines += ["", f"![{TITLE[study]}]({chart})", ""]
    return "\n".join(lines)


def write_study(folder: Path, study: str, rows: Sequence[StudyRow], markdown: str, svg: str,
                meta: Mapping[str, Any]) -> None:
    """OUT/studies/STUDY: table.parquet, chart.svg, report.md and study.json, each replaced whole."""
    write_records(folder / "table.parquet", rows, StudyRow)
    write_text(folder / "chart.svg", svg)
    write_text(folder / "report.md", markdown)
    write_json(folder / "study.json", {**meta, "rows": [r.model_dump() for r in rows]})


# Table 6: the same answers judged by more than one judge


class JudgeRow(Record):
    """One method on one benchmark under one judge: CRR and its gap to Self-Instruct (percentage points, NaN
    when Self-Instruct is not compared)."""

    table: ClassVar[str] = "judges"
    benchmark: str
    method: str
    judge: str
    questions: int
    crr: float
    gap: float


def judge_rows(judge: str, rows: Sequence[ProtocolRow]) -> list[JudgeRow]:
    """Table-1 rows (one judge's verdicts, `codeclm.eval.protocol.table_rows`) as Table 6 rows."""
    return [JudgeRow(benchmark=r.benchmark, method=r.method, judge=judge, questions=r.questions, crr=r.crr,
                     gap=0.0 if r.method == REFERENCE else r.delta) for r in rows]


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a of two scorings of the same items (1: the same order; pairs tied in either count 0)."""
    n = len(a)
    if n < 2:
        return math.nan
    score = sum((1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0)
                for i in range(n) for j in range(i + 1, n))
    return score / (n * (n - 1) / 2)


def judges_agreement(rows: Sequence[JudgeRow]) -> list[dict[str, Any]]:
    """Per benchmark and pair of judges: whether they rank the tuned methods the same by CRR (the untuned base
    left out), and Kendall's tau between their CRRs."""
    out = []
    for bench in dict.fromkeys(r.benchmark for r in rows):
        own = [r for r in rows if r.benchmark == bench and r.method != BASE_ROW]
        judges = list(dict.fromkeys(r.judge for r in own))
        crr = {(r.judge, r.method): r.crr for r in own}
        for i, first in enumerate(judges):
            for other in judges[i + 1:]:
                methods = [m for m in dict.fromkeys(r.method for r in own) if (first, m) in crr and (other, m) in crr]
                a, b = [crr[first, m] for m in methods], [crr[other, m] for m in methods]
                tau = kendall_tau(a, b)
                out.append({"benchmark": bench, "judges": [first, other], "methods": methods, "kendall_tau": tau,
                            "same_ranking": all((a[x] - a[y]) * (b[x] - b[y]) > 0 or (a[x] == a[y] and b[x] == b[y])
                                                for x in range(len(a)) for y in range(x + 1, len(a))),
                            "ranking": {first: _ranking(methods, a), other: _ranking(methods, b)}})
    return out


def _ranking(methods: Sequence[str], crr: Sequence[float]) -> str:
    return " > ".join(m for _, m in sorted(zip(crr, methods, strict=True), key=lambda t: -t[0]))


def judges_markdown(rows: Sequence[JudgeRow], agreement: Sequence[Mapping[str, Any]]) -> str:
    """Table 6 as the paper lays it out: methods down, judges across per benchmark, each cell the CRR gap to
    Self-Instruct (CRR in brackets), then whether the judges rank the methods alike."""
    lines = ["## Table 6: the same answers under each judge", "",
             "Every tuned target's answers (the same answers: only the judgements differ) judged by each judge in "
             "both orders. Each cell: the CRR gap to Self-Instruct in points (the CRR in brackets); the paper's "
             "point is that the gaps, not the absolute CRRs, keep their order under another judge.", ""]
    for bench in dict.fromkeys(r.benchmark for r in rows):
        own = [r for r in rows if r.benchmark == bench]
        judges = list(dict.fromkeys(r.judge for r in own))
        at = {(r.method, r.judge): r for r in own}
        lines += [f"**{bench}**", "", "| method | " + " | ".join(f"`{j}`" for j in judges) + " |",
                  "|---|" + "---:|" * len(judges)]
        for m in dict.fromkeys(r.method for r in own):
            cells = []
            for j in judges:
                r = at.get((m, j))
                gap = "–" if r is None else "n/a" if math.isnan(r.gap) else f"{r.gap:+.2f}"
                cells.append(gap if r is None else f"{gap} ({r.crr:.1f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for a in agreement:
            if a["benchmark"] == bench:
                first, other = a["judges"]
                verdict = "the same ranking" if a["same_ranking"] else "different rankings"
                lines += ["", f"`{first}` and `{other}` give {verdict} (Kendall's tau {a['kendall_tau']:+.2f}): "
                          f"{a['ranking'][first]} vs {a['ranking'][other]}."]
        lines.append("")
    return "\n".join(lines)


# The dry run's plan


def studies_plan(studies: Sequence[str], judges: Sequence[str], settings: Settings, methods: Sequence[str],
                 seeds: int, questions: int) -> list[dict[str, Any]]:
    """Per study point on one benchmark: the generation calls (from `plan_calls` at that point's settings),
    trainings and evaluation calls it adds to the Table-1 run; a point equal to a Table-1 cell adds nothing
    when that method is compared, since its dataset, model and verdicts are the cell's."""
    rows: list[dict[str, Any]] = []

    def add(study: str, label: str, method: str, update: Mapping[str, Any], same: bool) -> None:
        if same and method in methods:
            rows.append({"study": study, "point": label, "generation_calls_low": 0, "generation_calls_high": 0,
                         "trainings": 0, "eval_calls": 0, "note": f"Table 1's {method} cell"})
            return
        cost = plan_calls(settings.model_copy(update=dict(update)), [method], seeds, questions)[0]
        rows.append({"study": study, "point": label, "generation_calls_low": cost["generation_calls_low"],
                     "generation_calls_high": cost["generation_calls_high"], "trainings": 1,
                     "eval_calls": cost["eval_calls"], "note": cost["note"]})

    for study in studies:
        if study == "rounds":
            if "codeclm" not in methods:
                add(study, "codeclm dataset", "codeclm", {}, False)
            k = settings.max_rounds
            for r in range(1, k):
                rows.append({"study": study, "point": f"rounds <= {r}", "generation_calls_low": 0,
                             "generation_calls_high": 0, "trainings": 1, "eval_calls": 3 * questions,
                             "note": "a cut of the codeclm dataset: no generation; made only if round "
                                     f"{r + 1}..{k} kept pairs"})
            rows.append({"study": study, "point": f"rounds <= {k}", "generation_calls_low": 0,
                         "generation_calls_high": 0, "trainings": 0, "eval_calls": 0,
                         "note": "the whole codeclm dataset: Table 1's cell"})
        elif study == "metadata":
            for f in settings.studies.metadata_fractions:
                add(study, f"{100 * f:g} % metadata", "codeclm", {"n_metadata": max(1, round(f * settings.n_metadata))},
                    f >= 1)
                if f < 1:
                    rows[-1]["note"] += "; encode and rubric calls repeat Table 1's (cached)"
        else:
            for method in settings.studies.budget_methods:
                for b in settings.studies.budgets:
                    add(study, f"{method} · {b}", method, {"budget": b}, b == settings.budget)
    for judge in judges:
        rows.append({"study": "judges", "point": f"judge {judge}", "generation_calls_low": 0,
                     "generation_calls_high": 0, "trainings": 0, "eval_calls": 2 * questions * (len(methods) + 1),
                     "note": "judgements only, both orders, base and every method: the answers are Table 1's "
                             "(cached)"})
    return rows


def studies_plan_markdown(plan: Mapping[str, list[dict[str, Any]]]) -> str:
    """The dry run's printout of the studies: per benchmark and point, what each adds to the Table-1 plan."""
    if not any(plan.values()):
        return ""
    lines = ["Studies (Table 6, Figs. 3-5): calls and trainings they add to the Table-1 plan above.", ""]
    low = high = trainings = 0
    for bench, rows in plan.items():
        lines += [f"{bench}:", "| study | point | generation calls | evaluation calls | trainings | how |",
                  "|---|---|---:|---:|---:|---|"]
        for r in rows:
            span = str(r["generation_calls_low"]) if r["generation_calls_low"] == r["generation_calls_high"] \
                else f"{r['generation_calls_low']}-{r['generation_calls_high']}"
            lines.append(f"| {r['study']} | {r['point']} | {span} | {r['eval_calls']} | {r['trainings']} "
                         f"| {r['note']} |")
            low += r["generation_calls_low"] + r["eval_calls"]
            high += r["generation_calls_high"] + r["eval_calls"]
            trainings += r["trainings"]
        lines.append("")
    lines.append(f"Studies total: {low}-{high} LLM calls and at most {trainings} trainings more.")
    return "\n".join(lines)
