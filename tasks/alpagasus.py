"""Alpagasus rating filter (Chen et al. 2023; CodecLM §5.1 and A.2 apply it to Self-Instruct's pairs, with a
ChatGPT evaluator "closely following" the original): the judge rates the accuracy of each (instruction, answer)
pair on the original filter's 0-5 scale, the score alone on the first line and an explanation after it, and
pairs rated at least the original threshold (4.5) stay."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from codeclm.baseline_records import ALPAGASUS_RATER as RATER
from codeclm.baseline_records import BaselineRejected, Rating
from codeclm.errors import ParseError
from codeclm.llm.gateway import Call, Reply
from codeclm.llm.prompts import load_prompt
from codeclm.records import TrainingPair
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read

_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_NOT_A_SCORE = re.compile(r"\bassistant\s*\d+", re.IGNORECASE)  # "Assistant 1: 4" names, not rates
_JSON_RATING = re.compile(r'"rating"\s*:\s*(\d+(?:\.\d+)?)')


class RatingOut(BaseModel):
    """The rater's reply: the 0-5 accuracy score, then why."""

    rating: float = Field(ge=0, le=5)
    explanation: str = ""


def parse_rating(text: str) -> RatingOut:
    """The first number on the first non-empty line: '4.5', 'Score: 4.5', '**4**', '4/5', '4.5 out of 5' and
    '5 - accurate' all parse; a first line without a number, or a number outside 0-5, does not (the gateway then
    asks again). Also reads the rating of a JSON reply cut short in its explanation (the rating comes first)."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    found = _NUMBER.search(_NOT_A_SCORE.sub(" ", first))
    if not found:
        if (cut := _JSON_RATING.search(text)) is not None:
            return RatingOut(rating=float(cut[1]))
        raise ParseError(f"no score on the first line: {first[:80]!r}")
    _, _, explanation = text.strip().partition("\n")
    return RatingOut(rating=float(found.group()), explanation=explanation.strip())


def kept(rating: float, settings: StageSettings) -> bool:
    return rating >= settings.baselines.alpagasus_threshold


@codec_task("alpagasus", run_name="{name} · {method}", tags=["role:judge"])
def alpagasus(pairs: Ref, settings: StageSettings, method: str) -> Outputs:
    """Rate every pair with the judge, at the judge's own temperature (0.0); keep those at or above the threshold."""
    step = Step("alpagasus", method, settings, pairs=pairs["sha"])
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("alpagasus")
    structured = step.structured(RATER)
    rows = read(pairs, TrainingPair)
    calls = [Call(role=RATER, messages=prompt.render(structured=structured, instruction=p.instruction,
                                                     answer=p.response),
                  output=RatingOut, text_parser=parse_rating, reply=Reply.STRUCTURED_CUT_OK,
                  prompt_version=prompt.version, stage="alpagasus", item_id=p.pair_id)
             for p in rows]  # the rating comes first; a cut explanation is fine
    results = step.call(calls, {p.pair_id: p.instruction_id for p in rows})
    ratings, keep, rejected = [], [], []
    for pair, result in zip(rows, results, strict=True):
        if not result.ok:
            continue
        rating = result.value.rating
        ratings.append(Rating(pair_id=pair.pair_id, instruction_id=pair.instruction_id, rating=rating,
                              kept=kept(rating, settings), model=result.model))
        if kept(rating, settings):
            keep.append(pair)
        else:
            rejected.append(BaselineRejected(instruction_id=pair.instruction_id, instruction=pair.instruction,
                                             stage="alpagasus", reason="low_rating", detail=f"{rating:g}"))
    step.write("pairs", keep, TrainingPair)
    step.write("ratings", ratings, Rating)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
