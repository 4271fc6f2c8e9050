"""Baselines' answering step: the strong model answers pool instructions until `want` pairs exist (or the pool
runs out), so a failed or eliminated answer is replaced by the next instruction instead of leaving a gap.

Evol's answer check (WizardLM's elimination, stated): an answer that says "sorry" in fewer than 80 words means
the model failed at the evolved instruction, which is dropped as `failed_answer`.
"""

from __future__ import annotations

import math
import random
import re

from codeclm.baseline_records import BaselineRejected, PoolInstruction
from codeclm.llm.pairwise import SCORE_COLUMNS
from codeclm.records import TrainingPair, content_id
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.respond import answer_calls

_SORRY = re.compile(r"\bsorry\b", re.IGNORECASE)
SORRY_MAX_WORDS = 80


def failed_answer(text: str) -> bool:
    """WizardLM's check that the model could not do the evolved instruction."""
    return bool(_SORRY.search(text)) and len(text.split()) < SORRY_MAX_WORDS


def pair_of(item: PoolInstruction, answer: str, model: str, settings: StageSettings) -> TrainingPair:
    """A baseline pair in the CodecLM schema: lineage from the pool row; no contrastive scores (NaN), no other
    answer, decision keep_strong (the strong model's answer is the one kept)."""
    nan = math.nan
    return TrainingPair(
        pair_id=content_id("pair", item.method, item.instruction_id, answer), instruction=item.instruction,
        response=answer, response_source="strong", other_response="", instruction_id=item.instruction_id,
        candidate_id=item.instruction_id, seed_ids=item.seed_ids, metadata_id=item.metadata_id,
        use_case=item.use_case, skills=item.skills, basic_instruction=item.root_instruction,
        actions_applied=item.evolutions, round=item.round, strong_model=model, target_model=settings.target.model,
        **dict.fromkeys(SCORE_COLUMNS, nan), gap=nan,
        decision="keep_strong")


def answer_order(items: list[PoolInstruction], settings: StageSettings) -> list[PoolInstruction]:
    """The order instructions are answered in: a reproducible shuffle, so a budget below the pool samples it."""
    ordered = sorted(items, key=lambda p: p.instruction_id)
    random.Random(f"{settings.seed}:pairs").shuffle(ordered)
    return ordered


@codec_task("pairs", run_name="{name} · {method}", tags=["role:strong"])
def answer_pairs(pool: Ref, settings: StageSettings, want: int | None, method: str, *, check: bool) -> Outputs:
    """Answer in waves of the pairs still missing; `want=None` answers the whole pool."""
    step = Step("pairs", method, settings, pool=pool["sha"], want=want, check=check)
    if (done := step.done()) is not None:
        return done
    order = answer_order(read(pool, PoolInstruction), settings)
    limit = len(order) if want is None else want
    pairs: list[TrainingPair] = []
    rejected: list[BaselineRejected] = []
    start = 0
    while len(pairs) < limit and start < len(order):
        wave = order[start:start + limit - len(pairs)]
        start += len(wave)
        calls = answer_calls([(p.instruction_id, p.instruction) for p in wave], "strong", "pairs")
        results = step.call(calls, {p.instruction_id: p.instruction_id for p in wave})
        for item, result in zip(wave, results, strict=True):
            if not result.ok:
                continue
            if check and failed_answer(result.value):
                rejected.append(BaselineRejected(instruction_id=item.instruction_id, instruction=item.instruction,
                                                 stage="pairs", reason="failed_answer", detail=result.value[:200]))
                continue
            pairs.append(pair_of(item, result.value, result.model, settings))
    step.write("pairs", pairs, TrainingPair)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
