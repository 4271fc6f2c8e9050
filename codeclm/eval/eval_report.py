"""The CRR report: a bar chart with confidence intervals (SVG), a markdown report, and the output folder,
written aside, validated by re-reading, then published in one atomic flip so `out` is never half-written."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape

import pyarrow.parquet as pq

from codeclm.errors import DatasetError
from codeclm.eval.eval_records import EvalQuestionResult, EvalSummary
from codeclm.publish import publishing
from codeclm.records import FailedCall, Record
from codeclm.storage import check_schema, write_json, write_records

CHART_FILE = "crr.svg"
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
_LABEL_W, _PLOT_W, _ROW_H, _TOP, _BOTTOM = 300, 400, 30, 48, 46
_FAILURES_LISTED = 10


class Bar(Protocol):
    """What one bar of the chart reads: an evaluation's summary, or a row of the protocol's Table 1."""

    @property
    def benchmark(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def crr(self) -> float: ...
    @property
    def ci_low(self) -> float: ...
    @property
    def ci_high(self) -> float: ...
    @property
    def total(self) -> int: ...
    @property
    def failures(self) -> int: ...


def chart_svg(summaries: Sequence[Bar]) -> str:
    """Horizontal bars of CRR per benchmark and target, each with its 95% bootstrap interval as an error bar."""
    width = _LABEL_W + _PLOT_W + 170
    height = _TOP + _ROW_H * len(summaries) + _BOTTOM

    def x(pct: float) -> float:
        return _LABEL_W + _PLOT_W * max(0.0, min(100.0, pct)) / 100

    colors = {t: _PALETTE[i % len(_PALETTE)] for i, t in enumerate(dict.fromkeys(s.target for s in summaries))}
    bottom = _TOP + _ROW_H * len(summaries)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
             'Capacity Recovery Ratio against the strong model</text>']
    for tick in range(0, 101, 20):
        parts.append(f'<line x1="{x(tick)}" y1="{_TOP - 6}" x2="{x(tick)}" y2="{bottom}" stroke="#ddd"/>'
                     f'<text x="{x(tick)}" y="{bottom + 16}" text-anchor="middle" fill="#555">{tick}</text>')
    parts.append(f'<text x="{x(50)}" y="{bottom + 36}" text-anchor="middle" fill="#333">'
                 'CRR % = (wins + ties) / judged, with 95% bootstrap interval</text>')
    for row, s in enumerate(summaries):
        top = _TOP + row * _ROW_H
        mid = top + _ROW_H / 2
        parts.append(f'<text x="{_LABEL_W - 8}" y="{mid + 4}" text-anchor="end">'
                     f'{escape(_short(s.benchmark + " · " + s.target, 44))}</text>')
        parts.append(f'<rect x="{_LABEL_W}" y="{mid - 8}" width="{x(s.crr) - _LABEL_W:.1f}" height="16" '
                     f'fill="{colors[s.target]}"><title>{escape(f"{s.benchmark} · {s.target}: {s.crr:.1f}%")}'
                     '</title></rect>')
        low, high = x(s.ci_low), x(s.ci_high)
        parts.append(f'<path d="M{low:.1f},{mid - 6}v12M{low:.1f},{mid}H{high:.1f}M{high:.1f},{mid - 6}v12" '
                     'stroke="#222" stroke-width="1.5" fill="none"/>')
        note = f"{s.crr:.1f}% (n={s.total}" + (f", {s.failures} failed" if s.failures else "") + ")"
        parts.append(f'<text x="{x(100) + 6}" y="{mid + 4}" fill="#222">{escape(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def data_uri(svg: str) -> str:
    """The chart inline, for a Prefect markdown artifact that cannot reference a file."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def report_markdown(summaries: Sequence[EvalSummary], rows: Sequence[EvalQuestionResult], meta: dict[str, Any],
                    image: str) -> str:
    """The report a person reads: who was compared, the chart, the leaderboard, warnings and failures."""
    lines = ["# CRR evaluation", "",
             f"Targets against the strong model `{meta['strong']}`, judged by `{meta['judge']}` "
             f"(rule `{meta['rule']}`; each question judged twice with the answer order swapped).", ""]
    lines += [f"> **Warning:** {w}" for w in meta["warnings"]] + ([""] if meta["warnings"] else [])
    lines += [f"![CRR per benchmark and target with 95% bootstrap intervals]({image})", "",
              "| benchmark | target | wins | ties | losses | failed | judged | CRR % | 95% CI | flip rate "
              "| mean length target / strong |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    lines += [f"| {s.benchmark} | `{s.target}` | {s.wins} | {s.ties} | {s.losses} | {s.failures} | {s.total} "
              f"| {s.crr:.2f} | {s.ci_low:.1f}–{s.ci_high:.1f} | {s.flip_rate:.1%} "
              f"| {s.mean_target_length:.0f} / {s.mean_strong_length:.0f} |" for s in summaries]
    lines += ["", "**Reading it.** A win needs the target to score higher in both orders under the `codeclm` rule "
              "(one win and one draw is enough under `alpagasus`); a loss is the strong model doing the same; "
              "anything else is a tie. CRR = (wins + ties) / judged questions. The interval is a 95% percentile "
              "bootstrap over questions: gaps between runs inside it are noise. The flip rate is the share of "
              "questions whose winner changed when the answer order was swapped (judge position bias). Lengths "
              "are in characters; a judge that prefers the longer answer shows up there.", ""]
    failed = [r for r in rows if r.outcome == "failed"]
    lines += ["## Failures", ""]
    if not failed:
        return "\n".join([*lines, "Every question was judged.", ""])
    lines += [f"{len(failed)} question{'s' if len(failed) > 1 else ''} could not be judged: left out of CRR, listed in "
              "`questions.parquet` (outcome `failed`).", ""]
    lines += [f"- {r.benchmark} / {r.question_id} / `{r.target_model}`: {r.failure}" for r in failed[:_FAILURES_LISTED]]
    if len(failed) > _FAILURES_LISTED:
        lines.append(f"- … and {len(failed) - _FAILURES_LISTED} more")
    return "\n".join([*lines, ""])


