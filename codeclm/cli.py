"""`codeclm`: a thin CLI over the flows. Heavy imports (Prefect, litellm) wait until a command runs,
so `codeclm --help` is instant. User errors print as one line and exit 2; exit 0 means the run completed."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from codeclm.checks import check_evaluate, check_generate, check_output, check_run, published_run

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A fresh ephemeral Prefect server migrates its database first; 20 s (Prefect's default) is too short on 2 cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

if TYPE_CHECKING:
    from codeclm.results import DatasetResult, LeaderboardRow

_STANDALONE = False  # set by main(): this process is the `codeclm` program, not a host that imported the app
app = typer.Typer(help="CodecLM data factory: tailored synthetic instruction data, made and measured on Prefect.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with any setting (see README)")]
StrongOpt = Annotated[str | None, typer.Option(help="strong model (litellm string); default: embedded SmolLM2")]
TargetOpt = Annotated[str | None, typer.Option(help="target model (litellm string); default: embedded SmolLM2")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="seeds per batch task (default 200)")]
RoundsOpt = Annotated[int | None, typer.Option("--max-rounds", help="Self-Rubrics rounds, basic = 1 (default 4)")]
ThresholdOpt = Annotated[float | None, typer.Option(help="keep a pair when |score gap| > this (default 3)")]
BudgetOpt = Annotated[int | None, typer.Option(help="training pairs wanted (default 2000)")]
JudgeOpt = Annotated[str | None, typer.Option(help="judge model (litellm string); default: embedded SmolLM2")]
BenchmarkHelp = "benchmark name (vicuna, self-instruct, koala, evol-instruct) or a JSONL/JSON/Parquet/CSV file; repeat"
DefaultBenchmarkOpt = Annotated[list[str] | None, typer.Option(
    "--benchmark", "-b", help=BenchmarkHelp + "; default: $CODECLM_DEFAULT_BENCHMARK, else data/eval_questions.jsonl")]
SubsetOpt = Annotated[int, typer.Option(help="questions per benchmark to evaluate on")]
BaseOpt = Annotated[str | None, typer.Option(help="base model to tune: 'embedded' (default), a .gguf file, a Hugging "
                                             "Face checkpoint directory or hub id; remote: the provider's model")]
TrainerOpt = Annotated[Literal["local", "remote", "off"] | None, typer.Option(
    help="local: TRL + LoRA on this machine (default); remote: an OpenAI-style fine-tuning job; off: no training")]
LimitOpt = Annotated[int | None, typer.Option(help="evaluate only the first N questions of each benchmark")]
ReviewOpt = Annotated[Literal["off", "metadata", "dataset"] | None, typer.Option(
    help="pause for a reviewer (the Prefect UI's resume form, or here when interactive): metadata after "
         "augmentation, dataset before it is published and trained on (default off)")]
RetryFailedOpt = Annotated[bool, typer.Option(
    "--retry-failed", help="ask again the calls an earlier run kept as failed (the same unusable answer twice at "
    "temperature 0); a rerun otherwise reports them from the call cache")]
PresetOpt = Annotated[Literal["default", "paper"] | None, typer.Option(
    help="settings preset under the config file and flags: paper (as the paper states) or default (see README)")]


class _ShortCodecErrors(logging.Filter):
    """Prefect logs a traceback when a flow fails; for a user error the one-line message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from codeclm.errors import CodecError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CodecError):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
        return True


def _termination_signal() -> type[BaseException]:
    """Prefect turns SIGTERM into its own exception; treat it like Ctrl-C."""
    from prefect.exceptions import TerminationSignal

    return TerminationSignal


def _stop_temporary_server() -> None:
    """Prefect's temporary API server shares our stderr and may log its own shutdown (a cancelled database
    rollback) after our message; stopping it first keeps the one-line error the last line. Only as the
    `codeclm` program: embedded in another process (tests), the server is not ours to stop."""
    if not _STANDALONE:
        return
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # the run's last logs reach the server before it stops
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
    if "codeclm.ops.prefect_api" in sys.modules:
        from codeclm.ops.prefect_api import close_early

        close_early()


