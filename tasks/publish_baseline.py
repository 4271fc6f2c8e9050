"""Publish a baseline dataset in `codeclm generate`'s layout: train.parquet (TrainingPair), train.jsonl (chat
messages), rejected.parquet, failed_calls.parquet, stages/*.parquet and manifest.json, published in one atomic
flip (codeclm.publish); the manifest adds the method, the budget and any shortfall with the limit that caused it."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from codeclm.baseline_records import BaselineRejected, PoolInstruction, Rating
from codeclm.errors import DatasetError
from codeclm.llm.prompts import load_prompt
from codeclm.profile import write_profile
from codeclm.publish import publishing
from codeclm.records import CallStats, Candidate, FailedCall, Metadata, Record, Seed, TrainingPair
from codeclm.settings import StageSettings
from codeclm.storage import file_sha256, package_versions, write_json
from tasks._base import Ref, codec_task, read
from tasks.evol import METHODS as EVOL_METHODS
from tasks.export import PACKAGES, eval_overlaps, stage_summary, totals, write_dataset
from tasks.review import review_dataset

STAGE_TABLES: dict[str, type[Record]] = {
    "seeds": Seed, "metadata": Metadata, "candidates": Candidate, "instructions": PoolInstruction,
    "ratings": Rating, "stats": CallStats,
}
PROMPTS: dict[str, tuple[str, ...]] = {
    "self_instruct": ("self_instruct", "respond"),
    "evol_instruct": (*(f"evol_{m}" for m in EVOL_METHODS), "respond"),
    "wizardlm_plus": ("encode", "decode", "decode_more", *(f"evol_{m}" for m in EVOL_METHODS), "respond"),
    "alpagasus": ("self_instruct", "respond", "alpagasus"),
    "tree_instruct": ("tree_instruct", "respond"),
}


def apply_budget(pairs: list[TrainingPair], budget: int, seed: int
                 ) -> tuple[list[TrainingPair], list[BaselineRejected]]:
    """Exactly `budget` pairs when there are more, sampled reproducibly; the rest are rejected as over budget."""
    if len(pairs) <= budget:
        return pairs, []
    ordered = sorted(pairs, key=lambda p: p.pair_id)
    chosen = set(random.Random(seed).sample(range(len(ordered)), budget))
    over = [BaselineRejected(instruction_id=p.instruction_id, instruction=p.instruction, stage="publish",
                             reason="over_budget") for i, p in enumerate(ordered) if i not in chosen]
    return [p for i, p in enumerate(ordered) if i in chosen], over


def _concat(refs: list[Ref], model: type[Record]) -> list[Any]:
    return [row for ref in refs for row in read(ref, model)]


@codec_task("publish_baseline", run_name="publish {method} · {out}")
def publish_baseline(method: str, refs: dict[str, list[Ref]], settings: StageSettings, out: str, run: dict[str, Any],
                     limit: str | None) -> dict[str, Any]:
    """Write aside, validate, publish as `out`; `limit` names the stated limit a shortfall comes from."""
    target = Path(out)
    budget = settings.budget
    pairs = _concat(refs.get("pairs", []), TrainingPair)
    leaked = eval_overlaps(((p.pair_id, p.instruction) for p in pairs), settings)
    overlap = [BaselineRejected(instruction_id=p.instruction_id, instruction=p.instruction, stage="publish",
                                reason="eval_overlap", detail=leaked[p.pair_id]) for p in pairs if p.pair_id in leaked]
    train, over = apply_budget([p for p in pairs if p.pair_id not in leaked], budget, settings.seed)
    rejected = _concat(refs.get("rejected", []), BaselineRejected) + overlap + over
    failed = _concat(refs.get("failed", []), FailedCall)
    if not train:
        by_stage = ", ".join(f"{s} {n}" for s, n in Counter(f.stage for f in failed).items()) or "none"
        raise DatasetError(f"{method}: no pair was made (failed calls: {by_stage}); nothing was published")
    shortfall = budget - len(train)
    with publishing(target) as staging:
        present = {name: model for name, model in STAGE_TABLES.items() if name in refs}
        files, tables = write_dataset(staging, refs, train, (rejected, BaselineRejected), failed, present)
        stages = stage_summary(_concat(refs.get("stats", []), CallStats))
        instructions = _concat(refs.get("instructions", []), PoolInstruction)
        manifest = {
            "method": method,
            "run": run,
            "versions": package_versions(*PACKAGES),
            "prompts": {p: load_prompt(p).version for p in PROMPTS[method]},
            "preset": settings.preset,
            "settings": settings.dump(),
            "budget": {"wanted": budget, "published": len(train), "shortfall": shortfall,
                       "limit": limit if shortfall else None},
            "counts": {
                "seeds": len(tables["stages/seeds.parquet"][0]),
                "instructions": len(instructions),
                "instructions_per_round": dict(sorted(Counter(i.round for i in instructions).items())),
                "pairs_before_budget": len(train) + len(over),
                "eval_overlap": len(overlap),
                "train": len(train),
                "rejected": dict(Counter(r.reason for r in rejected)),
                "failed_calls": dict(Counter(f.stage for f in failed)),
            },
            "stages": stages,
            "totals": totals(stages),
            "files": {name: file_sha256(path) for name, path in sorted(files.items())},
        }
        manifest["files"] |= write_profile(staging, manifest)
        write_json(staging / "manifest.json", manifest)
        if settings.review == "dataset":
            review_dataset(staging, settings.review_timeout, f"{method} · {out} (not yet published)")
    return {"out": str(target), "method": method, "train": len(train), "budget": manifest["budget"],
            "counts": manifest["counts"], "stages": stages, "totals": manifest["totals"]}
