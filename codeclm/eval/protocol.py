"""The paper's experiment (§5, Table 1) without Prefect: the recorded seed split of each benchmark, the methods
compared, the Table-1 rows (CRR with its interval, and the paired difference to Self-Instruct), the report and
the call plan a `--dry-run` prints.

Every method gets the same seeds (the benchmark's 20 %), the same budget, the same training and the same
questions, so a row differs from another only by its data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

from codeclm.baseline_records import ABLATIONS
from codeclm.baseline_records import METHODS as BASELINES
from codeclm.benchmarks import BenchmarkQuestion
from codeclm.errors import ConfigError
from codeclm.eval.crr import bootstrap_ci, paired_difference
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.records import Record
from codeclm.settings import DECODE_MAX_PER_CALL, Settings
from codeclm.storage import write_json, write_jsonl

METHODS: tuple[str, ...] = ("codeclm", *BASELINES, *ABLATIONS)
REFERENCE = "self_instruct"  # Table 1's differences are to Self-Instruct
BASE_ROW = "base (untuned)"
EvalOn = Literal["whole", "heldout"]
SPLIT_FILE, SEEDS_FILE = "split.json", "seeds.jsonl"


class Split(BaseModel):
    """A benchmark's recorded seed split: which questions seed the data (the paper's 20 %), which are held out."""

    benchmark: str
    source: str
    seed: int
    seed_fraction: float
    questions: int
    seed_ids: list[str]
    heldout_ids: list[str]


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods to compare, in the given order, without repeats; an unknown name is one clear line."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def split_questions(questions: Sequence[BenchmarkQuestion], source: str, seed: int, fraction: float) -> Split:
    """A reproducible sample of round(fraction x n) questions (at least one, at most n - 1) as seeds."""
    if not 0 < fraction < 1:
        raise ConfigError(f"seed fraction must be between 0 and 1, got {fraction}")
    if len(questions) < 2:
        raise ConfigError(f"{source}: {len(questions)} question(s); a seed split needs at least 2")
    k = min(len(questions) - 1, max(1, round(fraction * len(questions))))
    chosen = set(random.Random(f"{seed}:{questions[0].benchmark}").sample(range(len(questions)), k))
    return Split(benchmark=questions[0].benchmark, source=source, seed=seed, seed_fraction=fraction,
                 questions=len(questions), seed_ids=[q.question_id for i, q in enumerate(questions) if i in chosen],
                 heldout_ids=[q.question_id for i, q in enumerate(questions) if i not in chosen])


def record_split(folder: Path, questions: Sequence[BenchmarkQuestion], split: Split) -> Path:
    """Write (or confirm) FOLDER/split.json and the seed file; a different split already recorded there is refused,
    since every dataset and model under the run was made from it. Returns the seed file."""
    recorded = folder / SPLIT_FILE
    if recorded.is_file():
        before = Split.model_validate_json(recorded.read_text())
        if before != split:
            raise ConfigError(f"{recorded}: a different split is recorded there (seed {before.seed}, fraction "
                              f"{before.seed_fraction}, {before.questions} questions); use a new --out")
    by_id = {q.question_id: q for q in questions}
    seeds = write_jsonl(folder / SEEDS_FILE, [{"seed_id": i, "instruction": by_id[i].prompt} for i in split.seed_ids])
    if not recorded.is_file():
        write_json(recorded, split.model_dump())
    return seeds


def heldout_file(folder: Path, questions: Sequence[BenchmarkQuestion], split: Split) -> Path:
    """The held-out questions as a benchmark file named like the benchmark, so reports keep its name."""
    keep = set(split.heldout_ids)
    return write_jsonl(folder / "heldout" / f"{split.benchmark}.jsonl",
                       [{"question_id": q.question_id, "prompt": q.prompt, "category": q.category}
                        for q in questions if q.question_id in keep])


class ProtocolRow(Record):
    """One cell of the Table-1-style report: a method's tuned target on one benchmark, CRR with its bootstrap
    interval, and the paired difference to Self-Instruct's (NaN when Self-Instruct is not compared)."""

    table: ClassVar[str] = "protocol"
    benchmark: str
    method: str
    model: str
    pairs: int
    shortfall: int
    questions: int
    failures: int
    crr: float
    ci_low: float
    ci_high: float
    delta: float
    delta_low: float
    delta_high: float

    # what the shared CRR chart (codeclm.eval.eval_report.chart_svg) reads
    @property
    def target(self) -> str:
        return self.method

    @property
    def total(self) -> int:
        return self.questions


