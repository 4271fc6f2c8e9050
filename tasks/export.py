"""Assemble, check and publish the dataset: budget, lineage invariant, manifest, one atomic flip into place."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from codeclm.benchmarks import load_benchmark
from codeclm.checks import recipe_digest
from codeclm.errors import DatasetError
from codeclm.llm.prompts import load_prompt
from codeclm.profile import write_profile
from codeclm.publish import publishing
from codeclm.records import (
    CallStats,
    Candidate,
    FailedCall,
    FilterDecision,
    Judgement,
    Metadata,
    Record,
    RejectedCandidate,
    Response,
    RubricSet,
    Seed,
    TrainingPair,
)
from codeclm.rouge import EvalOverlap
from codeclm.settings import StageSettings
from codeclm.storage import check_schema, file_sha256, package_versions, write_json, write_jsonl, write_records
from tasks._base import Ref, codec_task, read
from tasks.respond import answer_messages
from tasks.review import review_dataset

STAGE_TABLES: dict[str, type[Record]] = {
    "seeds": Seed, "metadata": Metadata, "rubrics": RubricSet, "candidates": Candidate, "responses": Response,
    "judgements": Judgement, "decisions": FilterDecision, "stats": CallStats,
}
PROMPTS = ("encode", "decode", "decode_more", "rubrics", "improve", "respond", "score")


def apply_budget(kept: list[TrainingPair], budget: int, seed: int
                 ) -> tuple[list[TrainingPair], list[RejectedCandidate]]:
    """Keep `budget` pairs, sampled reproducibly when there are more; the rest are rejected as over budget."""
    if len(kept) <= budget:
        return kept, []
    ordered = sorted(kept, key=lambda p: p.pair_id)
    chosen = set(random.Random(seed).sample(range(len(ordered)), budget))
    over = [RejectedCandidate(instruction_id=p.instruction_id, candidate_id=p.candidate_id, metadata_id=p.metadata_id,
                              round=p.round, instruction=p.instruction, reason="over_budget", gap=p.gap)
            for i, p in enumerate(ordered) if i not in chosen]
    return [p for i, p in enumerate(ordered) if i in chosen], over


def eval_overlaps(instructions: Iterable[tuple[str, str]], settings: StageSettings) -> dict[str, str]:
    """The leak guard: which training instructions (id, text) repeat an evaluation question of the setting
    `eval_overlap` (a benchmark name or file), id -> why ('exact' or 'rouge-l 0.83'); none when it is unset."""
    if not settings.eval_overlap:
        return {}
    questions = load_benchmark(settings.eval_overlap, cache_dir=settings.home / "benchmarks")
    guard = EvalOverlap(q.prompt for q in questions)
    return {i: why for i, text in instructions if (why := guard.match(text)) is not None}


def check_lineage(basic: set[str], kept: list[TrainingPair], rejected: list[RejectedCandidate],
                  failed: list[FailedCall]) -> None:
    """Every basic instruction ends exactly once: kept, rejected or failed. None vanish, none double."""
    ends: dict[str, list[str]] = defaultdict(list)
    for p in kept:
        ends[p.instruction_id].append("kept")
    for r in rejected:
        ends[r.instruction_id].append("rejected")
    for f in {f.instruction_id for f in failed if f.instruction_id}:
        ends[f].append("failed")
    vanished = sorted(basic - ends.keys())
    doubled = sorted(i for i, e in ends.items() if len(e) > 1)
    unknown = sorted(ends.keys() - basic)
    if vanished or doubled or unknown:
        raise DatasetError(f"lineage check failed: {len(vanished)} instructions vanished {vanished[:3]}, "
                           f"{len(doubled)} ended twice {doubled[:3]}, {len(unknown)} unknown {unknown[:3]}; "
                           "nothing was published")


def chat_rows(pairs: list[TrainingPair]) -> list[dict[str, Any]]:
    """OpenAI / TRL chat fine-tuning format: the messages the answer was generated under (system prompt and
    instruction), then the kept answer."""
    return [{"messages": [*answer_messages(p.instruction), {"role": "assistant", "content": p.response}]}
            for p in pairs]


def _concat(refs: list[Ref], model: type[Record]) -> list[Record]:
    return [row for ref in refs for row in read(ref, model)]


PACKAGES = ("codeclm-factory", "prefect", "litellm", "pyarrow", "pandas", "pydantic")


def per_round(rounds: Iterable[int]) -> dict[str, int]:
    """Counts by round, keyed as JSON keeps them (so a result read back from the manifest equals a fresh one)."""
    return {str(r): n for r, n in sorted(Counter(rounds).items())}


def stage_summary(stats: list[CallStats]) -> list[dict[str, Any]]:
    frame = pd.DataFrame([s.model_dump() for s in stats])
    if frame.empty:
        return []
    grouped = frame.drop(columns=["batch"]).groupby("stage", sort=False).sum(numeric_only=True).reset_index()
    grouped["task_runs"] = frame.groupby("stage", sort=False).size().values
    return grouped.round({"cost_usd": 6, "seconds": 3}).to_dict(orient="records")


@codec_task("export", run_name="publish dataset · {out}")
def export(refs: dict[str, list[Ref]], settings: StageSettings, out: str, run: dict[str, Any]) -> dict[str, Any]:
    """Write train/rejected/failed/stages and the manifest aside, validate them, then publish them as `out`.
    `run` may carry `concurrency`: the adaptive limits per endpoint during the run, kept in the manifest."""
    target = Path(out)
    run = dict(run)
    limits = run.pop("concurrency", [])
    topup = run.pop("topup", {"passes": 0, "limit": None})
    method = run.pop("method", "codeclm")
    kept_all = _concat(refs.get("kept", []), TrainingPair)
    leaked = eval_overlaps(((p.instruction_id, p.instruction) for p in kept_all), settings)
    overlap = [RejectedCandidate(instruction_id=p.instruction_id, candidate_id=p.candidate_id,
                                 metadata_id=p.metadata_id, round=p.round, instruction=p.instruction,
                                 reason="eval_overlap", gap=p.gap) for p in kept_all if p.instruction_id in leaked]
    train, over_budget = apply_budget([p for p in kept_all if p.instruction_id not in leaked], settings.budget,
                                      settings.seed)
    rejected = _concat(refs.get("rejected", []), RejectedCandidate) + overlap + over_budget
    failed = _concat(refs.get("failed", []), FailedCall)
    candidates = _concat(refs.get("candidates", []), Candidate)
    basic = {c.instruction_id for c in candidates if c.round == 1} | {
        r.instruction_id for r in rejected if r.reason in ("seed_overlap", "duplicate")}
    check_lineage(basic, train, rejected, failed)
    if not train and not rejected:  # every instruction failed (or none was made): never replace a dataset with that
        by_stage = ", ".join(f"{stage} {n}" for stage, n in Counter(f.stage for f in failed).items()) or "none"
        raise DatasetError(f"no instruction was kept or rejected, so there is nothing to publish (failed calls: "
                           f"{by_stage}; first: {failed[0].error_type if failed else '-'}); nothing was published")

    with publishing(target) as staging:
        files, tables = write_dataset(staging, refs, train, (rejected, RejectedCandidate), failed, STAGE_TABLES)

        stats = _concat(refs.get("stats", []), CallStats)
        stages = stage_summary(stats)
        shortfall = max(0, settings.budget - len(train))
        budget = {"wanted": settings.budget, "published": len(train), "shortfall": shortfall,
                  "topup_passes": topup["passes"], "limit": (topup["limit"] or "no top-up was needed"
                                                             if shortfall else None)}
        manifest = {
            "method": method,
            "run": run,
            "versions": package_versions(*PACKAGES),
            "recipe": recipe_digest(),
            "prompts": {p: load_prompt(p).version for p in PROMPTS},
            "preset": settings.preset,
            "settings": settings.dump(),
            "budget": budget,
            "counts": {
                "seeds": len(tables["stages/seeds.parquet"][0]),
                "metadata": dict(Counter(m.origin for m in tables["stages/metadata.parquet"][0])),  # type: ignore[attr-defined]
                "basic_instructions": len(basic),
                "candidates_per_round": per_round(c.round for c in candidates),
                "kept_per_round": per_round(p.round for p in kept_all),
                "kept_sources": dict(Counter(p.response_source for p in kept_all)),
                "train": len(train),
                "eval_overlap": len(overlap),
                "rejected": dict(Counter(r.reason for r in rejected)),
                "failed_calls": dict(Counter(f.stage for f in failed)),
                "failed_instructions": len({f.instruction_id for f in failed if f.instruction_id}),
            },
            "stages": stages,
            "concurrency": limits,
            "totals": totals(stages),
            "files": {name: file_sha256(path) for name, path in sorted(files.items())},
        }
        manifest["files"] |= write_profile(staging, manifest)
        write_json(staging / "manifest.json", manifest)
        if settings.review == "dataset":
            review_dataset(staging, settings.review_timeout, f"{method} · {out} (not yet published)")
    return {"out": str(target), "method": method, "train": len(train), "budget": budget,
            "counts": manifest["counts"], "stages": stages, "concurrency": limits, "totals": manifest["totals"]}


Tables = dict[str, tuple[list[Record], type[Record]]]


def write_dataset(staging: Path, refs: dict[str, list[Ref]], train: list[TrainingPair],
                  rejected: tuple[list[Any], type[Record]], failed: list[FailedCall],
                  stage_tables: dict[str, type[Record]]) -> tuple[dict[str, Path], Tables]:
    """The published files of a dataset (CodecLM's or a baseline's, which rejects with its own row type), written
    into `staging` and checked by re-reading; returns the paths and what each table should hold."""
    rows, model = rejected
    files = {
        "train.parquet": write_records(staging / "train.parquet", train, TrainingPair),
        "rejected.parquet": write_records(staging / "rejected.parquet", rows, model),
        "failed_calls.parquet": write_records(staging / "failed_calls.parquet", failed, FailedCall),
        "train.jsonl": write_jsonl(staging / "train.jsonl", chat_rows(train)),
    }
    tables: Tables = {"train.parquet": (train, TrainingPair), "rejected.parquet": (rows, model),
                      "failed_calls.parquet": (failed, FailedCall)}
    for name, stage_model in stage_tables.items():
        stage_rows = _concat(refs.get(name, []), stage_model)
        files[f"stages/{name}.parquet"] = write_records(staging / "stages" / f"{name}.parquet", stage_rows,
                                                        stage_model)
        tables[f"stages/{name}.parquet"] = (stage_rows, stage_model)
    _validate(staging, tables, len(train))
    return files, tables


def totals(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's totals over its per-stage summaries."""
    return {k: sum(s[k] for s in stages) for k in ("calls", "cached", "failed", "prompt_tokens", "completion_tokens",
                                                   "cost_usd", "unpriced_calls", "cache_unreadable")}


def _validate(staging: Path, tables: dict[str, tuple[list[Record], type[Record]]], n_train: int) -> None:
    """Re-read every file: schema and row count must match what we meant to write."""
    for name, (rows, model) in tables.items():
        path = staging / name
        table = pq.read_table(path)
        check_schema(path, table.schema, model)
        if table.num_rows != len(rows):
            raise DatasetError(f"{path}: {table.num_rows} rows written, {len(rows)} expected; nothing was published")
    lines = (staging / "train.jsonl").read_text().count("\n")
    if lines != n_train:
        raise DatasetError(f"train.jsonl has {lines} lines for {n_train} pairs; nothing was published")
