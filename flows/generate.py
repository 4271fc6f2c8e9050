"""Flow `generate`: seeds in, a CodecLM dataset out. Orchestration only; every step is a batch task.

encode (per seed batch) -> augment (all) -> rubrics + decode (per batch) -> dedup (all) -> rounds (per batch:
rounds 1..K of respond -> score -> filter, with improve before every round after the first, each instruction
moving on as soon as its own calls are answered) -> export.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run

from codeclm.checks import check_generate, generation_roles, published_run
from codeclm.llm import concurrency
from codeclm.llm.embedded import models_ready
from codeclm.ops.batch_runner import BatchRunner
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import profile_artifact, progress_view, stage_table, wait_rounds, wait_stage
from codeclm.results import GenerateResult
from codeclm.settings import Settings
from tasks._base import Outputs, Ref
from tasks.augment import augment
from tasks.decode import decode
from tasks.dedup import dedup
from tasks.encode import encode
from tasks.export import export
from tasks.review import review_metadata
from tasks.rounds import ordered, rounds
from tasks.rubrics import rubrics
from tasks.seeds import prepare_seeds


def task_runner(settings: Settings) -> Any:
    """Threads by default (LLM calls are I/O; a signal stops them: BatchRunner); Dask when asked, which needs a
    real Prefect server."""
    if settings.task_runner == "dask":
        from codeclm.ops.scaleout import dask_runner

        return dask_runner(settings)
    return BatchRunner(max_workers=settings.max_parallel_batches)


def _collect(refs: dict[str, list[Ref]], outputs: list[Outputs], skip: tuple[str, ...] = ()) -> None:
    for out in outputs:
        for kind, ref in out.items():
            if kind not in skip:
                refs[kind].append(ref)


@flow(name="codeclm-pipeline", flow_run_name="pipeline · {seeds}", log_prints=True)
def pipeline(seeds: str, seeds_sha: str, out: str, settings: Settings, method: str = "codeclm") -> dict[str, Any]:
    """The CodecLM stages over batches; run as a subflow so the task runner can follow the settings."""
    refs: dict[str, list[Ref]] = defaultdict(list)
    limits = concurrency.start_run()
    seed_batches = prepare_seeds(seeds, seeds_sha, settings.for_stage("seeds"))
    labels = [f"{i:03d}" for i in range(len(seed_batches))]
    refs["seeds"] = seed_batches

    encoded = wait_stage("encode", encode.map(seed_batches, unmapped(settings.for_stage("encode")), batch=labels))
    _collect(refs, encoded, skip=("metadata",))
    meta_batches = augment([e["metadata"] for e in encoded], settings.for_stage("augment"), len(labels))
    if settings.review == "metadata":
        meta_batches = review_metadata(meta_batches, settings.for_stage("review"))
    refs["metadata"] = meta_batches
    per_metadata = settings.per_metadata(sum(r["rows"] for r in meta_batches))
    print(f"{len(seed_batches)} batches, {sum(r['rows'] for r in meta_batches)} metadata, "
          f"{per_metadata} basic instructions per metadata")

    rubric_futures = rubrics.map(meta_batches, unmapped(settings.for_stage("rubrics")), batch=labels)
    decoded = wait_stage("decode", decode.map(meta_batches, unmapped(seed_batches),
                                              unmapped(settings.for_stage("decode")), per_metadata, batch=labels))
    rubric_sets = wait_stage("rubrics", rubric_futures)
    _collect(refs, rubric_sets)
    passes = _Passes(labels, [out["rubrics"] for out in rubric_sets])
    kept = passes.run(decoded, refs, settings)
    topup = {"passes": 0, "limit": None}
    while kept < settings.budget:
        if settings.instructions_per_metadata:
            topup["limit"] = (f"instructions_per_metadata = {settings.instructions_per_metadata} fixes how many basic "
                              "instructions are made, so none were topped up")
            break
        if topup["passes"] >= settings.max_topups:
            topup["limit"] = f"max_topups ({settings.max_topups}) reached"
            break
        topup["passes"] += 1
        extra = topup_size(settings, kept, passes.basic_count(), sum(r["rows"] for r in meta_batches))
        print(f"top-up {topup['passes']}: {kept} of {settings.budget} pairs kept; asking for {extra} more basic "
              "instructions per metadata")
        labels_k = [f"{label}-t{topup['passes']}" for label in labels]
        more = wait_stage(f"decode t{topup['passes']}", decode.map(
            meta_batches, unmapped(seed_batches), unmapped(settings.for_stage("decode")), extra, batch=labels_k,
            earlier=passes.decoded_so_far(), topup=topup["passes"]))
        kept += passes.run(more, refs, settings, topup["passes"])
        if passes.basic_count(-1) == 0:
            topup["limit"] = f"top-up {topup['passes']} made no new basic instruction (all failed or repeats)"
            break

    run = {"flow_run_id": str(flow_run.get_id() or ""), "seeds": seeds, "seeds_sha": seeds_sha,
           "concurrency": concurrency.run_stats(limits), "topup": topup, "method": method}
    return export(dict(refs), settings.for_stage("export"), out, run)


def topup_size(settings: Settings, kept: int, basic: int, n_metadata: int) -> int:
    """Basic instructions per metadata for a top-up pass: the missing pairs over the yield so far (kept per
    basic instruction; the oversample's own 1 / oversample when nothing was kept yet), 10 % spare, split evenly."""
    rate = kept / basic if kept and basic else 1 / settings.oversample
    return max(1, math.ceil((settings.budget - kept) / rate * 1.1 / max(n_metadata, 1)))


class _Passes:
    """The decode -> dedup -> rounds part of the pipeline, run once and again for every top-up pass; duplicates
    are removed against every earlier pass, so a top-up never pays twice for an instruction."""

    def __init__(self, labels: list[str], rubric_refs: list[Ref]) -> None:
        self.labels, self.rubric_refs = labels, rubric_refs
        self.decoded: list[list[Ref]] = []  # per pass, per batch: decode's candidates before dedup
        self.basic: list[list[Ref]] = []  # per pass, per batch: the basic instructions that went to the rounds

    def decoded_so_far(self) -> list[list[Ref]]:
        """Per batch, every earlier pass's decoded candidates (what a top-up decode is told was written)."""
        return [[p[i] for p in self.decoded] for i in range(len(self.labels))]

    def basic_count(self, one: int | None = None) -> int:
        """Basic instructions that went to the rounds: in every pass, or in pass `one` (-1: the last)."""
        return sum(ref["rows"] for p in (self.basic if one is None else [self.basic[one]]) for ref in p)

    def run(self, decoded: list[Outputs], refs: dict[str, list[Ref]], settings: Settings, topup: int = 0) -> int:
        """One pass over freshly decoded batches; returns the pairs it kept (before the budget)."""
        _collect(refs, decoded, skip=("candidates",) if settings.drop_duplicates else ())
        fresh = [out["candidates"] for out in decoded]
        self.decoded.append(fresh)
        basic = fresh
        if settings.drop_duplicates:  # across batches and passes: the first occurrence in the whole run is kept
            earlier = [ref for p in self.basic for ref in p]
            deduped = dedup([*earlier, *fresh], settings.for_stage("dedup"), len(earlier) + len(fresh))
            basic = deduped["candidates"][len(earlier):]
            refs["candidates"] += basic
            refs["rejected"] += deduped["rejected"]
        self.basic.append(basic)
        suffix = f"-t{topup}" if topup else ""
        active = [(f"{label}{suffix}", cands, rubric) for label, cands, rubric
                  in zip(self.labels, basic, self.rubric_refs, strict=True) if cands["rows"] > 0]
        names = [label for label, _, _ in active]
        per_batch = wait_rounds(names, rounds.map([c for _, c, _ in active], [r for _, _, r in active],
                                                  unmapped(settings.for_stage("rounds")), batch=names),
                                suffix.replace("-", " "))
        kept = 0
        for _, outputs in ordered(per_batch, settings.max_rounds):
            _collect(refs, outputs, skip=("pending",))
            kept += sum(out["kept"]["rows"] for out in outputs if "kept" in out)
        return kept


@flow(name="codeclm-generate", flow_run_name="generate · {seeds} → {out}", log_prints=True,
      on_running=[watch_cancellation])
def generate(seeds: str, out: str, settings: Settings | None = None, method: str = "codeclm") -> GenerateResult:
    """Make a CodecLM dataset from a seed file into `out` (published atomically when complete); `method` names
    it in the manifest (`codeclm`, or a Table 3 ablation the baseline flow asked for)."""
    settings = settings or Settings()
    checked = check_generate(seeds, out, settings)  # already done (and remembered) when the CLI started this flow
    reused = published_run(checked, out, settings, method)
    if reused is not None:
        print(f"{out} already holds this run (same seeds, settings and recipe, no failed call to ask again, files "
              "intact): nothing to call or publish")
        profile_artifact(out, method)
        return reused
    with progress_view("generate-progress", f"generate · {seeds} → {out}"), \
            models_ready(settings, generation_roles(settings)):
        summary = GenerateResult.model_validate(
            pipeline.with_options(task_runner=task_runner(settings))(seeds, checked.sha, out, settings, method))
    stage_table("generate-stages", summary.stages, "calls, tokens, cost and seconds per CodecLM stage")
    stage_table("generate-concurrency", summary.concurrency, "adaptive requests in flight per endpoint: limit "
                "now, lowest and highest, in-flight peak, 429/503 answers, Retry-After pauses")
    profile_artifact(out, method)
    budget = summary.budget
    if budget.shortfall:
        get_run_logger().warning("SHORTFALL: published %d of %d pairs (%d short) after %d top-up passes: %s",
                                 budget.published, budget.wanted, budget.shortfall, budget.topup_passes, budget.limit)
    print(f"published {summary.train} training pairs to {summary.out}")
    return summary
