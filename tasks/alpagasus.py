"""Alpagasus rating filter (Chen et al. 2023; CodecLM §5.1 applies it to Self-Instruct's pairs): the strong
model rates each (instruction, answer) pair from 1 to 5, and pairs rated at least the threshold (4.5) stay."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from codeclm.baseline_records import BaselineRejected, Rating
from codeclm.errors import ParseError
from codeclm.llm.gateway import Call
from codeclm.llm.prompts import load_prompt
from codeclm.records import TrainingPair
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read

_RATING = re.compile(r"\**\s*(?:rating|score)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


class RatingOut(BaseModel):
    rating: float = Field(ge=1, le=5)


def parse_rating(text: str) -> RatingOut:
    """'Rating: 4.5' (or a bare number) on the first non-empty line; anything else does not parse."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    match = _RATING.match(first)
    if not match:
        raise ParseError(f"no rating in {first[:80]!r}")
    return RatingOut(rating=float(match.group(1)))


def kept(rating: float, settings: StageSettings) -> bool:
    return rating >= settings.baselines.alpagasus_threshold


@codec_task("alpagasus", run_name="{name} · {method}", tags=["role:strong"])
def alpagasus(pairs: Ref, settings: StageSettings, method: str) -> Outputs:
    """Rate every pair at the judge's determinism (score_temperature); keep those at or above the threshold."""
    step = Step("alpagasus", method, settings, pairs=pairs["sha"])
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("alpagasus")
    structured = step.structured("strong")
    rows = read(pairs, TrainingPair)
    calls = [Call(role="strong",
                  messages=prompt.render(structured=structured, instruction=p.instruction, answer=p.response),
                  output=RatingOut, text_parser=parse_rating, prompt_version=prompt.version, stage="alpagasus",
                  item_id=p.pair_id, temperature=settings.score_temperature)
             for p in rows]
    results = step.call(calls, {p.pair_id: p.instruction_id for p in rows})
    ratings, keep, rejected = [], [], []
    for pair, result in zip(rows, results, strict=True):
        if not result.ok:
            continue
        rating = result.value.rating
        ratings.append(Rating(pair_id=pair.pair_id, instruction_id=pair.instruction_id, rating=rating,
                              kept=kept(rating, settings)))
        if kept(rating, settings):
            keep.append(pair)
        else:
            rejected.append(BaselineRejected(instruction_id=pair.instruction_id, instruction=pair.instruction,
                                             stage="alpagasus", reason="low_rating", detail=f"{rating:g}"))
    step.write("pairs", keep, TrainingPair)
    step.write("ratings", ratings, Rating)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