def write_report(out: Path, rows: Sequence[EvalQuestionResult], summaries: Sequence[EvalSummary],
                 failed_calls: Sequence[FailedCall], meta: dict[str, Any]) -> dict[str, str]:
    """Write everything aside, validate it, then publish it as `out` (codeclm.publish); returns the markdown
    and the chart for the Prefect artifacts."""
    svg = chart_svg(summaries)
    tables: dict[str, tuple[Sequence[Record], type[Record]]] = {
        "questions.parquet": (rows, EvalQuestionResult), "summary.parquet": (summaries, EvalSummary),
        "failed_calls.parquet": (failed_calls, FailedCall)}
    with publishing(out) as staging:
        for name, (records, model) in tables.items():
            write_records(staging / name, records, model)
        write_json(staging / "summary.json", {**meta, "results": [s.model_dump() for s in summaries]})
        (staging / CHART_FILE).write_text(svg)
        (staging / "report.md").write_text(report_markdown(summaries, rows, meta, CHART_FILE))
        _validate(staging, tables, len(summaries))
    return {"markdown": report_markdown(summaries, rows, meta, data_uri(svg)), "svg": svg}


def _validate(staging: Path, tables: dict[str, tuple[Sequence[Record], type[Record]]], n_summaries: int) -> None:
    """Re-read what was written: schemas, row counts, the JSON and the chart must all load."""
    for name, (records, model) in tables.items():
        table = pq.read_table(staging / name)
        check_schema(staging / name, table.schema, model)
        if table.num_rows != len(records):
            raise DatasetError(f"{staging / name}: {table.num_rows} rows written, {len(records)} expected; "
                               "nothing was published")
    if len(json.loads((staging / "summary.json").read_text())["results"]) != n_summaries:
        raise DatasetError(f"{staging}/summary.json does not hold every result; nothing was published")
    ET.fromstring((staging / CHART_FILE).read_text())
