"""Flow `refresh`: the scheduled job. New seed drops in, one new dataset version out, CRR change reported.

scan the drop directory (skip seeds any version already processed, by content hash) -> generate on the new
seeds only -> evaluate -> publish the version and register it in one atomic step. The same schedule slot
run twice makes one version; a killed run leaves the previous version and `latest` as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from codeclm.checks import check_output, check_refresh
from codeclm.eval.evaluation import default_benchmark
from codeclm.eval.loop import compared_targets
from codeclm.llm.embedded import models_ready
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import progress_view, step
from codeclm.ops.versions import (
    NewSeed,
    VersionStore,
    crr_deltas,
    eval_rows,
    history_table,
    now_iso,
    report_markdown,
    slot_of,
    version_changes,
)
from codeclm.results import CRRDelta, LeaderboardRow, RefreshResult
from codeclm.settings import Settings
from codeclm.train.finetune import FinetuneResult
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.generate import generate

ROLES = ("strong", "target", "judge")
DEFAULT_EVAL_LIMIT = 8
VERSION_PLACEHOLDER = "{version}"


def current_slot(slot: str | None) -> str:
    """An explicit slot wins (a manual re-run of a night); otherwise the run's scheduled start."""
    return slot or slot_of(flow_run.scheduled_start_time)


def _run_name() -> str:
    params = flow_run.parameters
    return f"refresh · {current_slot(params.get('slot'))} · {params.get('seeds')} → {params.get('root')}"


@task(name="scan seeds", task_run_name="scan seeds · {seeds}", cache_policy=NO_CACHE, persist_result=False)
def scan_seeds(store: VersionStore, seeds: str) -> list[NewSeed]:
    """Seeds in the drop directory that no registered version has processed."""
    new = store.new_seeds(Path(seeds))
    by_file: dict[str, list[str]] = {}
    for s in new:
        by_file.setdefault(s.source, []).append(s.seed.seed_id)
    logger = get_run_logger()
    for source, ids in by_file.items():
        shown = ", ".join(ids[:10]) + (f", ... (+{len(ids) - 10})" if len(ids) > 10 else "")
        logger.info("%s: %d new seeds: %s", source, len(ids), shown)
    return new


@task(name="publish version", task_run_name="publish version · {entry[version]}", cache_policy=NO_CACHE,
      persist_result=False)
def publish_version(store: VersionStore, staging: Path, entry: dict[str, Any]) -> str:
    """Rename the finished version into place and register it (history + latest) with one atomic replace."""
    final = store.commit(staging, entry)
    get_run_logger().info("published %s at %s; latest -> %s", entry["version"], final, entry["version"])
    return str(final)


def _unchanged(store: VersionStore, status: Literal["slot-done", "no-new-seeds"], version: str | None, slot: str,
               why: str) -> RefreshResult:
    """A refresh that adds no version still says so in the UI, and returns what `latest` is."""
    get_run_logger().info("%s; latest stays %s", why, store.latest())
    step("nothing to do", done=True)
    _report(store, f"# Refresh · slot {slot}\n\n{why}; latest stays **{store.latest()}**.\n")
    return RefreshResult(status=status, version=version, previous=store.latest(), slot=slot, root=str(store.root))


def _report(store: VersionStore, markdown: str) -> None:
    create_markdown_artifact(markdown, key="refresh-report", description="what this refresh added and CRR change")
    if rows := history_table(store.history()):
        create_table_artifact(rows, key="refresh-history", description="dataset versions: seeds, pairs, cost, CRR")