@contextmanager
def _user_errors() -> Iterator[None]:
    from prefect.logging.configuration import setup_logging

    from codeclm.errors import CodecError

    setup_logging()  # Prefect adds its console handler here; later flow runs update it incrementally
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ShortCodecErrors())
    try:
        yield
    except CodecError as exc:
        _stop_temporary_server()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        from codeclm.ops.prefect_api import api_lost

        lost = api_lost(exc)
        if lost is None:
            raise
        from codeclm.ops import interrupt

        interrupt.stop()  # calls still in flight in batch threads end now
        _stop_temporary_server()
        # Prefect has just logged the crashed run's traceback on stderr, maybe from another thread: start on a line
        # of our own so that the last line is this one
        typer.echo(f"\nerror: {lost}", err=True)
        if _STANDALONE:
            interrupt.exit_now(2)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, _termination_signal()) as exc:
        from codeclm.ops import interrupt

        interrupt.stop()  # usually done already by the signal handler or the batch runner
        _stop_temporary_server()
        interrupt.say_once(interrupt.RESUME)
        code = 143 if getattr(exc, "signal", None) == signal.SIGTERM else 130
        if _STANDALONE:  # servers stopped, logs sent, line said: skip the interpreter's slow teardown (seconds)
            interrupt.exit_now(code)
        raise typer.Exit(code) from None


@contextmanager
def _progress() -> Iterator[None]:
    """Live call counts per stage while a flow runs (only on a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from codeclm.llm.concurrency import progress_line
    from codeclm.ops.progress import add_listener

    columns = (SpinnerColumn(), TextColumn("{task.description:<10}"), TextColumn("{task.fields[text]}"),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        rows: dict[str, Any] = {}
        limits = bar.add_task("limit", total=None, text="")  # adaptive requests in flight per endpoint

        def show(stage: str, counts: Any) -> None:
            if stage not in rows:
                rows[stage] = bar.add_task(stage, total=None, text="")
            text = f"{counts['done']} calls · {counts['cached']} cached · {counts['failed']} failed"
            bar.update(rows[stage], completed=counts["done"], text=text)
            bar.update(limits, text=progress_line())

        remove = add_listener(show)
        try:
            yield
        finally:
            remove()


def _prefect_api_early(calls_expected: bool = True) -> Callable[[], object]:
    """Boot Prefect's temporary API server now, beside litellm's import and the model checks (unless
    PREFECT_API_URL names a running server); returns the function that waits for it before the flow starts.
    litellm (4-10 s to import) loads meanwhile when calls are expected: the first call needs it even when the
    model checks did not (they remember what litellm said), and a rerun of a published run needs no call."""

    from codeclm.llm.llm_runtime import import_in_background
    from codeclm.ops.prefect_api import start_early

    api = start_early()
    if calls_expected:
        import_in_background()
    return (lambda: None) if api is None else api.ready


def _shortfall_note(summary: DatasetResult) -> str:
    """The exit line's warning when fewer pairs than the budget were published."""
    budget = summary.budget
    return f"; SHORTFALL {budget.shortfall} of {budget.wanted}: {budget.limit}" if budget.shortfall else ""


def _embedded_note(settings: Any, shortfall: int, failed: int) -> str | None:
    """Why a shortfall or failed judgements are expected, when every role is the embedded tiny model (the demo)."""
    if not (shortfall or failed) or not all(settings.role(r).embedded for r in ("strong", "target", "judge")):
        return None
    what = " and ".join(x for x in (f"{shortfall} pairs short of the budget" if shortfall else "",
                                    f"{failed} questions not judged" if failed else "") if x)
    return (f"note: {what} are expected on the embedded SmolLM2-135M, which proves the machinery, not the quality; "
            "point [strong], [target] and [judge] at real models for a full dataset and clean verdicts")


def _settings(config: Path | None, **overrides: Any) -> Any:
    """Settings from file, env and flags; the Dask runner's need for a Prefect server is checked now, not after
    a temporary server has started."""
    from codeclm.settings import Settings

    settings = Settings.load(config, **overrides)
    if settings.task_runner == "dask":
        from codeclm.ops.scaleout import api_env

        api_env()
    return settings


def _run(fn: Callable[[], Any]) -> Any:
    with _user_errors(), _progress():
        return fn()