def table_rows(benchmark: str, results: Sequence[EvalQuestionResult], models: Mapping[str, str],
               datasets: Mapping[str, tuple[int, int]]) -> list[ProtocolRow]:
    """One row per method (`models`: method -> the tuned model's name in the verdicts; `datasets`: method ->
    (pairs, shortfall)); the difference to Self-Instruct is paired over the questions both had judged."""
    verdicts: dict[str, dict[str, str]] = {}
    failures: dict[str, int] = {}
    for r in results:
        if r.benchmark != benchmark:
            continue
        if r.outcome == "failed":
            failures[r.target_model] = failures.get(r.target_model, 0) + 1
        else:
            verdicts.setdefault(r.target_model, {})[r.question_id] = r.outcome
    reference = verdicts.get(models.get(REFERENCE, ""), {})
    rows = []
    for method, model in models.items():
        own = verdicts.get(model, {})
        if not own:
            continue
        outcomes = list(own.values())
        low, high = bootstrap_ci(outcomes)
        delta = d_low = d_high = math.nan
        both = [q for q in own if q in reference]
        if REFERENCE in models and method != REFERENCE and both:
            paired = paired_difference([reference[q] for q in both], [own[q] for q in both])
            delta, d_low, d_high = paired.delta, paired.ci_low, paired.ci_high
        pairs, shortfall = datasets.get(method, (0, 0))
        rows.append(ProtocolRow(benchmark=benchmark, method=method, model=model, pairs=pairs, shortfall=shortfall,
                                questions=len(outcomes), failures=failures.get(model, 0),
                                crr=100.0 * sum(o != "loss" for o in outcomes) / len(outcomes), ci_low=low,
                                ci_high=high, delta=delta, delta_low=d_low, delta_high=d_high))
    return rows


def _cell(row: ProtocolRow | None) -> str:
    if row is None:
        return "–"
    text = f"{row.crr:.1f} [{row.ci_low:.1f}, {row.ci_high:.1f}]"
    if not math.isnan(row.delta):
        text += f"<br>{row.delta:+.1f} [{row.delta_low:+.1f}, {row.delta_high:+.1f}]"
    return text + (f" ⚠ {row.shortfall} short" if row.shortfall else "")