@flow(name="codeclm-refresh", flow_run_name=_run_name, log_prints=True, on_running=[watch_cancellation])
def refresh(seeds: str, root: str, settings: Settings | None = None, benchmarks: list[str] | None = None,
            targets: list[str] | None = None, eval_limit: int | None = DEFAULT_EVAL_LIMIT, run_eval: bool = True,
            slot: str | None = None) -> RefreshResult:
    """Append a dataset version under ROOT made from the seeds in SEEDS no version has processed yet.

    `targets` may contain `{version}` (e.g. `openai/tuned-{version}`) to evaluate the model tuned on this
    version; CRR deltas are matched on the target as written, so they compare like with like."""
    settings = settings or Settings()
    check_output(root, "root", replaced=False)
    store = VersionStore(Path(root))
    slot = current_slot(slot)
    logger = get_run_logger()
    with progress_view("refresh-progress", f"refresh · slot {slot} · {seeds} → {root}"), store.lock():
        if removed := store.recover():
            logger.warning("removed leftovers of an interrupted refresh: %s", ", ".join(removed))
        previous = store.latest()
        if (done := store.version_for_slot(slot)) is not None:
            return _unchanged(store, "slot-done", done, slot, f"slot {slot} already made {done}")
        step("scan seeds", done=False)
        new = scan_seeds(store, seeds)
        step("scan seeds", done=True)
        if not new:
            return _unchanged(store, "no-new-seeds", previous, slot, f"no new seeds in {seeds}")

        version = store.next_version()
        specs = {t.replace(VERSION_PLACEHOLDER, version): t for t in targets or []}
        bench = benchmarks or [default_benchmark()]
        # named targets are models tuned elsewhere; otherwise the version trains its own (unless training is off)
        train = run_eval and not specs and settings.finetune.trainer != "off"
        # a bad benchmark, target, unreachable judge or training setup fails now, before any generation call
        check_refresh(settings, bench, list(specs), eval_limit, evaluate=run_eval, train=train)
        staging = store.stage(version)
        seeds_file = store.write_seeds(staging, new)
        logger.info("building %s from %d new seeds in %s", version, len(new), staging)
        with models_ready(settings, ROLES):
            dataset = generate.with_options(flow_run_name=f"{version} · generate · {len(new)} new seeds")(
                str(seeds_file), str(staging / "dataset"), settings)
            results: list[LeaderboardRow] = []
            tuned: FinetuneResult | None = None
            evaluate_version = evaluate.with_options(flow_run_name=f"{version} · evaluate · {', '.join(bench)}")
            if train:
                tuned = finetune.with_options(flow_run_name=f"{version} · finetune")(
                    str(staging / "dataset"), str(staging / "model"), settings)
                with compared_targets(tuned, settings) as (base, tuned_role):
                    specs = {base.model: "base", tuned_role.model: "tuned"}  # compared across versions by role
                    results = evaluate_version(bench, str(staging / "eval"), targets=[base, tuned_role],
                                               settings=settings, limit=eval_limit).results
            elif run_eval:
                results = evaluate_version(bench, str(staging / "eval"), targets=list(specs) or None,
                                           settings=settings, limit=eval_limit).results
        step("publish version", done=False)
        rows = eval_rows([r.model_dump() for r in results], specs)
        entry = {"version": version, "slot": slot, "parent": previous, "created_at": now_iso(),
                 "flow_run_id": str(flow_run.get_id() or ""), "seeds_new": len(new),
                 "seed_files": sorted({s.source for s in new}), "train": dataset.train,
                 "totals": dataset.totals, "eval": rows, "trained": tuned is not None,
                 "model": tuned.model_dump(include={"trainer", "key", "served_name", "remote_model", "steps",
                                                    "final_loss"}) if tuned else None,
                 "crr_delta": crr_deltas(store.entry(previous) if previous else None, rows),
                 "changes": version_changes(store, previous, staging / "dataset")}
        publish_version(store, staging, entry)
        step("publish version", done=True)
    _report(store, report_markdown(entry))
    for d in entry["crr_delta"]:
        change = f"{d['delta_pp']:+.2f} pp vs {d['previous_version']}" if d["delta_pp"] is not None else "first"
        print(f"{version} · {d['benchmark']} · {d['target']}: CRR {d['crr']:.2f}% ({change})")
    return RefreshResult(status="published", version=version, previous=previous, slot=slot, root=str(store.root),
                         new_seeds=len(new), train=dataset.train, totals=dataset.totals, eval=rows,
                         crr_delta=[CRRDelta.model_validate(d) for d in entry["crr_delta"]])