@app.command()
def generate(
    seeds: Annotated[Path, typer.Argument(help="seed instructions: Parquet file or directory, JSONL or CSV")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (replaced atomically when done)")],
    config: ConfigOpt = None,
    strong: StrongOpt = None,
    target: TargetOpt = None,
    batch_size: BatchOpt = None,
    max_rounds: RoundsOpt = None,
    threshold: ThresholdOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    review: ReviewOpt = None,
    retry_failed: RetryFailedOpt = False,
) -> None:
    """Make a CodecLM instruction-tuning dataset from SEEDS into --out."""

    def go() -> None:
        settings = _settings(config, strong=strong, target=target, batch_size=batch_size, max_rounds=max_rounds,
                             threshold=threshold, budget=budget, preset=preset, review=review,
                             retry_failed=retry_failed or None)
        ready: list[Callable[[], object]] = []
        # a bad seed file fails in about a second; Prefect's API boots beside litellm's import and the model checks
        check_generate(seeds, out, settings, loaded=lambda checked: ready.append(
            _prefect_api_early(calls_expected=published_run(checked, out, settings) is None)))
        from flows.generate import generate as generate_flow

        ready[0]()
        summary = generate_flow(str(seeds), str(out), settings)
        if summary.reused:
            typer.echo(f"{summary.train} training pairs in {summary.out}, unchanged: it already holds this run "
                       f"(0 calls{_shortfall_note(summary)})")
            return
        typer.echo(f"{summary.train} training pairs in {summary.out} (cost ${summary.totals['cost_usd']:.4f}, "
                   f"{summary.totals['calls']} calls, {summary.totals['cached']} cached{_shortfall_note(summary)})")

    _run(go)


@app.command()
def baseline(
    method: Annotated[Literal["self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus", "tree_instruct",
                              "metadata_only", "no_contrastive_filtering"], typer.Argument(
        help="self_instruct, evol_instruct (WizardLM), wizardlm_plus (WizardLM from CodecLM's basic instructions), "
             "alpagasus (Self-Instruct pairs rated by the judge), tree_instruct, or Table 3's ablations "
             "metadata_only and no_contrastive_filtering; see docs/baselines.md")],
    seeds: Annotated[Path, typer.Argument(help="seed instructions: Parquet file or directory, JSONL or CSV")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (replaced atomically when done)")],
    config: ConfigOpt = None,
    strong: StrongOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    basic: Annotated[Path | None, typer.Option(
        "--basic", help="wizardlm_plus only: a CodecLM dataset folder (what `codeclm generate` wrote) whose basic "
                        "instructions to evolve, instead of decoding its own")] = None,
    review: ReviewOpt = None,
) -> None:
    """Make a baseline dataset (same layout as `generate`) from SEEDS into --out, at the same budget."""

    def go() -> None:
        from codeclm.baseline_records import baseline_roles, basic_instructions_file
        from codeclm.errors import ConfigError

        if basic is not None:
            if method != "wizardlm_plus":
                raise ConfigError(f"--basic is for wizardlm_plus only, not {method}")
            basic_instructions_file(basic)
        settings = _settings(config, strong=strong, budget=budget, preset=preset, review=review)
        check_generate(seeds, out, settings, baseline_roles(method))
        from flows.baselines import baseline as baseline_flow

        summary = baseline_flow(method, str(seeds), str(out), settings, str(basic) if basic is not None else None)
        typer.echo(f"{summary.train} {method} pairs in {summary.out} (cost ${summary.totals['cost_usd']:.4f}, "
                   f"{summary.totals['calls']} calls, {summary.totals['cached']} cached{_shortfall_note(summary)})")

    _run(go)


def _with_judge(settings: Any, judge: str | None) -> Any:
    """Apply --judge to the model only, keeping the judge's own settings (its temperature 0.0 above all)."""
    if judge is None:
        return settings
    return settings.model_copy(update={"judge": settings.judge.model_copy(update={"model": judge})})


def leaderboard_table(results: list[LeaderboardRow]) -> Any:
    """The CRR leaderboard, readable at 80 columns: no vertical rules, one W/T/L column, numbers and the
    benchmark never wrap (a long model string folds instead)."""
    from rich import box
    from rich.table import Table

    table = Table(title="CRR against the strong model", box=box.SIMPLE_HEAD, padding=0, pad_edge=False,
                  show_edge=False, header_style="bold")
    table.add_column("benchmark", no_wrap=True)
    table.add_column("target", overflow="fold", ratio=1)
    for name in ("W/T/L", "fail", "CRR %", "95% CI", "flips"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r.benchmark, r.target, f"{r.wins}/{r.ties}/{r.losses}", str(r.failures), f"{r.crr:.2f}",
                      f"{r.ci_low:.1f}-{r.ci_high:.1f}", f"{r.flip_rate:.0%}")
    return table


def _print_leaderboard(results: list[LeaderboardRow]) -> None:
    from rich.console import Console

    Console().print(leaderboard_table(results))
    if any(r.judge_is_strong for r in results):
        typer.echo("warning: the judge is the strong model; it tends to prefer its own answers", err=True)


@app.command()
def evaluate(
    benchmark: Annotated[list[str], typer.Option("--benchmark", "-b", help=BenchmarkHelp)],
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory (replaced atomically when done)")],
    target: Annotated[list[str] | None, typer.Option(
        help="target model (litellm string); repeat to compare several; default: the configured target")] = None,
    strong: StrongOpt = None,
    judge: JudgeOpt = None,
    limit: LimitOpt = None,
    rule: Annotated[Literal["codeclm", "alpagasus"] | None, typer.Option(
        help="codeclm: a win must win both orders; alpagasus: a win and a draw also count (default: the "
             "setting `rule`, codeclm)")] = None,
    config: ConfigOpt = None,
    prompt_column: Annotated[str | None, typer.Option(help="column holding the prompt in a benchmark file")] = None,
    preset: PresetOpt = None,
    retry_failed: RetryFailedOpt = False,
) -> None:
    """Measure CRR: each target against the strong model on benchmarks, judged in both answer orders."""

    def go() -> None:
        settings = _with_judge(_settings(config, strong=strong, preset=preset, retry_failed=retry_failed or None),
                               judge)
        check_evaluate(benchmark, out, settings, target, limit, rule, prompt_column)  # bad input fails before Prefect
        from flows.evaluate import evaluate as evaluate_flow

        summary = evaluate_flow(benchmark, str(out), target, settings, limit, rule, prompt_column)
        _print_leaderboard(summary.results)
        typer.echo(f"report in {summary.out}")

    _run(go)


@app.command("run")
def run_job(
    seeds: Annotated[Path, typer.Argument(help="seed instructions: Parquet file or directory, JSONL or CSV")],
    out: Annotated[Path, typer.Option("--out", "-o", help="writes OUT/dataset, OUT/model, OUT/eval, OUT/report.md")],
    config: ConfigOpt = None,
    strong: StrongOpt = None,
    target: TargetOpt = None,
    judge: JudgeOpt = None,
    batch_size: BatchOpt = None,
    max_rounds: RoundsOpt = None,
    threshold: ThresholdOpt = None,
    budget: BudgetOpt = None,
    benchmark: DefaultBenchmarkOpt = None,
    limit: SubsetOpt = 8,
    preset: PresetOpt = None,
    trainer: TrainerOpt = None,
    base: BaseOpt = None,
    review: ReviewOpt = None,
    retry_failed: RetryFailedOpt = False,
) -> None:
    """The main job, the whole loop: generate a dataset from SEEDS, tune the target on it, then measure base and
    tuned target against the strong model on the same questions."""

    def go() -> None:
        settings = _with_judge(_settings(config, strong=strong, target=target, batch_size=batch_size,
                                         max_rounds=max_rounds, threshold=threshold, budget=budget, preset=preset,
                                         review=review, retry_failed=retry_failed or None),
                               judge).with_finetune(config, base_model=base, trainer=trainer)
        from codeclm.eval.evaluation import default_benchmark

        benchmarks = benchmark or [default_benchmark()]
        check_run(seeds, out, settings, benchmarks, limit)  # bad input fails before Prefect
        api_ready = _prefect_api_early()
        from flows.run import run as run_flow

        api_ready()
        result = run_flow(str(seeds), str(out), settings, benchmarks, limit)
        typer.echo(f"{result.dataset.train} training pairs in {result.dataset.out}{_shortfall_note(result.dataset)}")
        _print_leaderboard(result.evaluation)
        if note := _embedded_note(settings, result.dataset.budget.shortfall,
                                  sum(r.failures for r in result.evaluation)):
            typer.echo(note, err=True)
        if result.model is None:
            from codeclm.eval.loop import NO_TRAINING

            typer.echo(f"note: {NO_TRAINING}", err=True)
        for r in result.loop:
            typer.echo(f"{r.benchmark}: CRR base {r.crr_base:.2f}% -> tuned {r.crr_tuned:.2f}%: {r.delta:+.2f} pp "
                       f"(95% paired CI {r.ci_low:+.1f} to {r.ci_high:+.1f}, {r.questions} questions)")
        typer.echo(f"report in {result.report}")

    _run(go)


@app.command()
def protocol(
    benchmark: Annotated[list[str], typer.Option("--benchmark", "-b", help=BenchmarkHelp)],
    out: Annotated[Path, typer.Option("--out", "-o", help="writes OUT/report.md, OUT/table.parquet, OUT/crr.svg, "
                                      "OUT/splits, OUT/datasets, OUT/models, OUT/eval")],
    method: Annotated[list[str] | None, typer.Option(help="method to compare; repeat (default: all: codeclm, the "
                                                      "baselines and Table 3's ablations)")] = None,
    eval_on: Annotated[Literal["whole", "heldout"], typer.Option(
        help="whole: every benchmark question, as the paper reports; heldout: the 80 % not used as seeds")] = "whole",
    seed_fraction: Annotated[float, typer.Option(help="share of each benchmark used as seeds")] = 0.2,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    strong: StrongOpt = None,
    target: TargetOpt = None,
    judge: Annotated[list[str] | None, typer.Option(
        help="judge model (litellm string); repeat for Table 6: every tuned target judged by each (default: the "
             "embedded SmolLM2)")] = None,
    study: Annotated[list[str] | None, typer.Option(
        help="also run a study of the paper: rounds (Fig. 3), metadata (Fig. 4), budget (Fig. 5); repeat; "
             "points in [studies]")] = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    trainer: Annotated[Literal["local", "remote"] | None, typer.Option(
        help="local: TRL + LoRA on this machine (default); remote: an OpenAI-style fine-tuning job")] = None,
    base: BaseOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the splits, what each method is seeded, "
                                          "rated, judged and trained with, and the calls; run nothing")] = False,
    skip_judge_check: Annotated[bool, typer.Option(
        "--skip-judge-check", help="go on when the judge check fails (it still runs; the report says so)")] = False,
) -> None:
    """The paper's experiment (Table 1): per benchmark a recorded seed split, every method's dataset at the same
    budget, the target tuned on each, CRR of each against the strong model and the difference to Self-Instruct."""

    def go() -> None:
        from codeclm.eval.protocol import (
            check_leak_risk,
            check_methods,
            filtering_warning,
            plan_calls,
            plan_markdown,
            plan_protocol,
            plan_seeds,
            statements,
            statements_markdown,
        )
        from codeclm.eval.studies import check_judges, check_studies, studies_plan, studies_plan_markdown

        settings = _with_judge(_settings(config, strong=strong, target=target, budget=budget, preset=preset),
                               (judge or [None])[0]).with_finetune(config, base_model=base, trainer=trainer)
        methods = check_methods(method) if method else None
        judges, studies = check_judges((judge or [])[1:], settings), check_studies(study or [], settings)
        check_leak_risk(methods or _all_methods(), settings, eval_on)
        root = check_output(out, replaced=False)
        plans = plan_protocol(benchmark, root, settings, eval_on, limit, seed_fraction, write=not dry_run)
        seeds = plan_seeds(methods or _all_methods(), root, settings, write=not dry_run)
        from codeclm.train.finetune import recipe_warning

        for warning in (filtering_warning(settings, methods or _all_methods()), recipe_warning(settings)):
            if warning:
                typer.echo(f"WARNING: {warning}", err=True)
        if dry_run:
            rows = {p.label: plan_calls(settings, methods or _all_methods(), len(p.split.seed_ids),
                                        p.eval_questions) for p in plans}
            for p in plans:
                typer.echo(f"{p.label}: {len(p.split.seed_ids)} seed questions, {len(p.split.heldout_ids)} held "
                           f"out (split seed {p.split.seed}); evaluating on {eval_on}; leak guard against its "
                           f"{len(p.split.heldout_ids) if eval_on == 'heldout' else p.split.questions} evaluation "
                           "questions")
            for m, sp in seeds.items():
                if sp.sample is not None:
                    typer.echo(f"{m}: {sp.sample.size} of {sp.sample.available} Alpaca instructions "
                               f"({sp.sample.source}, sample seed {sp.sample.seed})")
            check = settings.protocol
            typer.echo(f"judge check first: {plans[0].label}'s first {len(plans[0].check_questions)} questions, the "
                       f"strong answer against its first sentence and another question's answer, both orders; "
                       f"refused below {check.judge_check_min:.0%}" + (" (--skip-judge-check: reported, not "
                                                                        "refused)" if skip_judge_check else ""))
            typer.echo(statements_markdown(statements(methods or _all_methods(), settings,
                                                      {p.label: len(p.split.seed_ids) for p in plans})))
            typer.echo(plan_markdown(rows, settings, {p.label: p.eval_questions for p in plans}))
            further = {p.label: studies_plan(studies, judges, settings, methods or _all_methods(),
                                             len(p.split.seed_ids), p.eval_questions) for p in plans}
            typer.echo(studies_plan_markdown(further))  # Table 6, Figs. 3-5
            return
        from codeclm.train.finetune import check_trainer

        check_trainer(settings)
        api_ready = _prefect_api_early()
        from flows.protocol import protocol as protocol_flow

        api_ready()
        result = protocol_flow(benchmark, str(out), settings, methods, eval_on, limit, seed_fraction,
                               skip_judge_check, judges, studies)
        if result.judge_check is not None:
            typer.echo(result.judge_check.line())
        for e in result.empty:
            typer.echo(f"{e['benchmark']} · {e['method']}: NO PAIRS ({e['reason']})")
        for r in result.rows:
            delta = "" if r.delta != r.delta else f", {r.delta:+.1f} pp vs self_instruct [{r.delta_low:+.1f}, " \
                                                  f"{r.delta_high:+.1f}]"
            short = f", SHORTFALL {r.shortfall}" if r.shortfall else ""
            typer.echo(f"{r.benchmark} · {r.method}: CRR {r.crr:.1f}% [{r.ci_low:.1f}, {r.ci_high:.1f}]{delta}{short}")
        typer.echo(f"Table 1 (evaluated on {result.eval_on}) in {result.report}")

    _run(go)


