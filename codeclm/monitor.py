"""What a user watches in the Prefect UI: a progress artifact per stage and tables of counts and cost."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

log = logging.getLogger(__name__)
T = TypeVar("T")


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(str(p) for p in parts).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")


def wait_stage(label: str, futures: Sequence[PrefectFuture[T]], key_prefix: str = "") -> list[T]:
    """Wait for a stage's batch tasks, moving a progress artifact as each finishes; results keep their order."""
    total = len(futures)
    if total == 0:
        return []
    artifact = create_progress_artifact(0.0, key=artifact_key(key_prefix, "progress", label),
                                        description=f"{label}: batches finished")
    done = 0
    for _ in as_completed(list(futures)):
        done += 1
        if artifact is not None:
            update_progress_artifact(artifact, 100.0 * done / total)
    log.info("%s: %d/%d batches done", label, done, total)
    return [f.result() for f in futures]


def wait_rounds(labels: Sequence[str], futures: Sequence[PrefectFuture[dict[str, T]]], key_prefix: str = ""
                ) -> dict[str, dict[str, T]]:
    """Wait for the per-batch rounds tasks; each returns outputs keyed by stage and round ('respond r1'). A
    progress artifact per stage and round moves as batches finish it; results are keyed by batch label."""
    total = len(futures)
    artifacts: dict[str, Any] = {}
    done: dict[str, int] = {}
    label_of = {id(f): label for f, label in zip(futures, labels, strict=True)}
    for future in as_completed(list(futures)):
        for stage in future.result():
            done[stage] = done.get(stage, 0) + 1
            if stage not in artifacts:
                artifacts[stage] = create_progress_artifact(0.0, key=artifact_key(key_prefix, "progress", stage),
                                                            description=f"{stage}: batches finished")
            if artifacts[stage] is not None:
                update_progress_artifact(artifacts[stage], 100.0 * done[stage] / total)
        log.info("rounds: batch %s done", label_of[id(future)])
    for stage, artifact in artifacts.items():
        if artifact is not None and done[stage] < total:  # the other batches had no instruction left this round
            update_progress_artifact(artifact, 100.0)
    return {label: f.result() for label, f in zip(labels, futures, strict=True)}


def stage_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(rows, key=artifact_key(key), description=description)
