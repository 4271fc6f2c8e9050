"""Flow `generate`: seeds in, a CodecLM dataset out. Orchestration only; every step is a batch task.

encode (per seed batch) -> augment (all) -> rubrics + decode (per batch) -> dedup (all) ->
rounds 1..K of respond -> score -> filter, with improve before every round after the first -> export.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from codeclm.checks import check_output
from codeclm.embedded import models_ready
from codeclm.gateway import preflight
from codeclm.monitor import progress_view, stage_table, wait_stage
from codeclm.settings import Settings
from tasks._base import Outputs, Ref
from tasks.augment import augment
from tasks.decode import decode
from tasks.dedup import dedup
from tasks.encode import encode
from tasks.export import export
from tasks.filter import filter_candidates
from tasks.improve import improve
from tasks.respond import respond
from tasks.rubrics import rubrics
from tasks.score import score
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

    active = dict(zip(labels, basic, strict=True))
    rubric_of = {label: out["rubrics"] for label, out in zip(labels, rubric_sets, strict=True)}
    for round in range(1, settings.max_rounds + 1):
        active = {label: ref for label, ref in active.items() if ref["rows"] > 0}
        if not active:
            break
        names = list(active)
        if round > 1:
            improved = wait_stage(f"improve r{round}", improve.map(
                list(active.values()), [rubric_of[n] for n in names], unmapped(settings), round, batch=names))
            _collect(refs, improved)
            active = {n: out["candidates"] for n, out in zip(names, improved, strict=True)}
        cands = list(active.values())
        answered = wait_stage(f"respond r{round}", respond.map(cands, unmapped(settings), round, batch=names))
        responses = [a["responses"] for a in answered]
        judged = wait_stage(f"score r{round}", score.map(cands, responses, unmapped(settings), round, batch=names))
        filtered = wait_stage(f"filter r{round}", filter_candidates.map(
            cands, responses, [j["judgements"] for j in judged], unmapped(settings), round, batch=names))
        _collect(refs, answered + judged)
        _collect(refs, filtered, skip=("pending",))
        active = {n: out["pending"] for n, out in zip(names, filtered, strict=True)}

    run = {"flow_run_id": str(flow_run.get_id() or ""), "seeds": seeds, "seeds_sha": source_sha(Path(seeds))}
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
    print(f"published {summary['train']} training pairs to {summary['out']}")
    return summary