def _all_methods() -> list[str]:
    from codeclm.eval.protocol import METHODS

    return list(METHODS)


@app.command()
def finetune(
    dataset: Annotated[Path, typer.Argument(help="dataset directory made by `generate` (its train.jsonl), or a JSONL")],
    out: Annotated[Path, typer.Option("--out", "-o", help="tuned model directory (replaced atomically when done)")],
    base: BaseOpt = None,
    trainer: Annotated[Literal["local", "remote"] | None, typer.Option(
        help="local: TRL + LoRA on this machine (default); remote: an OpenAI-style fine-tuning job")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Fine-tune the target on a dataset: LoRA adapter + merged model (local) or a provider job (remote)."""

    def go() -> None:
        from codeclm.train.finetune import plan_finetune, recipe_warning

        settings = _settings(config, preset=preset)
        settings = settings.with_finetune(config, base_model=base, trainer=trainer)
        check_output(out)
        plan = plan_finetune(dataset, settings)  # bad input fails in seconds, before Prefect and any model loads
        typer.echo(f"recipe: {plan.recipe}")
        if warning := recipe_warning(settings):
            typer.echo(f"note: {warning}", err=True)
        from flows.finetune import finetune as finetune_flow

        result = finetune_flow(str(dataset), str(out), settings)
        model = result.merged_model or result.remote_model
        how = "reused, not retrained" if result.cached else (
            f"resumed from step {result.resumed_from_step}" if result.resumed_from_step else "trained")
        loss = f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}, " if result.final_loss is not None else ""
        typer.echo(f"tuned model {model} ({how}; {loss}{result.steps} steps, {result.seconds:.0f} s) in {result.out}")

    _run(go)


@app.command()
def refresh(
    seeds: Annotated[Path, typer.Argument(help="directory of *.parquet seed drops; it may grow between runs")],
    root: Annotated[Path, typer.Option("--root", "-r", help="version store: ROOT/versions/v0001, ROOT/latest")],
    config: ConfigOpt = None,
    benchmark: DefaultBenchmarkOpt = None,
    target: Annotated[list[str] | None, typer.Option(
        help="target model to evaluate; {version} is replaced by the new version id")] = None,
    limit: SubsetOpt = 8,
    evaluate: Annotated[bool, typer.Option(help="evaluate the new version and report the CRR change")] = True,
    slot: Annotated[str | None, typer.Option(help="idempotency key; the same slot never makes two versions")] = None,
    preset: PresetOpt = None,
    review: ReviewOpt = None,
    retry_failed: RetryFailedOpt = False,
) -> None:
    """Append a dataset version under --root from the seeds in SEEDS that no version has processed yet."""

    def go() -> None:
        settings = _settings(config, preset=preset, review=review, retry_failed=retry_failed or None)
        check_output(root, "--root", replaced=False)
        from flows.refresh import refresh as refresh_flow

        result = refresh_flow(str(seeds), str(root), settings, benchmark, target, limit, evaluate, slot)
        if result.status != "published":
            typer.echo(f"{result.status}: latest is {result.version or 'none'} in {result.root}")
            return
        cost = (result.totals or {}).get("cost_usd", 0.0)
        typer.echo(f"{result.version}: {result.new_seeds} new seeds, {result.train} training pairs "
                   f"(cost ${cost:.4f}) in {result.root}/versions/{result.version}")
        for d in result.crr_delta:
            change = f"{d.delta_pp:+.2f} pp vs {d.previous_version}" if d.delta_pp is not None else "first"
            typer.echo(f"  {d.benchmark} · {d.target}: CRR {d.crr:.2f}% ({change})")

    _run(go)


def _shown(path: Path) -> tuple[Path, str, list[str]]:
    """The dataset folder behind DIR (a dataset, a refresh version or a refresh root: its latest version), a
    title, and the changes the version recorded against the one before."""
    import json

    from codeclm.errors import DatasetError

    if (path / "registry.json").exists():
        latest = json.loads((path / "registry.json").read_text()).get("latest")
        if not latest:
            raise DatasetError(f"{path}: this refresh root has no version yet")
        return _shown(path / "versions" / latest)
    if (path / "version.json").exists() and (path / "dataset" / "manifest.json").exists():
        from codeclm.profile import diff_lines

        entry = json.loads((path / "version.json").read_text())
        return path / "dataset", f"{entry['version']} · {path}", diff_lines(entry.get("changes"))
    if (path / "manifest.json").exists() and (path / "train.parquet").exists():
        return path, str(path), []
    raise DatasetError(f"{path}: not a dataset, a refresh version or a refresh root (no manifest.json, version.json "
                       "or registry.json)")


@app.command()
def show(
    path: Annotated[Path, typer.Argument(help="a dataset (generate, baseline), a refresh root or one of its versions")],
    samples: Annotated[int, typer.Option("--samples", "-n", min=0, help="sample pairs to print with lineage")] = 3,
) -> None:
    """Print what a dataset holds: its profile (use cases, skills, lengths, rounds, gaps, cost per pair) and
    sample pairs with their lineage (seed -> metadata -> basic instruction -> actions -> pair)."""

    def go() -> None:
        import shutil

        from rich.console import Console

        from codeclm.profile_show import WIDTH
        from codeclm.profile_show import show as show_profile

        folder, title, changes = _shown(path)
        width = min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
        show_profile(folder, samples, Console(width=width, highlight=False), title, changes)

    with _user_errors():
        go()


def main() -> None:
    global _STANDALONE
    _STANDALONE = True
    from codeclm.ops.interrupt import stop_on_signals

    stop_on_signals()
    app()


if __name__ == "__main__":
    main()
