"""What a user watches in the Prefect UI: one progress view per run (a progress artifact whose description is a
table of stages, updated in place as batches finish) and tables of counts and cost."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed

from codeclm.profile import artifact_markdown

log = logging.getLogger(__name__)
T = TypeVar("T")


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(str(p) for p in parts).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")


@dataclass
class _Stage:
    total: int
    done: int = 0


@dataclass
class RunProgress:
    """One progress artifact for a whole run, nested flows included: the bar is batches done over batches
    known so far, the description a markdown table of stages. Updated in place, so a run (and every
    scheduled run after it) adds one artifact, not one per stage and round."""

    key: str
    title: str
    stages: dict[str, _Stage] = field(default_factory=dict)
    artifact: UUID | None = None

    def open(self) -> None:
        self.artifact = create_progress_artifact(0.0, key=self.key, description=self.markdown())

    def add(self, stage: str, total: int) -> None:
        self.stages[stage] = _Stage(total)
        self._push()

    def advance(self, stage: str, done: int = 1) -> None:
        self.stages[stage].done += done
        self._push()

    def percent(self) -> float:
        total = sum(s.total for s in self.stages.values())
        return 100.0 * sum(s.done for s in self.stages.values()) / total if total else 0.0

    def markdown(self) -> str:
        rows = [f"| {name} | {s.done}/{s.total} | {'done' if s.done == s.total else 'running'} |"
                for name, s in self.stages.items()]
        return "\n".join([f"**{self.title}**", "", "| stage | batches | state |", "|---|---|---|", *rows])

    def _push(self) -> None:
        if self.artifact is not None:
            update_progress_artifact(self.artifact, self.percent(), description=self.markdown())


_VIEW: ContextVar[RunProgress | None] = ContextVar("codeclm_run_progress", default=None)


@contextlib.contextmanager
def progress_view(key: str, title: str) -> Iterator[RunProgress]:
    """The run's progress view: opened by the outermost flow, reused by the flows it calls."""
    current = _VIEW.get()
    if current is not None:
        yield current
        return
    view = RunProgress(artifact_key(key), title)
    view.open()
    token = _VIEW.set(view)
    try:
        yield view
    finally:
        _VIEW.reset(token)


def step(label: str, done: bool) -> None:
    """A one-part step of the run (scan, publish) in the progress view."""
    view = _VIEW.get()
    if view is None:
        return
    if label not in view.stages:
        view.add(label, 1)
    if done and view.stages[label].done == 0:
        view.advance(label)


def wait_stage(label: str, futures: Sequence[PrefectFuture[T]], key_prefix: str = "") -> list[T]:
    """Wait for a stage's batch tasks, moving the run's progress view as each finishes; results keep order."""
    total = len(futures)
    if total == 0:
        return []
    stage = f"{key_prefix} {label}".strip()
    view = _VIEW.get()
    if view is not None:
        view.add(stage, total)
    done = 0
    for _ in as_completed(list(futures)):
        done += 1
        if view is not None:
            view.advance(stage)
    log.info("%s: %d/%d batches done", stage, done, total)
    return [f.result() for f in futures]


def wait_rounds(labels: Sequence[str], futures: Sequence[PrefectFuture[dict[str, T]]], suffix: str = ""
                ) -> dict[str, dict[str, T]]:
    """Wait for the per-batch rounds tasks; each returns outputs keyed by stage and round ('respond r1'). The
    run's progress view gets a `rounds` row moved per finished batch and a row per stage and round it reached
    (names end in `suffix`, e.g. ' t1' for a top-up pass); results are keyed by batch label."""
    total = len(futures)
    view = _VIEW.get()
    rounds_row = f"rounds{suffix}"
    if view is not None and total:
        view.add(rounds_row, total)
    label_of = {id(f): label for f, label in zip(futures, labels, strict=True)}
    reached: set[str] = set()
    for future in as_completed(list(futures)):
        if view is not None:
            for stage in future.result():
                reached.add(f"{stage}{suffix}")
                view.stages.setdefault(f"{stage}{suffix}", _Stage(total)).done += 1
            view.advance(rounds_row)
        log.info("rounds: batch %s done", label_of[id(future)])
    if view is not None and total:  # batches with no instruction left for a round have nothing more to do in it
        for stage in reached:
            view.stages[stage].done = total
        view.advance(rounds_row, 0)
    return {label: f.result() for label, f in zip(labels, futures, strict=True)}


def stage_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(rows, key=artifact_key(key), description=description)


def profile_artifact(out: str, method: str) -> None:
    """The published dataset's profile (codeclm.profile), charts inline, as one markdown artifact on the run."""
    key = "dataset-profile" if method == "codeclm" else artifact_key("dataset-profile", method)
    create_markdown_artifact(artifact_markdown(Path(out), f"{method} · {out}"), key=key,
                             description=f"what the {method} dataset holds: use cases, skills, lengths, gaps, samples")
