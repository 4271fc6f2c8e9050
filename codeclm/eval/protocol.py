"""The paper's experiment (§5, Table 1) without Prefect: the recorded seed split of each benchmark, each
method's seed source (the benchmark's 20 % or an Alpaca sample, paper A.2), the leak guard's evaluation
questions, what each method is built, rated, judged and trained with (`statements`), the Table-1 rows (CRR with
its interval, wins/ties/losses, and the paired difference to Self-Instruct), the report and the call plan a
`--dry-run` prints.

Every method gets the same budget, the same training and the same questions; under `--preset paper` each method
starts from the seeds the paper gave it (`[protocol] seed_sources`), so a row differs by its data and its recipe.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

from codeclm import baseline_records
from codeclm.baseline_records import ABLATIONS
from codeclm.baseline_records import METHODS as BASELINES
from codeclm.benchmarks import BenchmarkQuestion
from codeclm.errors import ConfigError
from codeclm.eval.crr import bootstrap_ci, paired_difference
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.eval.judge_check import JudgeCheck
from codeclm.llm.prompts import load_prompt
from codeclm.records import Record
from codeclm.settings import DECODE_MAX_PER_CALL, EMBEDDED, Settings
from codeclm.storage import write_json, write_jsonl
from codeclm.train.finetune import describe_recipe

METHODS: tuple[str, ...] = ("codeclm", *BASELINES, *ABLATIONS)
REFERENCE = "self_instruct"  # Table 1's differences are to Self-Instruct
BASE_ROW = "base (untuned)"
EvalOn = Literal["whole", "heldout"]
SPLIT_FILE, SEEDS_FILE = "split.json", "seeds.jsonl"
# Methods that rewrite their seeds: seeded from the benchmark and evaluated on all of it, they would train on
# light rewrites of test questions, which pass any similarity filter (issue 18, item 2).
REWRITERS = ("evol_instruct", "tree_instruct")
ALPACA_DIR = "alpaca"


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


class AlpacaSample(BaseModel):
    """A recorded Alpaca seed sample: which rows (1-based ids) seed the methods that start from Alpaca."""

    source: str
    seed: int
    size: int
    available: int
    ids: list[str]


def alpaca_sample(questions: Sequence[BenchmarkQuestion], source: str, seed: int, size: int) -> AlpacaSample:
    """A reproducible uniform sample of `size` Alpaca instructions (seeded by the run's `seed`)."""
    if size > len(questions):
        raise ConfigError(f"{source}: {len(questions)} Alpaca instructions, fewer than the {size} seeds asked for")
    chosen = sorted(random.Random(f"{seed}:alpaca").sample(range(len(questions)), size))
    return AlpacaSample(source=source, seed=seed, size=size, available=len(questions),
                        ids=[questions[i].question_id for i in chosen])


def record_alpaca(root: Path, questions: Sequence[BenchmarkQuestion], sample: AlpacaSample) -> Path:
    """OUT/splits/alpaca/sample-N.json and its seed file; a different sample already recorded is refused."""
    folder = root / "splits" / ALPACA_DIR
    recorded = folder / f"sample-{sample.size}.json"
    if recorded.is_file() and AlpacaSample.model_validate_json(recorded.read_text()) != sample:
        raise ConfigError(f"{recorded}: a different Alpaca sample is recorded there; use a new --out")
    by_id = {q.question_id: q for q in questions}
    seeds = write_jsonl(folder / f"seeds-{sample.size}.jsonl",
                        [{"seed_id": f"alpaca-{i}", "instruction": by_id[i].prompt} for i in sample.ids])
    if not recorded.is_file():
        write_json(recorded, sample.model_dump())
    return seeds


def seeds_for(method: str, settings: Settings) -> int:
    """Alpaca seeds a method needs: its recipe's number (`baseline_records.seeds_needed`, when the recipe
    states one), else `[protocol] alpaca_seeds` (Self-Instruct's 175)."""
    count = baseline_records.seeds_needed(method, settings)
    return count if count else settings.protocol.alpaca_seeds


def seed_source(method: str, settings: Settings) -> str:
    """'benchmark' or 'alpaca' for a method that seeds; WizardLM+ takes CodecLM's basic instructions."""
    return settings.protocol.source(method)


def check_leak_risk(methods: Sequence[str], settings: Settings, eval_on: str) -> None:
    """Refuse, before any call, a method that rewrites benchmark seeds while the whole benchmark is evaluated."""
    risky = [m for m in methods if m in REWRITERS and seed_source(m, settings) == "benchmark"]
    if risky and eval_on == "whole":
        raise ConfigError(f"{', '.join(risky)} would rewrite the benchmark's seed questions and be evaluated on "
                          "the whole benchmark (light rewrites of test questions pass any similarity filter); use "
                          "--eval-on heldout, or seed it from Alpaca ([protocol] seed_sources, as --preset paper "
                          "does)")


def same_model(target: str, base: str) -> bool:
    """Whether the filtering target and the tuned base name one model (a provider prefix aside)."""
    if target == base:
        return True
    return target.endswith("/" + base) or base.endswith("/" + target) if EMBEDDED not in (target, base) else False


def filtering_warning(settings: Settings, methods: Sequence[str]) -> str | None:
    """Paper A.3: for LLaMA, Contrastive Filtering's target answers with the instruction-tuned counterpart
    (Alpaca-7B), not the raw base it tunes; warn when they are the same untuned base."""
    if "codeclm" not in methods or not same_model(settings.target.model, settings.finetune.base_model):
        return None
    return (f"the model answering in Contrastive Filtering ([target] {settings.target.model}) is the untuned base "
            f"that is tuned ([finetune] base_model {settings.finetune.base_model}); the paper answers with its "
            "instruction-tuned counterpart (Alpaca-7B for LLaMA-7B, A.3): set [target] to one")


def judge_mode(settings: Settings) -> str:
    """How the final judge answers: 'text' under a template without a JSON form (Fig. 12), else its
    `output_mode` (auto: JSON where the model supports it)."""
    template = load_prompt(settings.judge_template)
    return settings.judge.output_mode if "format:json" in template.sections else "text"


def judge_statement(settings: Settings) -> str:
    template = load_prompt(settings.judge_template)
    return f"`{settings.judge.model}`, prompts/{template.name}.md (version {template.version}), {judge_mode(settings)}"


def training_statement(settings: Settings) -> str:
    ft = settings.finetune
    return f"`{ft.base_model}`, {ft.trainer} trainer, [finetune] {describe_recipe(settings)}"


def statements(methods: Sequence[str], settings: Settings, seed_counts: Mapping[str, int]) -> list[dict[str, Any]]:
    """Per method: where its seeds and basic instructions come from, who rates its data, who judges, how it is
    trained and who answers in filtering. `seed_counts`: benchmark -> its number of seed questions."""
    bench = ", ".join(f"{b} {n}" for b, n in seed_counts.items()) or "-"
    cfg = settings.baselines
    rows = []
    for m in methods:
        source = seed_source(m, settings)
        seeds = (f"Alpaca sample of {seeds_for(m, settings)} (seed {settings.seed})" if source == "alpaca"
                 else f"benchmark 20 % split ({bench})")
        if m == "wizardlm_plus":
            need = baseline_records.seeds_needed("evol_instruct", settings)
            basic = (f"a seeded sample of {need} of the codeclm method's basic instructions "
                     "(datasets/BENCH/codeclm), evolved as Evol-Instruct" if "codeclm" in methods
                     else "decoded by its own CodecLM encode/decode from the benchmark seeds (codeclm not compared)")
            seeds = f"{basic.split(' (')[0]}" + ("" if "codeclm" in methods else f"; its seeds: {seeds}")
        elif m == "codeclm" or m in ABLATIONS:
            basic = "decoded by CodecLM from the seeds' metadata"
        elif m == "self_instruct" or m == "alpagasus":
            basic = "none: bootstrapped from the seeds (Self-Instruct)"
        elif m == "tree_instruct":
            basic = f"none: each seed rewritten once through its semantic tree, {cfg.tree_nodes} nodes added"
        else:
            basic = f"none: every seed evolved for {cfg.evol_rounds} rounds, the pool of all generations sampled"
        if m == "codeclm":
            scorer = settings.role(settings.scorer).model
            rater = (f"Contrastive Filtering: {settings.scorer} `{scorer}`, both orders, 1-10, gap > "
                     f"{settings.threshold:g}")
        elif m == "alpagasus":
            rater = (f"Alpagasus filter: judge `{settings.judge.model}`, 0-5 accuracy rating, keeps >= "
                     f"{cfg.alpagasus_threshold:g}")
        elif m == "self_instruct":
            rater = f"none (ROUGE-L < {cfg.rouge_threshold:g} pool filter)"
        elif m in ABLATIONS:
            rater = "none (no Contrastive Filtering: strong answers)"
        elif m == "tree_instruct":
            rater = "none (Evol-Instruct's elimination: unchanged, prompt leak, duplicate)"
        else:
            rater = "none (evolution's elimination checks)"
        target = f"[target] `{settings.target.model}`" if m == "codeclm" else "none (no target answers)"
        rows.append({"method": m, "seed_source": "codeclm basic instructions" if m == "wizardlm_plus" and
                     "codeclm" in methods else source, "seeds": seeds, "basic_instructions": basic, "rater": rater,
                     "judge": judge_statement(settings), "judge_template": settings.judge_template,
                     "judge_mode": judge_mode(settings), "training": training_statement(settings),
                     "filtering_target": target})
    return rows


def statements_markdown(rows: Sequence[Mapping[str, Any]], leaks: Mapping[str, int] | None = None,
                        check: JudgeCheck | None = None) -> str:
    """The statements as a table; with the run's leak counts (method -> pairs rejected as eval_overlap, summed
    over benchmarks) and the judge check's figure when the run has them."""
    lines = ["| method | seeds | basic instructions | rated by | judged by (template, mode) | trained | "
             "filtering target | eval_overlap rejected | judge check |", "|---|---|---|---|---|---|---|---:|---|"]
    fig = f"{check.figure:.0%} of {check.orders}" if check else "runs first"
    for r in rows:
        leak = str(leaks.get(r["method"], 0)) if leaks is not None else "checked at publish"
        lines.append(f"| {r['method']} | {r['seeds']} | {r['basic_instructions']} | {r['rater']} | {r['judge']} | "
                     f"{r['training']} | {r['filtering_target']} | {leak} | {fig} |")
    return "\n".join(lines)


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
    wins: int
    ties: int
    losses: int
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
                                wins=outcomes.count("win"), ties=outcomes.count("tie"),
                                losses=outcomes.count("loss"),
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


def _wtl(row: ProtocolRow | None) -> str:
    return "–" if row is None else f"{row.wins} / {row.ties} / {row.losses}"


def report_markdown(rows: Sequence[ProtocolRow], meta: Mapping[str, Any], chart: str) -> str:
    """Table 1 as the paper lays it out: methods down, benchmarks across; each cell CRR % [95 % interval] and,
    below, the paired difference to Self-Instruct in points [95 % paired interval]."""
    benchmarks = list(dict.fromkeys(r.benchmark for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    at = {(r.method, r.benchmark): r for r in rows}
    eval_on = ("the **whole** benchmark (as the paper reports; the seed questions are among them)"
               if meta["eval_on"] == "whole" else "the **held-out** 80 % (the seed questions are left out)")
    lines = ["# CodecLM protocol: Table 1", "",
             f"Every method made {meta['budget']} pairs from its seeds (below: a recorded {meta['seed_fraction']:.0%} "
             f"split of each benchmark or a recorded Alpaca sample, `splits/`), the target `{meta['base_model']}` "
             f"was tuned on each dataset ({meta['trainer']} trainer), and each tuned model was judged against the "
             f"strong model `{meta['strong']}` by `{meta['judge']}` on {eval_on}"
             + (f", first {meta['limit']} questions" if meta.get("limit") else "") + ".", ""]
    for check in [meta.get("judge_check"), *meta.get("further_judge_checks", [])]:
        if check:
            lines += [f"**{JudgeCheck.model_validate(check).line()}.**", ""]
    lines += [f"**Warning:** {w}" for w in meta.get("warnings", [])] + ([""] if meta.get("warnings") else [])
    lines += ["Each cell: CRR % [95 % bootstrap interval]; below it, the difference to Self-Instruct in percentage "
              "points [95 % paired bootstrap interval over the same questions]. An interval that contains 0 is no "
              "evidence either way.", "",
              "| method | " + " | ".join(benchmarks) + " |", "|---|" + "---:|" * len(benchmarks)]
    lines += [f"| {m} | " + " | ".join(_cell(at.get((m, b))) for b in benchmarks) + " |" for m in methods]
    short = [r for r in rows if r.shortfall]
    if short:
        lines += ["", "**Shortfall:** " + "; ".join(f"{r.method} on {r.benchmark} published {r.pairs} of "
                                                     f"{r.pairs + r.shortfall} pairs" for r in short)
                  + " (see each dataset's manifest for the limit reached)."]
    empty = meta.get("empty", [])
    if empty:
        lines += ["", "**No pairs:** " + "; ".join(f"{e['method']} on {e['benchmark']} published no pair "
                                                   f"({e['reason']}); it was not trained or evaluated" for e in empty)
                  + "."]
    lines += ["", "## Table 5: wins, ties and losses against the strong model", "",
              "| method | " + " | ".join(benchmarks) + " |", "|---|" + "---:|" * len(benchmarks)]
    lines += [f"| {m} | " + " | ".join(_wtl(at.get((m, b))) for b in benchmarks) + " |" for m in methods]
    if meta.get("statements"):
        leaks: dict[str, int] = {}
        for t in meta.get("trainings", []):
            leaks[t["method"]] = leaks.get(t["method"], 0) + t.get("eval_overlap", 0)
        lines += ["", "## How each method was made", "",
                  "Seeds, basic instructions, the rater of its data, the final judge, the training recipe, the model "
                  "answering in Contrastive Filtering, and the pairs the leak guard rejected (normalised exact match "
                  "or ROUGE-L >= 0.7 with an evaluation question, before the budget; summed over benchmarks).", "",
                  statements_markdown(meta["statements"], leaks, JudgeCheck.model_validate(check) if check else None)]
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
        elif method == "tree_instruct":
            low = high = 2 * b
            note = f"{b} Tree-Instruct rewrites ({cfg.tree_nodes} nodes added) + {b} answers"
        else:  # evol_instruct, wizardlm_plus: every root evolved each round (baseline_records.evolution_calls)
            fixed = 0
            if method == "evol_instruct":
                roots = seeds_for(method, settings) if seed_source(method, settings) == "alpaca" else seeds
                source = f"{roots} seeds"
            elif "codeclm" in methods:  # a seeded sample of them, as many as Evol-Instruct's recipe evolves
                made = front(b, settings.oversample)[1]
                roots = min(made, baseline_records.seeds_needed("evol_instruct", settings) or made)
                source = f"{roots} of codeclm's {made} basic instructions"
            else:
                fixed, roots = front(math.ceil(b * cfg.evol_oversample / cfg.evol_rounds), 1.0)
                source = f"{roots} basic instructions of its own encode/decode"
            evolved = baseline_records.evolution_calls(roots, settings)
            low = high = fixed + evolved + b
            note = f"{evolved} evolutions of {source} ({cfg.evol_rounds} rounds) + {b} answers"
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
    eval_overlap: str  # the evaluation questions as a file: the leak guard's setting `eval_overlap`
    check_questions: list[tuple[str, str]]  # (item id, prompt) of the first evaluation questions: the judge check

    def guarded(self, settings: Settings) -> Settings:
        """The settings every dataset of this benchmark is made with: the leak guard on its evaluation questions."""
        return settings.model_copy(update={"eval_overlap": self.eval_overlap})

    def seed_file(self, seeds: SeedPlan) -> str:
        """A method's seeds on this benchmark: its Alpaca sample, else the benchmark's split."""
        return seeds.file or self.seeds


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
        heldout = set(split.heldout_ids)
        evaluated = [q for q in questions if eval_on == "whole" or q.question_id in heldout]
        overlap = folder / f"eval-{eval_on}.jsonl"
        if write:
            overlap = write_jsonl(folder / f"eval-{eval_on}.jsonl",
                                  [{"question_id": q.question_id, "prompt": q.prompt} for q in evaluated])
        n_eval = len(split.heldout_ids) if eval_on == "heldout" else len(questions)
        if limit is not None and limit > n_eval:
            raise ConfigError(f"--limit {limit} is more than the {n_eval} {eval_on} questions of {split.benchmark}")
        if write:
            plan_evaluation([eval_spec], settings, limit=limit)
        n_check = settings.protocol.judge_check_questions
        plans.append(BenchmarkPlan(label=split.benchmark, split=split, seeds=str(seeds), eval_spec=eval_spec,
                                   eval_questions=min(n_eval, limit or n_eval), eval_overlap=str(overlap),
                                   check_questions=[(f"{split.benchmark}/{q.question_id}", q.prompt)
                                                    for q in evaluated[:n_check]]))
    return plans


class SeedPlan(BaseModel):
    """Where one method's seeds come from in a protocol run (the benchmark's split file is per benchmark)."""

    method: str
    source: str
    file: str | None = None  # the Alpaca seed file; None: each benchmark's split seeds
    sample: AlpacaSample | None = None


def plan_seeds(methods: Sequence[str], root: Path, settings: Settings, write: bool = True) -> dict[str, SeedPlan]:
    """Each method's seed source; Alpaca is loaded (downloaded once into home) and each needed sample size is
    drawn and, when `write`, recorded under OUT/splits/alpaca, before any model starts."""
    from codeclm.benchmarks import load_alpaca

    plans = {m: SeedPlan(method=m, source=seed_source(m, settings)) for m in methods}
    wanted = [m for m, p in plans.items() if p.source == "alpaca"]
    if not wanted:
        return plans
    source = settings.protocol.alpaca
    questions = load_alpaca(source, cache_dir=settings.home / "benchmarks")
    for m in wanted:
        sample = alpaca_sample(questions, source, settings.seed, seeds_for(m, settings))
        seeds = root / "splits" / ALPACA_DIR / f"seeds-{sample.size}.jsonl"
        if write:
            seeds = record_alpaca(root, questions, sample)
        plans[m] = SeedPlan(method=m, source="alpaca", file=str(seeds), sample=sample)
    return plans