def report_markdown(rows: Sequence[ProtocolRow], meta: Mapping[str, Any], chart: str) -> str:
    """Table 1 as the paper lays it out: methods down, benchmarks across; each cell CRR % [95 % interval] and,
    below, the paired difference to Self-Instruct in points [95 % paired interval]."""
    benchmarks = list(dict.fromkeys(r.benchmark for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    at = {(r.method, r.benchmark): r for r in rows}
    eval_on = ("the **whole** benchmark (as the paper reports; the seed questions are among them)"
               if meta["eval_on"] == "whole" else "the **held-out** 80 % (the seed questions are left out)")
    lines = ["# CodecLM protocol: Table 1", "",
             f"Every method made {meta['budget']} pairs from the same seeds (a recorded {meta['seed_fraction']:.0%} "
             f"split of each benchmark, `splits/`), the target `{meta['base_model']}` was tuned on each dataset "
             f"({meta['trainer']} trainer), and each tuned model was judged against the strong model "
             f"`{meta['strong']}` by `{meta['judge']}` on {eval_on}"
             + (f", first {meta['limit']} questions" if meta.get("limit") else "") + ".", "",
             "Each cell: CRR % [95 % bootstrap interval]; below it, the difference to Self-Instruct in percentage "
             "points [95 % paired bootstrap interval over the same questions]. An interval that contains 0 is no "
             "evidence either way.", "",
             "| method | " + " | ".join(benchmarks) + " |", "|---|" + "---:|" * len(benchmarks)]
    lines += [f"| {m} | " + " | ".join(_cell(at.get((m, b))) for b in benchmarks) + " |" for m in methods]
    short = [r for r in rows if r.shortfall]
    if short:
        lines += ["", "**Shortfall:** " + "; ".join(f"{r.method} on {r.benchmark} published {r.pairs} of "
                                                     f"{r.pairs + r.shortfall} pairs" for r in short)
                  + " (see each dataset's manifest for the limit reached)."]
    lines += ["", f"![CRR per method and benchmark]({chart})", "",
              "Files: `table.parquet` (these rows), `datasets/BENCH/METHOD`, `models/BENCH/METHOD`, `eval/BENCH` "
              "(every verdict), `splits/BENCH/split.json`.", ""]
    return "\n".join(lines)


def write_table(root: Path, rows: Sequence[ProtocolRow], meta: dict[str, Any], svg: str, markdown: str) -> None:
    """table.parquet, protocol.json, the chart and report.md (each file replaced whole, like `run`'s report; the
    datasets, models and evaluations under OUT are each published by their own step)."""
    from codeclm.storage import write_records, write_text

    write_records(root / "table.parquet", rows, ProtocolRow)
    write_json(root / "protocol.json", {**meta, "rows": [r.model_dump() for r in rows]})
    write_text(root / "crr.svg", svg)
    write_text(root / "report.md", markdown)


def plan_calls(settings: Settings, methods: Sequence[str], seeds: int, questions: int) -> list[dict[str, Any]]:
    """LLM calls per method on one benchmark, from the settings (B = budget): what each step asks for when every
    call succeeds and every top-up is unneeded; `upper` where filtering makes the count depend on the models.
    Evaluation: each tuned target answers every question and is judged twice; the strong model answers once."""
    b, cfg = settings.budget, settings.baselines
    encode = seeds

    def front(budget: int, oversample: float) -> tuple[int, int]:
        """Encode, rubrics and decode calls, and the basic instructions they make."""
        front_settings = settings.model_copy(update={"budget": budget, "oversample": oversample})
        n_meta = front_settings.metadata_to_decode(settings.n_metadata)
        per = front_settings.per_metadata(n_meta)
        return encode + n_meta + n_meta * math.ceil(per / DECODE_MAX_PER_CALL), n_meta * per

    rows = []
    for method in methods:
        if method == "codeclm":
            fixed, basic = front(b, settings.oversample)
            k = settings.max_rounds
            low, high = fixed + 4 * basic, fixed + basic * (4 + 5 * (k - 1))
            note = (f"{basic} basic instructions x (2 answers + 2 scores) per round, + 1 improve from round 2; "
                    f"{k} rounds at most")
        elif method in ABLATIONS:
            rounds = ABLATIONS[method].get("max_rounds", settings.max_rounds)
            fixed, basic = front(b, ABLATIONS[method]["oversample"])
            low = high = fixed + basic * rounds
            note = f"{basic} basic instructions x ({rounds - 1} improve + 1 strong answer); rubrics made, unused" \
                if rounds > 1 else f"{basic} basic instructions x 1 strong answer"
        elif method == "self_instruct":
            gen = math.ceil(b / cfg.new_per_call)
            low, high = gen + b, min(cfg.max_generation_calls, 3 * gen) + b
            note = f">= {gen} generation calls ({cfg.new_per_call} new each, ROUGE-L drops some) + {b} answers"
        elif method == "alpagasus":
            gen = math.ceil(b * cfg.alpagasus_oversample / cfg.new_per_call)
            pool, most = math.ceil(b * cfg.alpagasus_oversample), math.ceil(b * cfg.alpagasus_max_oversample)
            low = gen + 2 * pool
            high = math.ceil(most / cfg.new_per_call) * 3 + 2 * most
            note = f"{pool} to {most} Self-Instruct pairs, each answered and rated; keeps >= {cfg.alpagasus_threshold}"
        else:  # evol_instruct, wizardlm_plus
            evolved = math.ceil(b * cfg.evol_oversample)
            low = high = evolved + b
            note = f"{evolved} evolutions + {b} answers"
            if method == "wizardlm_plus":
                fixed, _ = front(math.ceil(evolved / cfg.evol_rounds), 1.0)
                low, high = low + fixed, high + fixed
                note += f" + encode/decode of {math.ceil(evolved / cfg.evol_rounds)} basic instructions"
        rows.append({"method": method, "generation_calls_low": low, "generation_calls_high": high,
                     "training_runs": 1, "eval_calls": 3 * questions, "note": note})
    return rows


def plan_markdown(plan: Mapping[str, list[dict[str, Any]]], settings: Settings, questions: Mapping[str, int]) -> str:
    """The dry run's printout: per benchmark and method, the calls the protocol would make."""
    lines = [f"Protocol plan at budget {settings.budget} (preset {settings.preset}); calls if every call succeeds; "
             "top-up passes and retries add to them.", ""]
    total_low = total_high = 0
    for bench, rows in plan.items():
        lines += [f"{bench}: {questions[bench]} evaluation questions; strong answers {questions[bench]} once",
                  "| method | generation calls | evaluation calls | trainings | how |", "|---|---:|---:|---:|---|"]
        for r in rows:
            span = str(r["generation_calls_low"]) if r["generation_calls_low"] == r["generation_calls_high"] \
                else f"{r['generation_calls_low']}-{r['generation_calls_high']}"
            lines.append(f"| {r['method']} | {span} | {r['eval_calls']} | 1 | {r['note']} |")
            total_low += r["generation_calls_low"] + r["eval_calls"]
            total_high += r["generation_calls_high"] + r["eval_calls"]
        total_low += questions[bench] * 4  # the strong answers and the untuned base's answers and judgements
        total_high += questions[bench] * 4
        lines.append("")
    lines.append(f"Total: {total_low}-{total_high} LLM calls and "
                 f"{sum(len(r) for r in plan.values())} trainings.")
    return "\n".join(lines)



class BenchmarkPlan(BaseModel):
    """One benchmark of a protocol run: its split, where its seeds are, and what `evaluate` is given."""

    label: str
    split: Split
    seeds: str
    eval_spec: str
    eval_questions: int


def plan_protocol(benchmarks: Sequence[str], root: Path, settings: Settings, eval_on: EvalOn, limit: int | None,
                  seed_fraction: float, write: bool = True) -> list[BenchmarkPlan]:
    """Load every benchmark, split it (recorded under ROOT/splits/BENCH when `write`) and check the evaluation
    request, all before any model starts; bad input is one line (a CodecError)."""
    from codeclm.benchmarks import load_benchmark
    from codeclm.eval.evaluation import plan_evaluation

    if eval_on not in ("whole", "heldout"):
        raise ConfigError(f"--eval-on {eval_on!r}: use whole or heldout")
    plans = []
    for spec in benchmarks:
        questions = load_benchmark(spec, cache_dir=settings.home / "benchmarks")
        split = split_questions(questions, spec, settings.seed, seed_fraction)
        if any(p.label == split.benchmark for p in plans):
            raise ConfigError(f"two benchmarks are named {split.benchmark!r} ({spec}); rename one of the files")
        folder = root / "splits" / split.benchmark
        seeds, eval_spec = folder / SEEDS_FILE, spec
        if write:
            seeds = record_split(folder, questions, split)
            if eval_on == "heldout":
                eval_spec = str(heldout_file(folder, questions, split))
        n_eval = len(split.heldout_ids) if eval_on == "heldout" else len(questions)
        if limit is not None and limit > n_eval:
            raise ConfigError(f"--limit {limit} is more than the {n_eval} {eval_on} questions of {split.benchmark}")
        if write:
            plan_evaluation([eval_spec], settings, limit=limit)
        plans.append(BenchmarkPlan(label=split.benchmark, split=split, seeds=str(seeds), eval_spec=eval_spec,
                                   eval_questions=min(n_eval, limit or n_eval)))
    return plans
