"""Flow `generate`: seeds in, a CodecLM dataset out. Orchestration only; every step is a batch task.

encode (per seed batch) -> augment (all) -> rubrics + decode (per batch) -> dedup (all) -> rounds (per batch:
rounds 1..K of respond -> score -> filter, with improve before every round after the first, each instruction
moving on as soon as its own calls are answered) -> export.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from codeclm import concurrency
from codeclm.checks import check_output
from codeclm.embedded import models_ready
from codeclm.endpoints import preflight
from codeclm.monitor import progress_view, stage_table, wait_rounds, wait_stage
from codeclm.settings import Settings
from tasks._base import Outputs, Ref
from tasks.augment import augment
from tasks.decode import decode
from tasks.dedup import dedup
from tasks.encode import encode
from tasks.export import export
from tasks.rounds import ordered, rounds
from tasks.rubrics import rubrics
from tasks.seeds import prepare_seeds, source_sha, validate_seeds

GENERATION_ROLES = ("strong", "target")


def task_runner(settings: Settings) -> Any:
    """Threads by default (LLM calls are I/O); Dask when asked, which needs a real Prefect server."""
    if settings.task_runner == "dask":
        from codeclm.scaleout import dask_runner

        return dask_runner(settings)
    return ThreadPoolTaskRunner(max_workers=settings.max_parallel_batches)


def _collect(refs: dict[str, list[Ref]], outputs: list[Outputs], skip: tuple[str, ...] = ()) -> None:
    for out in outputs:
        for kind, ref in out.items():
            if kind not in skip:
                refs[kind].append(ref)


def generation_roles(settings: Settings) -> tuple[str, ...]:
    return (*GENERATION_ROLES, "judge") if settings.scorer == "judge" else GENERATION_ROLES


@flow(name="codeclm-pipeline", flow_run_name="pipeline · {seeds}", log_prints=True)
def pipeline(seeds: str, out: str, settings: Settings) -> dict[str, Any]:
    """The CodecLM stages over batches; run as a subflow so the task runner can follow the settings."""
    refs: dict[str, list[Ref]] = defaultdict(list)
    limits = concurrency.start_run()
    seed_batches = prepare_seeds(seeds, source_sha(Path(seeds)), settings)
    labels = [f"{i:03d}" for i in range(len(seed_batches))]
    refs["seeds"] = seed_batches

    encoded = wait_stage("encode", encode.map(seed_batches, unmapped(settings), batch=labels))
    _collect(refs, encoded, skip=("metadata",))
    meta_batches = augment([e["metadata"] for e in encoded], settings, len(labels))
    refs["metadata"] = meta_batches
    per_metadata = settings.per_metadata(sum(r["rows"] for r in meta_batches))
    print(f"{len(seed_batches)} batches, {sum(r['rows'] for r in meta_batches)} metadata, "
          f"{per_metadata} basic instructions per metadata")

    rubric_futures = rubrics.map(meta_batches, unmapped(settings), batch=labels)
    decoded = wait_stage("decode", decode.map(meta_batches, unmapped(seed_batches), unmapped(settings),
                                              per_metadata, batch=labels))
    rubric_sets = wait_stage("rubrics", rubric_futures)
    _collect(refs, rubric_sets)
    _collect(refs, decoded, skip=("candidates",) if settings.drop_duplicates else ())
    basic = [out["candidates"] for out in decoded]
    if settings.drop_duplicates:  # across batches: the first occurrence in the whole run is kept
        deduped = dedup(basic, settings, len(basic))
        basic = deduped["candidates"]
        refs["candidates"] += basic
        refs["rejected"] += deduped["rejected"]

    active = [(label, cands, out["rubrics"]) for label, cands, out in zip(labels, basic, rubric_sets, strict=True)
              if cands["rows"] > 0]
    names = [label for label, _, _ in active]
    per_batch = wait_rounds(names, rounds.map([c for _, c, _ in active], [r for _, _, r in active],
                                              unmapped(settings), batch=names))
    for _, outputs in ordered(per_batch, settings.max_rounds):
        _collect(refs, outputs, skip=("pending",))

    run = {"flow_run_id": str(flow_run.get_id() or ""), "seeds": seeds, "seeds_sha": source_sha(Path(seeds)),
           "concurrency": concurrency.run_stats(limits)}
    return export(dict(refs), settings, out, run)


@flow(name="codeclm-generate", flow_run_name="generate · {seeds} → {out}", log_prints=True)
def generate(seeds: str, out: str, settings: Settings | None = None) -> dict[str, Any]:
    """Make a CodecLM dataset from a seed file into `out` (published atomically when complete)."""
    settings = settings or Settings()
    check_output(out, "out")
    validate_seeds(Path(seeds), settings)
    with progress_view("generate-progress", f"generate · {seeds} → {out}"), \
            models_ready(settings, generation_roles(settings)):
        preflight(settings, generation_roles(settings))
        summary = pipeline.with_options(task_runner=task_runner(settings))(seeds, out, settings)
    stage_table("generate-stages", summary["stages"], "calls, tokens, cost and seconds per CodecLM stage")
    stage_table("generate-concurrency", summary["concurrency"], "adaptive requests in flight per endpoint: limit "
                "now, lowest and highest, in-flight peak, 429/503 answers, Retry-After pauses")
    print(f"published {summary['train']} training pairs to {summary['out']}")
    return summary
