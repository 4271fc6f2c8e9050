"""`codeclm`: a thin CLI over the flows. Heavy imports (Prefect, litellm) wait until a command runs,
so `codeclm --help` is instant. User errors print as one line and exit 2; exit 0 means the run completed."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="CodecLM data factory: tailored synthetic instruction data, made and measured on Prefect.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with any setting (see README)")]
StrongOpt = Annotated[str | None, typer.Option(help="strong model (litellm string); default: embedded SmolLM2")]
TargetOpt = Annotated[str | None, typer.Option(help="target model (litellm string); default: embedded SmolLM2")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="seeds per batch task (default 200)")]
RoundsOpt = Annotated[int | None, typer.Option("--max-rounds", help="Self-Rubrics rounds, basic = 1 (default 4)")]
ThresholdOpt = Annotated[float | None, typer.Option(help="keep a pair when |score gap| > this (default 3)")]
BudgetOpt = Annotated[int | None, typer.Option(help="training pairs wanted (default 2000)")]


class _ShortCodecErrors(logging.Filter):
    """Prefect logs a traceback when a flow fails; for a user error the one-line message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from codeclm.errors import CodecError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CodecError):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
        return True


@contextmanager
def _user_errors() -> Iterator[None]:
    from codeclm.errors import CodecError

    for handler in logging.getLogger("prefect").handlers:
        handler.addFilter(_ShortCodecErrors())
    try:
        yield
    except CodecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: completed calls are cached; run the same command again to finish", err=True)
        raise typer.Exit(130) from None


@contextmanager
def _progress() -> Iterator[None]:
    """Live call counts per stage while a flow runs (only on a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from codeclm.progress import add_listener

    columns = (SpinnerColumn(), TextColumn("{task.description:<10}"),
               TextColumn("{task.completed} calls · {task.fields[cached]} cached · {task.fields[failed]} failed"),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        rows: dict[str, Any] = {}

        def show(stage: str, counts: Any) -> None:
            if stage not in rows:
                rows[stage] = bar.add_task(stage, total=None, cached=0, failed=0)
            bar.update(rows[stage], completed=counts["done"], cached=counts["cached"], failed=counts["failed"])

        remove = add_listener(show)
        try:
            yield
        finally:
            remove()


def _settings(config: Path | None, **overrides: Any) -> Any:
    from codeclm.settings import Settings

    return Settings.load(config, **overrides)


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
) -> None:
    """Make a CodecLM instruction-tuning dataset from SEEDS into --out."""

    def go() -> None:
        settings = _settings(config, strong=strong, target=target, batch_size=batch_size, max_rounds=max_rounds,
                             threshold=threshold, budget=budget)
        from codeclm.gateway import preflight
        from flows.generate import generate as generate_flow
        from flows.generate import generation_roles
        from tasks.seeds import validate_seeds

        validate_seeds(seeds, settings)
        preflight(settings, generation_roles(settings))
        summary = generate_flow(str(seeds), str(out), settings)
        typer.echo(f"{summary['train']} training pairs in {summary['out']} "
                   f"(cost ${summary['totals']['cost_usd']:.4f}, {summary['totals']['calls']} calls, "
                   f"{summary['totals']['cached']} cached)")

    _run(go)


def main() -> None:
    app()
